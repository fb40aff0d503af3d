"""Weight quantization, one recipe applied to the target and the drafter alike.

ExecuTorch (torchao, in place on the eager modules before torch.export, the form XNNPACK
lowers to its quantized kernels):
- linears `8da4w`: int8 dynamic per-token activations, int4 symmetric weights in groups of
  `group_size` along the input dim (layers whose input width is not a multiple of the group
  stay fp32 and are listed);
- embeddings `int8`: int8 weights with one scale per row, for the token table, the PLE table
  and the drafter's candidate-row table (its centroid head gathers rows of its LM head).
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


def quantize_for_executorch(modules: list[nn.Module], linear: str, group_size: int, embedding: str) -> dict:
    """Quantize in place; returns what was quantized and what was left fp32."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    report = {"linear": linear, "group_size": group_size, "embedding": embedding, "kept_fp32": []}
    counts = {"linears": 0, "embeddings": 0}
    for module in modules:
        if embedding == "int8":

            def is_table(m, fqn):
                if isinstance(m, nn.Embedding):
                    counts["embeddings"] += 1
                    return True
                return False

            quantize_(module, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)), filter_fn=is_table)
        if linear == "8da4w":

            def is_linear(m, fqn):
                if not isinstance(m, nn.Linear):
                    return False
                if m.in_features % group_size:
                    report["kept_fp32"].append(f"{fqn} (in_features {m.in_features} not a multiple of {group_size})")
                    return False
                counts["linears"] += 1
                return True

            cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
            quantize_(module, cfg, filter_fn=is_linear)
    report.update(counts)
    return report


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
