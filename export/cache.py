"""Exports cached by their inputs: `make generate BACKEND=onnx CHECKPOINT=.. ASSISTANT=..`
exports once into `.cache/exports/<key>` and reuses it while the inputs are unchanged.

The key hashes the checkpoint files (name, size, modification time), the export settings,
the exporter's own source (so a changed exporter never serves a stale graph) and the
toolchain versions. A new export is written to a temporary folder and renamed into
place, so an interrupted export never leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE_ROOT = Path(os.environ.get("GEMMA4_EXPORT_CACHE", REPO / ".cache" / "exports"))
DEFAULT_MAX_CONTEXT = 1024
DEFAULT_MAX_DRAFT = 4
_HERE = Path(__file__).parent
_COMMON = ("config.py", "hf_compat.py", "checkpoint.py", "modules.py", "onnx_export.py")
EXPORTER_SOURCES = {
    "onnx": [_HERE / name for name in (*_COMMON, "onnx_data.py", "onnx_weights.py", "quantize_onnx.py")],
    "executorch": [_HERE / name for name in (*_COMMON, "executorch_export.py", "quantize.py")],
}
TOOLCHAIN = ("torch", "transformers", "onnx", "onnxscript", "executorch", "torchao")


def _fingerprint(path: Path | None) -> list:
    if path is None:
        return []
    return [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(Path(path).iterdir())
        if p.is_file() and (p.suffix in (".json", ".safetensors"))
    ]


def export_key(kind: str, checkpoint: Path, assistant: Path | None, **settings) -> str:
    from importlib.metadata import version

    blob = json.dumps(
        {
            "kind": kind,
            "target": [str(Path(checkpoint).resolve()), _fingerprint(checkpoint)],
            "assistant": [str(Path(assistant).resolve()) if assistant else None, _fingerprint(assistant)],
            "settings": settings,
            "exporter": [hashlib.sha256(p.read_bytes()).hexdigest() for p in EXPORTER_SOURCES[kind]],
            "versions": {name: version(name) for name in TOOLCHAIN},
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached(kind: str, checkpoint: Path, assistant: Path | None, max_context: int, max_draft: int, marker: str, write,
            **extra):
    key = export_key(kind, checkpoint, assistant, max_context=max_context, max_draft=max_draft, **extra)
    final = CACHE_ROOT / f"{kind}-{key}"
    if (final / marker).is_file():
        return final
    from export.checkpoint import load_pair
    from export.onnx_export import copy_tokenizer

    print(f"[export] {kind} artifacts for {checkpoint} -> {final} (cached for later runs)", flush=True)
    # a quantized program's target is quantized as it is read; ONNX graphs read each weight
    # when they write it (both bounded memory)
    target, drafter = load_pair(checkpoint, assistant, quantization=extra.get("quantization"), lazy=kind == "onnx")

    def build(tmp: Path):
        write(target, drafter, tmp, max_context, max_draft, **extra)
        copy_tokenizer(checkpoint, tmp)

    return build_atomically(final, build)


def build_atomically(final: Path, build) -> Path:
    """build(tmp) fills a temporary folder beside `final`, which is then renamed into place:
    an interrupted build never leaves a half-written entry."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def cached_onnx_export(
    checkpoint: Path,
    assistant: Path | None,
    max_context: int = DEFAULT_MAX_CONTEXT,
    max_draft: int = DEFAULT_MAX_DRAFT,
) -> Path:
    from export.onnx_export import export_onnx

    return _cached("onnx", checkpoint, assistant, max_context, max_draft, "layout.json", export_onnx)


def cached_executorch_export(
    checkpoint: Path,
    assistant: Path | None,
    max_context: int = DEFAULT_MAX_CONTEXT,
    max_draft: int = DEFAULT_MAX_DRAFT,
    quantization: dict | None = None,
) -> Path:
    """pair.pte + layout.json + executorch_report.json (+ tokenizer.json); lowering takes
    minutes, hence the cache. `quantization`: see export/quantize.py (None: fp32)."""
    from export.executorch_export import write_executorch

    return _cached(
        "executorch", checkpoint, assistant, max_context, max_draft, "pair.pte", write_executorch,
        quantization=quantization,
    )
