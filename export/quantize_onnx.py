"""ONNX side of the quantization recipe (export/quantize.py has the ExecuTorch side):
onnxruntime's MatMulNBits quantizer on the exported graphs, the linears to 4-bit blocks of
`block_size` along the input dim, the target's `keep_8bit` linears to 8-bit, by one of two
methods (the target file's `method` / `wide_method`):

- "hqq": HQQ scales and zero points (as the torchao side of the demo), computed in fp32
  (accuracy_level 0). Fine at the demo's widths; at E4B's it is the slow path: measured
  here on one 2560 x 10240 linear, one thread, one row, 76 ms against 3.6 ms in fp32 (the
  float zero points HQQ writes are not on onnxruntime's packed kernels), and an 8-bit
  MatMulNBits at accuracy_level 0 takes 79 ms (917 ms for a quarter of E4B's LM head
  against 25 ms in fp32).
- "rtn-a8": symmetric round-to-nearest (no zero points), computed with int8 activations
  (accuracy_level 4): the same linear 0.33 ms for one row, 1.43 ms for five (fp32: 2.58 and
  4.96), a quarter LM head 4.6 ms (fp32 25 ms). Each row's result is bit-identical whether
  it is computed alone or inside a 5- or 64-row call (measured; at accuracy_level 0 rows
  differ by ~1e-5 between the two), which is what keeps a speculative verify pass and a
  decode step on the same numbers.

Kept apart from export/quantize.py so that the cached ExecuTorch programs (keyed by their
exporter's sources) do not depend on it.
"""

from __future__ import annotations

from pathlib import Path

ACCURACY_LEVEL = {"hqq": 0, "rtn-a8": 4}  # onnxruntime's MatMulNBits accuracy_level per method


def quantize_onnx_graph(path: Path, block_size: int, keep_8bit: list[str] | tuple = (), method: str = "hqq") -> dict:
    """Rewrite one graph (weights as external data) with MatMulNBits: the MatMuls of
    nn.Linear layers (found by the exporter's name scopes; the constant RoPE rotation and
    other matmuls are left alone) to 4-bit, or 8-bit where the module path contains one of
    `keep_8bit`. Returns the number of MatMuls per bit width and the `keep_8bit` patterns
    that matched a linear here (`keep_8bit_matched`)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if method not in ACCURACY_LEVEL:
        raise ValueError(f"method {method!r}: expected one of {sorted(ACCURACY_LEVEL)}")
    level = ACCURACY_LEVEL[method]

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
            if method == "rtn-a8":
                algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=level,
                                                    bits=bits)
            else:  # 4-bit: HQQ scale/zero search, as the torchao side uses for the demo's .pte
                algo = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4) if bits == 4 else None
            q = MatMulNBitsQuantizer(
                model,
                bits=bits,
                block_size=block_size,
                is_symmetric=True,
                accuracy_level=level,
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
