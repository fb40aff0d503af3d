"""Weight quantization, one recipe applied to the target and the drafter alike.

ExecuTorch (torchao, in place on the eager modules before torch.export, the form XNNPACK
lowers to its quantized kernels):
- linears `8da4w`: int8 dynamic per-token activations, int4 symmetric weights in groups of
  `group_size` along the input dim (layers whose input width is not a multiple of the group
  get int8 weights, counted with the `keep_8bit` ones);
- embeddings `int8`: int8 weights with one scale per row (`Int8Table`, plain ops), for the
  token table, the PLE table and the drafter's candidate-row table (its centroid head
  gathers rows of its LM head).
The target's LM head is tied to the token table in the checkpoint; quantized, it becomes an
int4 linear beside the int8 embedding table (as in ExecuTorch's own Gemma 4 recipe).

ONNX: export/quantize_onnx.py (the same recipe with onnxruntime's MatMulNBits).

Both formats keep the linears named in the target's `keep_8bit` at 8-bit weights (the demo
pair's hidden size of 128 makes its attention, PLE and LM-head projections too lossy at
4 bits: top-1 agreement 89% with every linear at 4 bits, measured); the int4 groups use
HQQ scale search (as ExecuTorch's own LLM recipes do).
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Table(nn.Module):
    """An embedding table stored as int8 with one fp32 scale per row (symmetric):
    lookup = int8 row * row scale (* the Gemma embedding scale, if the table had one).
    Written with plain embedding / cast / mul ops, so every runtime (ExecuTorch portable
    kernels, onnxruntime Gather) runs it without a custom kernel."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        w = table.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        self.register_buffer("q", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        extra = getattr(table, "embed_scale", None)
        self.register_buffer("embed_scale", None if extra is None else torch.as_tensor(extra).float().clone())
        self.embedding_dim = w.shape[1]

    def forward(self, ids):
        rows = nn.functional.embedding(ids, self.q).to(torch.float32) * nn.functional.embedding(ids, self.scale)
        return rows if self.embed_scale is None else rows * self.embed_scale


def quantize_tables(roots: list[nn.Module]) -> int:
    """Replace every nn.Embedding reachable from `roots` by its Int8Table, in place; a table
    shared by several parents becomes one Int8Table. Returns the number of tables."""
    done: dict[int, Int8Table] = {}
    for root in roots:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Embedding):
                    if id(child) not in done:
                        done[id(child)] = Int8Table(child)
                    setattr(parent, name, done[id(child)])
    return len(done)


def quantize_for_executorch(
    modules: list[nn.Module], linear: str, group_size: int, embedding: str, keep_8bit: list[str] | tuple = ()
) -> dict:
    """Quantize in place; returns what was quantized how. `modules`: every root holding the
    tables or linears (shared submodules are handled once). Linears whose module path
    contains one of `keep_8bit` get int8 weights (per output channel, still with int8
    dynamic activations) instead of int4."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    report = {"linear": linear, "group_size": group_size, "embedding": embedding, "keep_8bit": list(keep_8bit)}
    counts = {"linears_int4": 0, "linears_int8": 0, "embeddings": 0}
    for module in modules:
        _untie(module)
    if embedding == "int8":
        counts["embeddings"] = quantize_tables(modules)
    if linear == "8da4w":
        int4 = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group_size), intx_choose_qparams_algorithm="hqq_scale_only"
        )
        int8 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
        seen: set[int] = set()

        def chooser(bits):
            def pick(m, fqn):
                if not isinstance(m, nn.Linear) or id(m) in seen:
                    return False
                wants8 = any(k in fqn for k in keep_8bit) or m.in_features % group_size != 0
                if wants8 != (bits == 8):
                    return False
                seen.add(id(m))
                counts[f"linears_int{bits}"] += 1
                return True

            return pick

        matched: set[str] = set()
        for module in modules:
            for fqn, m in module.named_modules():
                if isinstance(m, nn.Linear):
                    matched |= {k for k in keep_8bit if k in fqn}
            quantize_(module, int4, filter_fn=chooser(4))
            quantize_(module, int8, filter_fn=chooser(8))
        check_keep_8bit(keep_8bit, matched)
    report.update(counts)
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
