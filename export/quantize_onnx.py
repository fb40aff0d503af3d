"""ONNX side of the quantization recipe (export/quantize.py has the ExecuTorch side):
onnxruntime's MatMulNBits quantizer on the exported graphs, the linears to 4-bit blocks of
`block_size` along the input dim (HQQ, as the torchao side), the target's `keep_8bit`
linears to 8-bit. Computed in fp32 (accuracy_level 0), not with int8 activations
(accuracy_level 4): with level 4 the verify pass (k+1 rows) and the decode step (1 row)
took different kernel paths and a speculative run left the quantized target's own greedy
output at a near-tie (seen once on the demo pair); exact speculative output comes first. Kept apart from export/quantize.py so that the cached ExecuTorch programs (keyed by
their exporter's sources) do not depend on it.
"""

from __future__ import annotations

from pathlib import Path

ACCURACY_LEVEL = 0  # fp32 compute: see the module docstring


def quantize_onnx_graph(path: Path, block_size: int, keep_8bit: list[str] | tuple = ()) -> dict:
    """Rewrite one graph (weights as external data) with MatMulNBits: the MatMuls of
    nn.Linear layers (found by the exporter's name scopes; the constant RoPE rotation and
    other matmuls are left alone) to 4-bit, or 8-bit where the module path contains one of
    `keep_8bit`. Returns the number of MatMuls per bit width and the `keep_8bit` patterns
    that matched a linear here (`keep_8bit_matched`)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    path = Path(path)
    model = onnx.load(str(path))
    groups: dict[int, list[str]] = {4: [], 8: []}
    others = []
    matched = set()
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        if "aten.linear" not in meta.get("pkg.torch.onnx.fx_node", ""):
            others.append(node.name)
            continue
        scope = meta.get("pkg.torch.onnx.name_scopes", "")
        matched |= {k for k in keep_8bit if k in scope}
        groups[8 if any(k in scope for k in keep_8bit) else 4].append(node.name)
    for bits, names in groups.items():
        if names:  # (the quantizer honours nodes_to_exclude; nodes_to_include alone is ignored)
            exclude = others + [n for b, group in groups.items() if b != bits for n in group]
            # 4-bit: HQQ scale/zero search, as the torchao side uses for the .pte
            algo = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4) if bits == 4 else None
            q = MatMulNBitsQuantizer(
                model,
                bits=bits,
                block_size=block_size,
                is_symmetric=True,
                accuracy_level=ACCURACY_LEVEL,
                nodes_to_exclude=exclude,
                algo_config=algo,
            )
            q.process()
            model = q.model.model
    done = {4: 0, 8: 0}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            done[next(a.i for a in node.attribute if a.name == "bits")] += 1
    missed = {bits: len(names) - done[bits] for bits, names in groups.items() if len(names) != done[bits]}
    if missed:  # e.g. a weight reaching its MatMul through a Transpose (not a constant B)
        raise ValueError(f"{path.name}: linears left unquantized (bits: count): {missed}")
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return {**{f"int{bits}": n for bits, n in done.items()}, "keep_8bit_matched": sorted(matched)}
