"""The quantization recipe's building blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from export.quantize import Int8Table, quantize_for_executorch, quantize_tables


def test_int8_table_error_is_within_half_a_step_per_row():
    torch.manual_seed(0)
    table = nn.Embedding(64, 16)
    table.weight.data[3] *= 50  # rows of very different scale each get their own step
    q = Int8Table.of(table)
    ids = torch.arange(64)
    err = (q(ids) - table(ids)).abs()
    step = table.weight.abs().amax(dim=1, keepdim=True) / 127
    assert bool((err <= step / 2 + 1e-7).all())
    assert q.q.dtype == torch.int8


def test_shared_tables_are_quantized_once_and_tied_heads_untied():
    emb = nn.Embedding(32, 32)
    head = nn.Linear(32, 32, bias=False)
    head.weight = emb.weight  # tied, as Gemma's LM head
    a, b = nn.ModuleDict({"emb": emb, "head": head}), nn.ModuleDict({"same": emb})
    report = quantize_for_executorch([a, b], "8da4w", 32, "int8", keep_8bit=["head"])
    assert report["embeddings"] == 1 and isinstance(a["emb"], Int8Table) and a["emb"] is b["same"]
    assert report["linears_int8"] == 1 and report["linears_int4"] == 0  # the head kept at 8 bits


def test_quantize_tables_keeps_the_gemma_embedding_scale():
    from export.config import preset

    from export.hf_compat import patch_transformers

    patch_transformers()
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(0)
    model = Gemma4ForCausalLM(preset("demo").target.to_hf()).eval()
    ids = torch.randint(0, 2048, (1, 9))
    ref = model.model.embed_tokens(ids)
    assert quantize_tables([model]) == 2  # token table and PLE table
    out = model.model.embed_tokens(ids)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-2  # int8: ~0.4% of the row max


def test_keep_8bit_pattern_that_matches_nothing_is_refused():
    import pytest

    model = nn.ModuleDict({"head": nn.Linear(32, 32, bias=False)})
    with pytest.raises(ValueError, match=r"keep_8bit pattern\(s\) \['lm_haed'\] match no linear"):
        quantize_for_executorch([model], "8da4w", 32, "fp32", keep_8bit=["head", "lm_haed"])


def test_int4_table_error_is_within_half_a_step_per_group():
    from export.quantize import Int4Table

    torch.manual_seed(0)
    table = nn.Embedding(64, 256)
    table.weight.data[3, :128] *= 50  # groups of very different scale each get their own step
    q = Int4Table.of(table, group=128)
    ids = torch.arange(64)[None]
    err = (q(ids) - table(ids)).abs().reshape(64, 2, 128)
    step = table.weight.reshape(64, 2, 128).abs().amax(dim=2, keepdim=True) / 7
    # half a step, plus the fp16 rounding of the scale (relative 2**-11, times at most 8 steps)
    assert bool((err <= step / 2 + 8 * step * 2**-11 + 1e-7).all())
    assert q.packed.dtype == torch.int8 and q.packed.numel() == 64 * 128  # two values per byte
    assert (err[3, 0].max() > err[3, 1].max())  # the scaled group has the coarser step


def test_int4_table_runs_the_same_in_executorch():
    """The unpacking (gather, remainder, floor division, stack) on ExecuTorch's portable
    kernels gives the eager values: the same fp32 ops on the same integers."""
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from export.quantize import Int4Table

    torch.manual_seed(0)
    table = nn.Embedding(300, 256)
    q = Int4Table.of(table, group=128)
    ids = torch.tensor([[0, 5, 299, 17, 5]])
    prog = to_edge_transform_and_lower(torch.export.export(q, (ids,))).to_executorch()
    out = Runtime.get().load_program(prog.buffer).load_method("forward").execute([ids])[0]
    assert torch.equal(out, q(ids))


def test_table_rows_are_read_in_chunks():
    """from_rows with chunks smaller than the table gives the table of one whole read."""
    from export.quantize import Int4Table

    torch.manual_seed(0)
    w = torch.randn(100, 256, dtype=torch.bfloat16)
    reads = []

    def read(a, b):
        reads.append((a, b))
        return w[a:b]

    for cls in (Int8Table, Int4Table):
        reads.clear()
        chunked, whole = cls.from_rows(read, 100, chunk=32), cls.from_rows(lambda a, b: w[a:b], 100, chunk=1000)
        assert reads == [(0, 32), (32, 64), (64, 96), (96, 100)]
        assert all(torch.equal(x, y) for x, y in zip(chunked.buffers(), whole.buffers()))


@pytest.mark.parametrize("bits", [4, 8])
def test_large_linears_quantized_by_row_blocks_equal_one_piece(monkeypatch, bits):
    """Row blocks (bounded memory for a 262144-row LM head) give the weights and outputs of
    quantizing the whole matrix at once: every scale belongs to one row."""
    import export.quantize as qz

    torch.manual_seed(0)
    whole, blocks = nn.Linear(64, 100, bias=False), nn.Linear(64, 100, bias=False)
    blocks.weight.data.copy_(whole.weight.data)
    keep = ["x"] if bits == 8 else []
    qz.LinearRecipe("8da4w", 32, keep).quantize(nn.ModuleDict({"x": whole}))
    monkeypatch.setattr(qz, "LINEAR_CHUNK_ROWS", 32)
    qz.LinearRecipe("8da4w", 32, keep).quantize(nn.ModuleDict({"x": blocks}))
    for name in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(whole.weight, name), getattr(blocks.weight, name)), name
    x = torch.randn(3, 64)
    assert torch.equal(whole(x), blocks(x))


class _TwoLinears(nn.Module):
    """A token table feeding two linears (`self_attn` kept at 8 bits by the recipe below)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(1000, 256)
        self.mlp = nn.Linear(256, 512, bias=False)
        self.self_attn = nn.Linear(512, 256, bias=False)

    def forward(self, ids, x):
        return self.self_attn(torch.relu(self.mlp(x + self.embed(ids))))


