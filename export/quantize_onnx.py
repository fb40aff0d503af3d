"""ONNX side of the quantization recipe (export/quantize.py has the ExecuTorch side), one
weight at a time as the graphs are written (export/onnx_weights.py): onnxruntime's own
MatMulNBits quantizers (its C++ block quantizer; its HQQ solver) applied to each linear's
weight read from the checkpoint, the linears to 4-bit blocks of `block_size` along the input
dim, the target's `keep_8bit` linears to 8-bit, by one of two methods (the target file's
`method` / `wide_method`):

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

`python -m export.quantize_onnx --bench K N` measures these on one K x N linear.

8-bit weights are always symmetric round-to-nearest. Token and PLE tables use the same
layout (rows = the weight's output dim, blocks along the row; symmetric round-to-nearest):
a graph gathers the packed rows and scales of its tokens and decodes them
(`table_decode_nodes`), so a tied table and LM head quantized alike are the same bytes,
stored once (export/onnx_data.py).

Kept apart from export/quantize.py so that the cached ExecuTorch programs (keyed by their
exporter's sources) do not depend on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ACCURACY_LEVEL = {"hqq": 0, "rtn-a8": 4}  # onnxruntime's MatMulNBits accuracy_level per method
ROW_CHUNK = 16384  # rows per call of the block quantizer (an E4B table or LM head: 16 of them)
ZERO = {4: 8, 8: 128}  # the implicit zero point of a symmetric MatMulNBits weight


@dataclass
class Blocks:
    """One [N, K] weight (torch's [out, in]) in MatMulNBits layout: `packed` uint8
    [N, K / block, block * bits / 8] (4-bit: low nibble first), `scales` fp32 [N, K / block]
    (HQQ: flattened, with float `zero_points` beside); symmetric weights have no zero points
    (ZERO[bits] implied)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block: int


def check_block(k: int, block: int, what: str) -> None:
    if block < 16 or block & (block - 1) or k % block:
        raise ValueError(f"{what}: input width {k} is not a multiple of block_size {block} (a power of two >= 16)")


def quantize_rows(read, n: int, k: int, bits: int, block: int, method: str = "rtn-a8") -> Blocks:
    """Quantize a [n, k] weight read by row ranges (`read(a, b)` -> fp32 rows a..b-1): 8-bit
    and "rtn-a8" by onnxruntime's symmetric block quantizer, ROW_CHUNK rows at a time (rows
    are independent: the result equals one call over the whole weight); 4-bit "hqq" by
    onnxruntime's HQQ solver over the whole weight (its early stop looks at the mean error
    of all blocks; used at the demo's widths only)."""
    if method not in ACCURACY_LEVEL:
        raise ValueError(f"method {method!r}: expected one of {sorted(ACCURACY_LEVEL)}")
    if bits not in ZERO:
        raise ValueError(f"bits {bits}: expected 4 or 8")
    check_block(k, block, "quantize_rows")
    if bits == 4 and method == "hqq":
        return _hqq(np.asarray(read(0, n), dtype=np.float32), block)
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    blocks = k // block
    packed = np.zeros((n, blocks, block * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero = np.zeros((n, blocks), dtype=np.uint8)  # written by the quantizer, unused when symmetric
    for a in range(0, n, ROW_CHUNK):
        b = min(n, a + ROW_CHUNK)
        w = np.ascontiguousarray(np.asarray(read(a, b), dtype=np.float32).T)  # [k, rows]: the quantizer's B
        fn(packed[a:b], w, scales[a:b], zero[a:b], block, b - a, k, True)
    return Blocks(packed, scales, None, bits, block)


def _hqq(w: np.ndarray, block: int) -> Blocks:
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    q = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block, bits=4))
    ints, scales, zeros = q.quantize_internal(torch.from_numpy(w), bits=4, group_size=block)
    ints = ints.contiguous()
    packed = torch.zeros((ints.shape[0], ints.shape[1] // 2), dtype=torch.uint8)
    q.pack_on_row_fast_248bit(packed, ints, 4)
    n, k = w.shape
    return Blocks(packed.numpy().reshape(n, k // block, block // 2), scales.contiguous().numpy().reshape(-1),
                  zeros.contiguous().numpy().reshape(-1), 4, block)


def dequantize(q: Blocks) -> np.ndarray:
    """fp32 [N, K] of a symmetric `Blocks` (what MatMulNBits and `table_decode_nodes` compute)."""
    if q.zero_points is not None:
        raise ValueError("dequantize: HQQ weights (float zero points) are not decoded here")
    p = q.packed
    ints = np.stack([p & 15, p >> 4], axis=-1).reshape(*p.shape[:2], -1) if q.bits == 4 else p
    vals = (ints.astype(np.float32) - ZERO[q.bits]) * q.scales.reshape(p.shape[0], -1, 1)
    return vals.reshape(p.shape[0], -1)


def table_decode_nodes(ir, ids, packed, scales, bits: int, width: int, name: str) -> tuple[list, object]:
    """Nodes that gather the rows `ids` of a quantized table (`packed`/`scales`: initializer
    values in `Blocks` layout) and decode them to fp32 [*ids.shape, width]: rows are unpacked
    and scaled after the gather, so only the gathered rows are ever decoded. Standard ONNX
    ops only (any runtime). Returns (nodes, output value)."""
    nodes = []

    def const(suffix, array):
        n = ir.node("Constant", [], {"value": ir.tensor(np.asarray(array), name=f"{name}.{suffix}")},
                    name=f"{name}/{suffix}")
        nodes.append(n)
        return n.outputs[0]

    def add(op, inputs, attrs=None, suffix=None):
        n = ir.node(op, inputs, attrs, name=f"{name}/{suffix or op}")
        nodes.append(n)
        return n.outputs[0]

    last = const("last_axis", np.array([-1], dtype=np.int64))
    ints = add("Gather", [packed, ids], {"axis": 0}, "rows")  # [*ids, K/block, blob] uint8
    scale = add("Unsqueeze", [add("Gather", [scales, ids], {"axis": 0}, "scales"), last], suffix="scale_col")
    if bits == 4:  # [*ids, K/block, blob, 2]: low nibble first; the scales broadcast over both
        lo = add("BitwiseAnd", [ints, const("low_mask", np.uint8(15))], suffix="low")
        hi = add("BitShift", [ints, const("shift", np.uint8(4))], {"direction": "RIGHT"}, "high")
        ints = add("Concat", [add("Unsqueeze", [lo, last], suffix="low_col"),
                              add("Unsqueeze", [hi, last], suffix="high_col")], {"axis": -1}, "nibbles")
        scale = add("Unsqueeze", [scale, last], suffix="scale_col2")
    vals = add("Sub", [add("Cast", [ints], {"to": 1}, "float"), const("zero", np.float32(ZERO[bits]))], suffix="centre")
    out_shape = add("Concat", [add("Shape", [ids], suffix="ids_shape"), const("width", np.array([width], dtype=np.int64))],
                    {"axis": 0}, "out_shape")
    return nodes, add("Reshape", [add("Mul", [vals, scale], suffix="scaled"), out_shape], suffix="rows_fp32")


def matmul_nbits_node(ir, x, packed, scales, zero_points, k: int, n: int, bits: int, block: int, level: int, name: str):
    """onnxruntime's MatMulNBits over `Blocks` initializer values (x [..., K] -> [..., N])."""
    inputs = [x, packed, scales] + ([zero_points] if zero_points is not None else [])
    return ir.node("MatMulNBits", inputs, {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": level},
                   domain="com.microsoft", name=name)


def linear_graph(w: np.ndarray, bits: int | None, block: int = 32, method: str = "rtn-a8", level: int | None = None):
    """A one-linear ONNX model (x [1, T, K] -> y [1, T, N]) over the [N, K] weight `w`: fp32
    MatMul (bits None) or MatMulNBits made by `quantize_rows` (the bench's and tests' graph),
    computed at the method's accuracy level unless `level` says otherwise."""
    import onnx_ir as ir

    n, k = w.shape
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, "T", k]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 20, "com.microsoft": 1}, name="linear")

    def init(name, array):
        v = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        graph.register_initializer(v)
        return v

    if bits is None:
        node = ir.node("MatMul", [x, init("w_t", w.T)], name="linear")
    else:
        q = quantize_rows(lambda a, b: w[a:b], n, k, bits, block, method)
        zp = init("zero_points", q.zero_points) if q.zero_points is not None else None
        node = matmul_nbits_node(ir, x, init("packed", q.packed), init("scales", q.scales), zp, k, n, bits, block,
                                 ACCURACY_LEVEL[method] if level is None else level, "linear")
    graph.append(node)
    node.outputs[0].name = "y"
    graph.outputs.append(node.outputs[0])
    return ir.Model(graph, ir_version=10)


def bench(k: int, n: int, rows=(1, 5, 64), threads: int = 1) -> dict:
    """Milliseconds per call of one k x n linear: fp32 MatMul against MatMulNBits made by
    `quantize_rows` with each method, 4-bit and 8-bit weights, at each row count (best of 5
    after a warm-up call, `threads` intra-op threads). Also whether each row's result is
    identical alone and inside the batch."""
    import onnx_ir as ir
    import onnxruntime as ort

    w = (np.random.RandomState(1).randn(n, k) / np.sqrt(k)).astype(np.float32)
    x = np.random.RandomState(0).randn(1, max(rows), k).astype(np.float32)
    out: dict = {"k": k, "n": n, "threads": threads, "ms": {}, "rows_identical_alone_and_in_batch": {}}
    graphs = {"fp32": linear_graph(w, None)}
    for method in ACCURACY_LEVEL:
        for bits in (4, 8):
            graphs[f"{method} int{bits}"] = linear_graph(w, bits, 32, method)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    for name, model in graphs.items():
        sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        out["ms"][name] = {}
        same = True
        for r in rows:
            feed = {"x": x[:, :r]}
            batch = sess.run(None, feed)[0]
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times.append(time.perf_counter() - t0)
            out["ms"][name][r] = round(1000 * min(times), 3)
            if r > 1:
                same &= all(np.array_equal(sess.run(None, {"x": x[:, i : i + 1]})[0][0, 0], batch[0, i]) for i in range(r))
        out["rows_identical_alone_and_in_batch"][name] = bool(same)
    return out


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m export.quantize_onnx",
                                 description="MatMulNBits methods against fp32 on one linear (ms per call)")
    ap.add_argument("--bench", nargs=2, type=int, metavar=("K", "N"), required=True,
                    help="the linear's input and output sizes (E4B: 2560 10240 for an MLP, 2560 65536 for a quarter LM head)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    res = bench(*args.bench, threads=args.threads)
    rows = list(next(iter(res["ms"].values())))
    print(f"linear {res['k']} x {res['n']}, {res['threads']} thread(s): ms per call")
    print(f"  {'weights':<14}" + "".join(f"{f'{r} rows':>10}" for r in rows) + "  rows identical alone / in batch")
    for name, ms in res["ms"].items():
        print(f"  {name:<14}" + "".join(f"{ms[r]:>10.2f}" for r in rows) + f"  {res['rows_identical_alone_and_in_batch'][name]}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
