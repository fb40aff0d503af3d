"""Weight quantization, one recipe applied to the target and the drafter alike.

ExecuTorch (torchao, in place on the eager modules before torch.export, the form XNNPACK
lowers to its quantized kernels):
- linears `8da4w`: int8 dynamic per-token activations, int4 symmetric weights in groups of
  `group_size` along the input dim (layers whose input width is not a multiple of the group
  get int8 weights, counted with the `keep_8bit` ones);
- embeddings `int8`: int8 weights with one scale per row (`Int8Table`, plain ops), or `int4`:
  two values per byte with an fp16 scale per 128 (`Int4Table`, plain integer ops), for the
  token table, the PLE table and the drafter's candidate-row table (its centroid head
  gathers rows of its LM head). android uses int4 tables and all-int4 linears from hidden
  size 1024 up (targets/android.toml, `wide_*`).
- everything is applied one module, or one block of rows, at a time: the checkpoint reader
  (export/checkpoint.py) quantizes the target as it reads it, in bounded memory.
The target's LM head is tied to the token table in the checkpoint; quantized, it becomes an
int4 linear beside the int8 embedding table (as in ExecuTorch's own Gemma 4 recipe).

ONNX: export/quantize_onnx.py (the same recipe with onnxruntime's MatMulNBits).

Both formats keep the linears named in the target's `keep_8bit` at 8-bit weights (the demo
pair's hidden size of 128 makes its attention, PLE and LM-head projections too lossy at
4 bits: top-1 agreement 89% with every linear at 4 bits, measured); the int4 groups use
HQQ scale search (as ExecuTorch's own LLM recipes do).
"""

from __future__ import annotations

import math

import torch
from torch import nn


TABLE_CHUNK_ROWS = 8192  # rows quantized at a time when a table is read from a checkpoint