def _two_linears_graph(path, recipe):
    """_TwoLinears exported the way export/onnx_export.py does (optimizer off, weights written
    by export/onnx_weights.py) -> (module, counts)."""
    from export.onnx_weights import Weights, write_graph

    module = _TwoLinears().eval()
    tokens = torch.export.Dim("tokens", min=1, max=64)
    with torch.no_grad():
        prog = torch.onnx.export(module, (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, 256)),
                                 input_names=["ids", "x"], output_names=["y"], dynamic_shapes=({1: tokens}, {1: tokens}),
                                 dynamo=True, optimize=False, opset_version=20, verbose=False)
    return module, write_graph(prog.model, path, Weights(module), recipe)


@pytest.mark.parametrize("method", ["hqq", "rtn-a8"])
def test_onnx_methods_write_their_matmulnbits(tmp_path, method):
    """Both MatMulNBits methods, weights quantized as the graph is written: every linear
    quantized (keep_8bit -> 8 bits), rtn-a8 without zero points and with accuracy_level 4,
    the table as int4 rows; outputs within 4-bit error of the fp32 module. rtn-a8 also gives
    each row the same result alone as inside a verify-sized or prefill-sized call."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    recipe = {"linear": "int4", "block_size": 32, "keep_8bit": ["self_attn"], "method": method, "embedding": "int4"}
    module, counts = _two_linears_graph(tmp_path / "g.onnx", recipe)
    assert counts == {"int4": 1, "int8": 1, "fp32_linears": 0, "tables": 1, "keep_8bit_matched": ["self_attn"]}
    path = tmp_path / "g.onnx"
    nodes = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
    levels = {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) for n in nodes}
    assert levels == {4 if method == "rtn-a8" else 0}
    if method == "rtn-a8":
        assert all(len(n.input) == 3 for n in nodes)  # A, B, scales: no zero points
    ids = np.random.RandomState(1).randint(0, 1000, (1, 64)).astype(np.int64)
    x = np.random.RandomState(0).randn(1, 64, 256).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(ids), torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"ids": ids, "x": x})[0]
    # 4-bit blocks of 32 (error at most half a step, step = block max / 7) on random weights:
    # measured 0.06-0.07 relative in norm; a wrong scale, nibble order or a transposed weight is ~1
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.15
    if method == "rtn-a8":
        for n in (5, 64):  # a verify pass, a prefill chunk
            batch = sess.run(None, {"ids": ids[:, :n], "x": x[:, :n]})[0]
            for r in range(n):
                np.testing.assert_array_equal(
                    sess.run(None, {"ids": ids[:, r : r + 1], "x": x[:, r : r + 1]})[0][0, 0], batch[0, r])


@pytest.mark.parametrize("bits,method", [(4, "rtn-a8"), (8, "rtn-a8"), (4, "hqq"), (8, "hqq")])
def test_quantize_rows_equals_onnxruntime_quantizer(bits, method, monkeypatch):
    """Our per-weight quantizer (row blocks read one at a time) writes the bytes onnxruntime's
    own whole-graph MatMulNBitsQuantizer writes for the same weight (the independent
    reference), also when the rows are quantized in several chunks."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from export import quantize_onnx

    n, k = 96, 128
    w = np.random.RandomState(2).randn(n, k).astype(np.float32)
    if method == "rtn-a8" or bits == 8:
        monkeypatch.setattr(quantize_onnx, "ROW_CHUNK", 40)  # three chunks, the last one short
    ours = quantize_onnx.quantize_rows(lambda a, b: w[a:b], n, k, bits, 32, method)

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    level = quantize_onnx.ACCURACY_LEVEL[method]
    if bits == 4 and method == "hqq":
        algo = HQQWeightOnlyQuantConfig(block_size=32, bits=4)
    else:
        algo = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=level, bits=bits)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True, accuracy_level=level, algo_config=algo)
    q.process()
    theirs = {t.name.rsplit("_", 1)[-1] if not t.name.endswith("zero_points") else "zero_points":
              numpy_helper.to_array(t) for t in q.model.model.graph.initializer}
    packed = next(v for name, v in theirs.items() if name.startswith("Q"))
    np.testing.assert_array_equal(ours.packed, packed)
    np.testing.assert_array_equal(ours.scales, theirs["scales"])
    if ours.zero_points is not None:
        np.testing.assert_array_equal(ours.zero_points, theirs["zero_points"])
    else:
        assert "zero_points" not in theirs


