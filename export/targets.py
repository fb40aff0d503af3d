"""Deployment targets: `targets/<name>.toml` read into typed, validated config.

A target file states what `make export TARGET=<name>` builds: the formats (an
`[executorch]` and/or an `[onnx]` table), delegate, quantization scheme, context length,
prefill chunk, draft length (a number, or "auto" for draft-length calibration), the
layouts written for other ONNX clients (`[onnx] clients`) and the quality gates the export
must pass.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from export.client_layouts import CLIENTS

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"

PTE_LINEAR = ("fp32", "8da4w")
PTE_EMBEDDING = ("fp32", "int8", "int4")
ONNX_LINEAR = ("fp32", "int4")
ONNX_EMBEDDING = ("fp32", "int8", "int4")  # token / PLE tables: rows in blocks of block_size with scales
# MatMulNBits weights (export/quantize_onnx.py): "hqq": HQQ scales and zero points, fp32
# compute; "rtn-a8": symmetric round-to-nearest, no zero points, int8 activations
# (accuracy_level 4), onnxruntime's fast path
ONNX_METHODS = ("hqq", "rtn-a8")


class TargetError(ValueError):
    """An unknown target or a target file that does not validate."""


@dataclass(frozen=True)
class ExecuTorchSpec:
    delegate: str = "xnnpack"
    linear: str = "fp32"
    group_size: int = 32
    embedding: str = "fp32"
    coreml: bool = False
    keep_8bit: tuple[str, ...] = ()  # module-path substrings of linears kept at 8-bit weights
    # models at least this wide (hidden size) use the wide_* settings instead, where given
    wide_from_hidden: int | None = None
    wide_embedding: str | None = None
    wide_keep_8bit: tuple[str, ...] | None = None

    @property
    def quantized(self) -> bool:
        return self.linear != "fp32" or self.embedding != "fp32"

    def recipe(self, hidden_size: int) -> dict | None:
        """The quantization of export/quantize.py for a model of this hidden size (None: fp32)."""
        if not self.quantized:
            return None
        wide = self.wide_from_hidden is not None and hidden_size >= self.wide_from_hidden
        embedding = self.wide_embedding if wide and self.wide_embedding else self.embedding
        keep = self.wide_keep_8bit if wide and self.wide_keep_8bit is not None else self.keep_8bit
        return {"linear": self.linear, "group_size": self.group_size, "embedding": embedding, "keep_8bit": list(keep)}


@dataclass(frozen=True)
class OnnxSpec:
    linear: str = "fp32"
    block_size: int = 32
    keep_8bit: tuple[str, ...] = ()
    method: str = "hqq"  # how MatMulNBits weights are made and computed (ONNX_METHODS)
    embedding: str = "fp32"  # token and PLE tables (ONNX_EMBEDDING)
    # layouts for other clients written beside the graphs (export/client_layouts.py)
    clients: tuple[str, ...] = ()
    # models at least this wide (hidden size) use the wide_* settings instead, where given
    wide_from_hidden: int | None = None
    wide_keep_8bit: tuple[str, ...] | None = None
    wide_method: str | None = None
    wide_embedding: str | None = None

    @property
    def quantized(self) -> bool:
        return self.linear != "fp32" or self.embedding != "fp32"

    def recipe(self, hidden_size: int) -> dict | None:
        """The MatMulNBits quantization of export/quantize_onnx.py for a model of this hidden
        size (None: fp32)."""
        if not self.quantized:
            return None
        wide = self.wide_from_hidden is not None and hidden_size >= self.wide_from_hidden
        keep = self.wide_keep_8bit if wide and self.wide_keep_8bit is not None else self.keep_8bit
        method = self.wide_method if wide and self.wide_method else self.method
        embedding = self.wide_embedding if wide and self.wide_embedding else self.embedding
        return {"block_size": self.block_size, "keep_8bit": list(keep), "method": method, "embedding": embedding,
                "linear": self.linear}


@dataclass(frozen=True)
class Gates:
    min_top1_agreement: float
    max_mean_kl: float
    max_accepted_length_drop: float
    min_pte_size_reduction: float | None = None


@dataclass(frozen=True)
class DeploymentTarget:
    name: str
    description: str
    max_context: int
    prefill_chunk: int
    max_draft: int
    draft_tokens: int | str  # "auto" or a fixed number
    executorch: ExecuTorchSpec | None
    onnx: OnnxSpec | None
    gates: Gates

    @property
    def quantized(self) -> bool:
        return bool((self.executorch and self.executorch.quantized) or (self.onnx and self.onnx.quantized))


def known_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def _table(cls, data: dict, where: str):
    fields = cls.__dataclass_fields__
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TargetError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**data)
    except TypeError as e:
        raise TargetError(f"{where}: {e}") from None


def _choice(value, allowed, where):
    if value not in allowed:
        raise TargetError(f"{where} = {value!r}; expected one of {list(allowed)}")


def load_target(name: str, directory: Path = TARGETS_DIR) -> DeploymentTarget:
    path = Path(directory) / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(known_targets()) or "(none)"
        raise TargetError(f"unknown target {name!r}; known targets: {known} (files in {directory})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{path}: not valid TOML: {e}") from None
    where = str(path)
    et = _table(ExecuTorchSpec, data.pop("executorch"), f"{where} [executorch]") if "executorch" in data else None
    ox = _table(OnnxSpec, data.pop("onnx"), f"{where} [onnx]") if "onnx" in data else None
    if et is not None:
        _choice(et.delegate, ("xnnpack",), f"{where} [executorch] delegate")
        _choice(et.linear, PTE_LINEAR, f"{where} [executorch] linear")
        _choice(et.embedding, PTE_EMBEDDING, f"{where} [executorch] embedding")
        if et.wide_embedding is not None:
            _choice(et.wide_embedding, PTE_EMBEDDING, f"{where} [executorch] wide_embedding")
        if et.group_size <= 0 or et.group_size % 2:
            raise TargetError(f"{where} [executorch] group_size must be a positive even number")
    if ox is not None:
        _choice(ox.linear, ONNX_LINEAR, f"{where} [onnx] linear")
        _choice(ox.embedding, ONNX_EMBEDDING, f"{where} [onnx] embedding")
        if ox.wide_embedding is not None:
            _choice(ox.wide_embedding, ONNX_EMBEDDING, f"{where} [onnx] wide_embedding")
        if ox.block_size < 16 or ox.block_size & (ox.block_size - 1):
            raise TargetError(f"{where} [onnx] block_size must be a power of two >= 16")
        for client in ox.clients:
            _choice(client, CLIENTS, f"{where} [onnx] clients")
        _choice(ox.method, ONNX_METHODS, f"{where} [onnx] method")
        if ox.wide_method is not None:
            _choice(ox.wide_method, ONNX_METHODS, f"{where} [onnx] wide_method")
    if et is None and ox is None:
        raise TargetError(f"{where}: no format; add an [executorch] and/or an [onnx] table")
    if "gates" not in data:
        raise TargetError(f"{where}: a [gates] table is required")
    gates = _table(Gates, data.pop("gates"), f"{where} [gates]")
    target = _table(DeploymentTarget, {"name": name, **data, "executorch": et, "onnx": ox, "gates": gates}, where)
    if not 1 <= target.max_draft <= 8:
        raise TargetError(f"{where}: max_draft must be 1..8")
    if target.draft_tokens != "auto" and not (
        isinstance(target.draft_tokens, int) and 1 <= target.draft_tokens <= target.max_draft
    ):
        raise TargetError(f"{where}: draft_tokens must be \"auto\" or 1..max_draft ({target.max_draft})")
    if not 1 <= target.prefill_chunk <= target.max_context:
        raise TargetError(f"{where}: prefill_chunk must be 1..max_context")
    return target
