"""Weight quantization, one recipe applied to the target and the drafter alike.

ExecuTorch (torchao, in place on the eager modules before torch.export, the form XNNPACK
lowers to its quantized kernels):
- linears `8da4w`: int8 dynamic per-token activations, int4 symmetric weights in groups of
  `group_size` along the input dim (layers whose input width is not a multiple of the group
  stay fp32 and are listed);
- embeddings `int8`: int8 weights with one scale per row (`Int8Table`, plain ops), for the
  token table, the PLE table and the drafter's candidate-row table (its centroid head
  gathers rows of its LM head).
The target's LM head is tied to the token table in the checkpoint; quantized, it becomes an
int4 linear beside the int8 embedding table (as in ExecuTorch's own Gemma 4 recipe).

ONNX (onnxruntime's MatMulNBits quantizer on the exported graphs): every MatMul with a
constant weight to 4-bit symmetric blocks of `block_size` along the input dim, computing
with int8 activations (accuracy_level 4: the same 8-bit-activation / 4-bit-weight recipe).
"""

from __future__ import annotations

from pathlib import Path

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


def quantize_for_executorch(modules: list[nn.Module], linear: str, group_size: int, embedding: str) -> dict:
    """Quantize in place; returns what was quantized and what was left fp32. `modules`:
    every root holding the tables or linears (shared submodules are handled once)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    report = {"linear": linear, "group_size": group_size, "embedding": embedding, "kept_fp32": []}
    counts = {"linears": 0, "embeddings": 0}
    for module in modules:
        _untie(module)
    if embedding == "int8":
        counts["embeddings"] = quantize_tables(modules)
    if linear == "8da4w":
        seen: set[int] = set()

        def is_linear(m, fqn):
            if not isinstance(m, nn.Linear) or id(m) in seen:
                return False
            seen.add(id(m))
            if m.in_features % group_size:
                report["kept_fp32"].append(f"{fqn} (in_features {m.in_features} not a multiple of {group_size})")
                return False
            counts["linears"] += 1
            return True

        cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
        for module in modules:
            quantize_(module, cfg, filter_fn=is_linear)
    report.update(counts)
    return report


def _untie(module: nn.Module) -> None:
    """Give every linear that shares its weight with an embedding table (the tied LM head)
    its own copy, so the two are quantized each in their own scheme."""
    tables = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    for m in module.modules():
        if isinstance(m, nn.Linear) and id(m.weight) in tables:
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=False)


def quantize_onnx_graph(path: Path, block_size: int) -> int:
    """Rewrite one graph (weights as external data) with 4-bit MatMulNBits; returns the
    number of quantized MatMuls."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    path = Path(path)
    model = onnx.load(str(path))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    out = quantizer.model.model
    count = sum(n.op_type == "MatMulNBits" for n in out.graph.node)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(out, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return count
