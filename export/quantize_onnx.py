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

`python -m export.quantize_onnx --bench K N` measures these on one K x N linear.

Kept apart from export/quantize.py so that the cached ExecuTorch programs (keyed by their
exporter's sources) do not depend on it.
"""

from __future__ import annotations

import time
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


def bench(k: int, n: int, rows=(1, 5, 64), threads: int = 1) -> dict:
    """Milliseconds per call of one k x n linear: fp32 MatMul against MatMulNBits made by
    `quantize_onnx_graph` with each method, 4-bit and 8-bit weights, at each row count
    (best of 5 after a warm-up call, `threads` intra-op threads). Also whether each row's
    result is identical alone and inside the batch."""
    import shutil
    import tempfile

    import numpy as np
    import onnxruntime as ort
    import torch

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(k, n, bias=False)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    x = np.random.RandomState(0).randn(1, max(rows), k).astype(np.float32)
    out: dict = {"k": k, "n": n, "threads": threads, "ms": {}, "rows_identical_alone_and_in_batch": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "fp32" / "g.onnx"
        base.parent.mkdir()
        tokens = torch.export.Dim("tokens", min=1, max=max(rows))
        with torch.no_grad():
            torch.onnx.export(Linear().eval(), (torch.zeros(1, 2, k),), input_names=["x"], output_names=["y"],
                              dynamic_shapes=({1: tokens},), dynamo=True, opset_version=20,
                              verbose=False).save(str(base), external_data=True)
        paths = {"fp32": base}
        for method in ACCURACY_LEVEL:
            for bits in (4, 8):
                d = Path(tmp) / f"{method}-int{bits}"
                shutil.copytree(base.parent, d)
                quantize_onnx_graph(d / "g.onnx", 32, ["lin"] if bits == 8 else [], method)
                paths[f"{method} int{bits}"] = d / "g.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        for name, path in paths.items():
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
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
