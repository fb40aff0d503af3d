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

ALIGN = 64  # tensor offsets in the data files: aligned for direct (mmap) use
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


def fold_weight_transposes(path: Path) -> int:
    """Replace each Transpose of an initializer by the transposed initializer (stored in
    the graph's data file). The exporter folds these only for weights used once; in the
    drafting-round graphs every drafter weight is used once per step and reaches its MatMul
    through a Transpose, which hides it from weight quantizers (MatMulNBits needs a
    constant B) and from deduplication against the single-step graph. Returns the count."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    data_name = f"{path.name}.data"
    folded: dict[tuple, str] = {}
    renames: dict[str, str] = {}
    keep = []
    with open(path.parent / data_name, "ab") as f:
        for node in graph.node:
            if node.op_type != "Transpose" or node.input[0] not in inits:
                keep.append(node)
                continue
            src = inits[node.input[0]]
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            key = (src.name, tuple(perm) if perm else None)
            if key not in folded:
                arr = numpy_helper.to_array(src, base_dir=str(path.parent))
                arr = np.ascontiguousarray(arr.transpose(perm) if perm else arr.T)
                name = folded[key] = f"{src.name}.transposed" + ("" if perm is None else "_" + "".join(map(str, perm)))
                f.write(b"\0" * (-f.tell() % ALIGN))
                offset = f.tell()
                f.write(arr.tobytes())
                t = onnx.TensorProto(name=name, data_type=src.data_type, dims=arr.shape)
                t.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
                graph.initializer.append(t)
            renames[node.output[0]] = folded[key]
    if not renames:
        return 0
    del graph.node[:]
    graph.node.extend(keep)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for out in graph.output:
        if out.name in renames:
            raise ValueError(f"{path.name}: a folded transpose feeds graph output {out.name}")
    stale = [v for v in graph.value_info if v.name in renames]
    for v in stale:
        graph.value_info.remove(v)
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    onnx.save_model(model, str(path))
    return len(renames)


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
                pad = -f.tell() % ALIGN
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