class Int8Table(nn.Module):
    """An embedding table stored as int8 with one fp32 scale per row (symmetric):
    lookup = int8 row * row scale (* the Gemma embedding scale, if the table had one).
    Written with plain embedding / cast / mul ops, so every runtime (ExecuTorch portable
    kernels, onnxruntime Gather) runs it without a custom kernel."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, embed_scale=None):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("embed_scale", None if embed_scale is None else torch.as_tensor(embed_scale).float().clone())
        self.embedding_dim = q.shape[1]

    @classmethod
    def of(cls, table: nn.Embedding) -> "Int8Table":
        extra = getattr(table, "embed_scale", None)
        return cls.from_rows(lambda a, b: table.weight[a:b], table.weight.shape[0], extra)

    @classmethod
    def from_rows(cls, read, num_rows: int, embed_scale=None, chunk: int = TABLE_CHUNK_ROWS) -> "Int8Table":
        """`read(a, b)`: rows a..b-1 in any float dtype (from the module, or read from the
        checkpoint file); quantized `chunk` rows at a time, so the table is never held in fp32."""
        q = scale = None
        for a in range(0, num_rows, chunk):
            b = min(a + chunk, num_rows)
            w = read(a, b).detach().float()
            if q is None:  # filled in place: the int8 table is held once, never concatenated
                q = torch.empty((num_rows, w.shape[1]), dtype=torch.int8)
                scale = torch.empty((num_rows, 1), dtype=torch.float32)
            scale[a:b] = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
            q[a:b] = torch.round(w / scale[a:b]).clamp(-127, 127).to(torch.int8)
            del w
        return cls(q, scale, embed_scale)

    def forward(self, ids):
        rows = nn.functional.embedding(ids, self.q).to(torch.float32) * nn.functional.embedding(ids, self.scale)
        return rows if self.embed_scale is None else rows * self.embed_scale


INT4_TABLE_GROUP = 128  # values per fp16 scale in an Int4Table row (4.125 bits per value)


class Int4Table(nn.Module):
    """An embedding table stored as int4, two values per byte (low nibble first), with one
    fp16 scale per `group` values of a row (symmetric: value = (nibble - 8) * scale). At
    E4B's size the PLE table is 2.8B values: 1.45 GB here against 2.8 GB as Int8Table.
    The lookup unpacks with plain integer ops (gather, remainder and floor division of a
    non-negative dividend, as ExecuTorch's C-rule remainder needs), so portable kernels and
    onnxruntime run it without a custom kernel; only the gathered rows are touched."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, group: int, embed_scale=None):
        super().__init__()
        self.register_buffer("packed", packed)  # int8 [V, D / 2]: the bytes (hi << 4 | lo) viewed as int8
        self.register_buffer("scale", scale)  # fp16 [V, D / group]
        self.register_buffer("embed_scale", None if embed_scale is None else torch.as_tensor(embed_scale).float().clone())
        self.group = group
        self.embedding_dim = packed.shape[1] * 2

    @classmethod
    def of(cls, table: nn.Embedding, group: int = INT4_TABLE_GROUP) -> "Int4Table":
        extra = getattr(table, "embed_scale", None)
        return cls.from_rows(lambda a, b: table.weight[a:b], table.weight.shape[0], extra, group=group)

    @classmethod
    def from_rows(cls, read, num_rows: int, embed_scale=None, chunk: int = TABLE_CHUNK_ROWS,
                  group: int = INT4_TABLE_GROUP) -> "Int4Table":
        """`read(a, b)`: rows a..b-1 in any float dtype; quantized `chunk` rows at a time."""
        packed = scale = None
        for a in range(0, num_rows, chunk):
            b = min(a + chunk, num_rows)
            w = read(a, b).detach().float()
            dim = w.shape[1]
            if dim % 2:
                raise ValueError(f"table width {dim} is odd: int4 rows pack two values per byte")
            group = math.gcd(dim, group)  # narrow tables (the demo drafter's 64) get one scale per row
            if packed is None:
                packed = torch.empty((num_rows, dim // 2), dtype=torch.int8)
                scale = torch.empty((num_rows, dim // group), dtype=torch.float16)
            g = w.reshape(b - a, dim // group, group)
            s = (g.abs().amax(dim=2, keepdim=True) / 7.0).clamp(min=1e-8).to(torch.float16)
            q = (torch.round(g / s.float()).clamp(-8, 7) + 8).to(torch.int16).reshape(b - a, dim)
            packed[a:b] = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
            scale[a:b] = s.squeeze(2)
            del w, g, q
        return cls(packed, scale, group, embed_scale)

    def forward(self, ids):
        byte = torch.remainder(nn.functional.embedding(ids, self.packed).to(torch.int32) + 256, 256)
        lo = torch.remainder(byte, 16)
        hi = torch.div(byte, 16, rounding_mode="floor")
        q = torch.stack([lo, hi], dim=-1).reshape(*ids.shape, -1, self.group).to(torch.float32) - 8.0
        s = nn.functional.embedding(ids, self.scale).to(torch.float32).unsqueeze(-1)
        rows = (q * s).reshape(*ids.shape, self.embedding_dim)
        return rows if self.embed_scale is None else rows * self.embed_scale


TABLES = {"int8": Int8Table, "int4": Int4Table}
QUANTIZED_TABLES = (Int8Table, Int4Table)


def quantize_tables(roots: list[nn.Module], kind: str = "int8") -> int:
    """Replace every nn.Embedding reachable from `roots` by its quantized table (`kind`: int8 or
    int4), in place; a table shared by several parents becomes one. Returns the number of tables."""
    done: dict[int, nn.Module] = {}
    for root in roots:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Embedding):
                    if id(child) not in done:
                        done[id(child)] = TABLES[kind].of(child)
                    setattr(parent, name, done[id(child)])
    return len(done)


def is_quantized(linear: nn.Linear) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(linear.weight, TorchAOBaseTensor)


class LinearRecipe:
    """Which linears get which weights, applied one module at a time: by the checkpoint
    reader as each layer is read (export/checkpoint.py, bounded memory) and by
    `quantize_for_executorch` for whatever is left. int4 in groups of `group_size` along the
    input dim; int8 per output channel for paths containing a `keep_8bit` pattern and for
    inputs not divisible by the group."""

    def __init__(self, linear: str, group_size: int, keep_8bit=()):
        if linear not in ("8da4w", "fp32"):
            raise ValueError(f"linear quantization {linear!r} unknown; known: 8da4w, fp32")
        self.linear, self.group_size, self.keep_8bit = linear, group_size, tuple(keep_8bit)
        self.matched: set[str] = set()

    def bits(self, fqn: str, m: nn.Linear) -> int:
        hits = {k for k in self.keep_8bit if k in fqn}
        self.matched |= hits
        return 8 if hits or m.in_features % self.group_size else 4

    def _configs(self) -> dict:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig
        from torchao.quantization.granularity import PerAxis, PerGroup

        return {
            4: Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int4, weight_granularity=PerGroup(self.group_size),
                intx_choose_qparams_algorithm="hqq_scale_only",
            ),
            8: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
        }

    def quantize(self, root: nn.Module, prefix: str = "") -> None:
        """Quantize every plain nn.Linear under `root` in place (`prefix`: root's own path,
        so `keep_8bit` patterns see full paths such as 'model.layers.3.self_attn.q_proj')."""
        if self.linear == "fp32":
            for fqn, m in root.named_modules(prefix=prefix.rstrip(".")):
                if isinstance(m, nn.Linear):
                    self.bits(fqn, m)  # only to record which keep_8bit patterns matched
            return
        from torchao.quantization import quantize_

        configs = self._configs()
        for fqn, m in list(root.named_modules(prefix=prefix.rstrip("."))):
            if isinstance(m, nn.Linear):
                bits = self.bits(fqn, m)  # also records the keep_8bit patterns seen
                if not is_quantized(m):
                    _quantize_by_rows(m, configs[bits], quantize_)

    def quantize_from_rows(self, m: nn.Linear, fqn: str, read) -> None:
        """Quantize a linear whose weight is still unread (on the meta device) from `read(a, b)`,
        a block of output rows at a time: the tied LM head from the checkpoint's token table."""
        bits = self.bits(fqn, m)
        if self.linear == "fp32":
            m.weight = nn.Parameter(read(0, m.out_features).float(), requires_grad=False)
            return
        from torchao.quantization import quantize_

        _quantize_by_rows(m, self._configs()[bits], quantize_, read)

    def check(self) -> None:
        check_keep_8bit(self.keep_8bit, self.matched)


LINEAR_CHUNK_ROWS = 16384  # output rows quantized at a time (the LM head: 262144 rows at E4B's size)


def _quantize_by_rows(m: nn.Linear, config, quantize_, read=None) -> None:
    """Quantize a linear's weight in blocks of output rows and join the blocks. Every scale
    belongs to one row (groups along the input dim, or one per output channel), so the
    result equals quantizing the whole weight at once, without the scale search's fp32
    temporaries of the whole matrix (several GB for E4B's LM head). `read(a, b)`: rows of
    the weight from elsewhere (the checkpoint file), so it is never whole in fp32."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    rows = m.out_features
    if read is None:
        if rows <= LINEAR_CHUNK_ROWS:
            quantize_(m, config)
            return
        read = lambda a, b: m.weight.detach()[a:b]  # noqa: E731
    parts = []
    for a in range(0, rows, LINEAR_CHUNK_ROWS):
        piece = nn.Linear(m.in_features, min(LINEAR_CHUNK_ROWS, rows - a), bias=False)
        piece.weight = nn.Parameter(read(a, a + LINEAR_CHUNK_ROWS).float(), requires_grad=False)
        quantize_(piece, config)
        parts.append(piece.weight)
    first = parts[0]
    joined = IntxUnpackedToInt8Tensor(
        torch.cat([p.qdata for p in parts]),
        torch.cat([p.scale for p in parts]),
        torch.cat([p.zero_point for p in parts]),
        first.target_dtype,
        first.block_size,
        first.dtype,
        first.activation_quantization,
    )
    del parts
    bias = m.bias
    m.weight = nn.Parameter(joined, requires_grad=False)
    if bias is not None:
        m.bias = bias


def count_quantized(modules: list[nn.Module]) -> dict:
    """What the modules hold now: int4 / int8 linears and quantized tables (shared ones once)."""
    counts = {"linears_int4": 0, "linears_int8": 0, "embeddings": 0}
    seen: set[int] = set()
    for root in modules:
        for m in root.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            if isinstance(m, QUANTIZED_TABLES):
                counts["embeddings"] += 1
            elif isinstance(m, nn.Linear) and is_quantized(m):
                counts["linears_int8" if m.weight.target_dtype == torch.int8 else "linears_int4"] += 1
    return counts


def quantize_for_executorch(
    modules: list[nn.Module], linear: str, group_size: int, embedding: str, keep_8bit: list[str] | tuple = ()
) -> dict:
    """Quantize in place whatever is not quantized yet; returns what the modules hold.
    `modules`: every root holding the tables or linears (shared submodules are handled
    once). A target read with `load_target(..., quantization=...)` arrives with its linears
    and tables already quantized by the same recipe."""
    report = {"linear": linear, "group_size": group_size, "embedding": embedding, "keep_8bit": list(keep_8bit)}
    for module in modules:
        _untie(module)
    if embedding in TABLES:
        quantize_tables(modules, embedding)
    recipe = LinearRecipe(linear, group_size, keep_8bit)
    for module in modules:
        recipe.quantize(module)
    recipe.check()
    report.update(count_quantized(modules))
    return report


def check_keep_8bit(keep_8bit, matched) -> None:
    """A `keep_8bit` pattern that names no linear is a typo in the target file: refuse it
    instead of quantizing that layer to 4 bits without a word."""
    unused = [k for k in keep_8bit if k not in matched]
    if unused:
        raise ValueError(
            f"keep_8bit pattern(s) {unused} match no linear layer's module path; fix the target file "
            "(patterns are substrings of paths such as 'model.layers.3.self_attn.q_proj')"
        )


def _untie(module: nn.Module) -> None:
    """Give every linear that shares its weight with an embedding table (the tied LM head)
    its own copy, so the two are quantized each in their own scheme."""
    tables = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    for m in module.modules():
        if isinstance(m, nn.Linear) and id(m.weight) in tables:
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=False)