@pytest.mark.parametrize("bits", [4, 8])
def test_table_decode_reads_the_bytes_matmulnbits_reads(bits):
    """A quantized table's gathered rows, decoded by `table_decode_nodes`, equal the rows of
    `dequantize`, and onnxruntime's MatMulNBits over the same bytes computes x @ dequantize.T:
    the one layout serves the token table and the tied LM head."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort

    from export.quantize_onnx import dequantize, linear_graph, quantize_rows, table_decode_nodes

    n, k = 300, 64
    w = np.random.RandomState(3).randn(n, k).astype(np.float32)
    q = quantize_rows(lambda a, b: w[a:b], n, k, bits, 32)
    deq = dequantize(q)
    # within one step of each block (onnxruntime maps the block's absolute maximum to -8 or
    # -128, signed scale: half a step inside, up to one where the other side clamps at 7 or
    # 127); a wrong nibble order or zero point is several steps off
    assert np.all(np.abs(deq - w) <= np.abs(np.repeat(q.scales, 32, axis=1)) * (1 + 1e-6))

    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, "T"]))
    graph = ir.Graph([ids], [], nodes=[], opset_imports={"": 20}, name="table")
    inits = []
    for name, array in (("packed", q.packed), ("scales", q.scales)):
        inits.append(ir.Value(name=name, const_value=ir.tensor(array, name=name)))
        graph.register_initializer(inits[-1])
    nodes, out = table_decode_nodes(ir, ids, *inits, bits, k, "t")
    graph.extend(nodes)
    out.name = "rows"
    graph.outputs.append(out)
    sess = ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    pick = np.array([[0, 299, 17, 17, 150]], dtype=np.int64)
    np.testing.assert_array_equal(sess.run(None, {"ids": pick})[0], deq[pick])

    # the same bytes as a linear, computed in fp32 (accuracy level 0: no int8 activations)
    lin = ort.InferenceSession(ir.to_proto(linear_graph(w, bits, 32, "rtn-a8", level=0)).SerializeToString(),
                               providers=["CPUExecutionProvider"])
    x = np.random.RandomState(4).randn(1, 3, k).astype(np.float32)
    # fp32 sums of 64 products in another order: ~1e-6 relative; a misread layout is ~1
    np.testing.assert_allclose(lin.run(None, {"x": x})[0], x @ deq.T, rtol=1e-4, atol=1e-4)
