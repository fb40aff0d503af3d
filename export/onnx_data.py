"""External data shared between the ONNX graphs of one export directory.

Several graphs hold the same tensors: the token embedding table (`embed.onnx` looks up the
target's inputs, every `drafter_k{k}.onnx` embeds its own drafts), the drafter weights
(`drafter.onnx` and the drafting-round graphs). `dedup_external_data` stores each distinct
tensor once: the first graph (in the given order) holding it keeps it in its own
`<graph>.data` file, later graphs point their initializer at that file and offset (ONNX
external data may name any file beside the graph). Tensors are compared by type, shape and
bytes, so equal weights under different initializer names are found too.

It returns the tensors of at least SHARE_MIN_BYTES used by more than one graph (file, offset, length, dtype, shape and
each graph's initializer name): the onnxruntime backend loads each of them once and hands
the same buffer to every session (`SessionOptions.add_initializer`), so the embedding table
exists once on disk and once in memory.

Streaming: tensors are copied file to file one at a time (never the whole model in memory),
into new files renamed over the old ones at the end.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ALIGN = 64  # tensor offsets in the data files: aligned for direct use
# large tensors start on a page: onnxruntime memory-maps such external data instead of
# reading it onto the heap, and the backend maps the shared ones itself (only the pages of
# the rows read become resident: the token and PLE tables)
PAGE = 4096
# Tensors listed for sharing in memory: below this size a private copy per session costs
# nothing worth saving, and a session keeps its small constants foldable.
SHARE_MIN_BYTES = 64 * 1024


def _external(tensor) -> dict | None:
    import onnx

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ValueError(f"{path.name}: {length} bytes expected at offset {offset}, file ends after {len(data)}")
    return data


def dedup_external_data(out_dir: Path, graphs: list[str]) -> list[dict]:
    import onnx

    out_dir = Path(out_dir)
    models = {g: onnx.load(str(out_dir / g), load_external_data=False) for g in graphs}
    canonical: dict[tuple, tuple[str, str, int, int]] = {}  # key -> (graph, old file, offset, length)
    uses: dict[tuple, dict[str, str]] = {}  # key -> {graph: initializer name}
    keys: dict[tuple[str, int], tuple] = {}  # (graph, initializer index) -> key
    for g in graphs:
        for i, t in enumerate(models[g].graph.initializer):
            ext = _external(t)
            if ext is None:
                continue
            offset, length = int(ext.get("offset", 0)), int(ext["length"])
            data = _read(out_dir / ext["location"], offset, length)
            key = keys[g, i] = (t.data_type, tuple(t.dims), hashlib.sha256(data).hexdigest())
            canonical.setdefault(key, (g, ext["location"], offset, length))
            uses.setdefault(key, {}).setdefault(g, t.name)

    # new data files: each graph's canonical tensors, aligned, copied from the old files
    placed: dict[tuple, tuple[str, int]] = {}
    new_files = {}
    for g in graphs:
        own = [k for k, c in canonical.items() if c[0] == g]
        if not own:
            continue
        name = f"{g}.data"
        tmp = out_dir / f"{name}.dedup-tmp"
        with open(tmp, "wb") as f:
            for key in own:
                _, old, offset, length = canonical[key]
                pad = -f.tell() % (PAGE if length >= SHARE_MIN_BYTES else ALIGN)
                f.write(b"\0" * pad)
                placed[key] = (name, f.tell())
                f.write(_read(out_dir / old, offset, length))
        new_files[name] = tmp

    for g in graphs:
        for i, t in enumerate(models[g].graph.initializer):
            if (g, i) not in keys:
                continue
            location, offset = placed[keys[g, i]]
            length = canonical[keys[g, i]][3]
            del t.external_data[:]
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
    for g in graphs:
        onnx.save_model(models[g], str(out_dir / g))
    for name, tmp in new_files.items():
        os.replace(tmp, out_dir / name)
    for g in graphs:  # the data file of a graph whose tensors all live elsewhere now
        stale = out_dir / f"{g}.data"
        if stale.exists() and stale.name not in new_files:
            stale.unlink()

    shared = []
    for key, users in uses.items():
        if len(users) < 2 or canonical[key][3] < SHARE_MIN_BYTES:
            continue
        location, offset = placed[key]
        shared.append(
            {
                "file": location,
                "offset": offset,
                "length": canonical[key][3],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(key[0]).name,
                "shape": list(key[1]),
                "users": users,
            }
        )
    return shared
