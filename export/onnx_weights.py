"""The weights of one ONNX graph, rewritten and written one tensor at a time.

The graphs are traced from a pair whose large tensors are placeholders
(`load_pair(lazy=True)`: one zero expanded to the shape, the tensor left in the checkpoint);
the exporter is run without its optimizer (which would fold transposes of the placeholders
into real tensors). `write_graph` then, on the exported graph (onnx_ir):
1. each MatMul whose weight is a model parameter reached through a Transpose (an nn.Linear):
   fp32: the weight stored transposed; quantized: onnxruntime's MatMulNBits, 4-bit, or 8-bit
   where the linear's module path (or the parameter's name) contains one of `keep_8bit`
   (export/quantize_onnx.py);
2. each Gather from a parameter table (token, PLE and drafter candidate-row tables), when the
   recipe quantizes tables: the table in the same block layout (int8 or int4 rows with
   scales) and the nodes that decode the gathered rows;
3. every other parameter as it is (fp32);
4. nodes and initializers left unused removed, onnxscript's optimizer (constant folding of
   the small constants; it folds no large tensor), then saved with external data. Each
   tensor is computed when it is written (onnx_ir's LazyTensor): read from the checkpoint,
   converted or quantized, written, dropped, so the peak is one tensor (large tables and LM
   heads: one block of rows while quantizing, then its packed form).
In-memory pairs (tests, small models) go through the same path: their parameters are read
from memory instead of the checkpoint.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.quantize_onnx import (
    ACCURACY_LEVEL,
    Blocks,
    check_block,
    matmul_nbits_node,
    quantize_rows,
    table_decode_nodes,
)

TABLE_BITS = {"int8": 8, "int4": 4}


@dataclass
class Param:
    """A model parameter as the writer sees it: its name, shape and a row reader."""

    name: str  # the parameter's name in its model
    uid: str  # unique across the exported models ("<model index>.<name>": target and drafter share names)
    shape: tuple
    read: object  # (a, b) -> fp32 numpy rows a..b-1

    parts: tuple = ()  # a stacked linear's parameters, in row order (`stacked`)

    def full(self) -> np.ndarray:
        return self.read(0, self.shape[0]) if self.shape else self.read(None, None)


def stacked(params: list[Param]) -> Param:
    """[sum N, K]: the rows of each [N_i, K] parameter in turn (linears of one input)."""
    ends = np.cumsum([p.shape[0] for p in params])

    def read(a, b):
        rows, start = [], 0
        for p, end in zip(params, ends):
            lo, hi = max(a, start), min(b, end)
            if lo < hi:
                rows.append(p.read(lo - start, hi - start))
            start = end
        return np.concatenate(rows)

    return Param("+".join(p.name for p in params), "+".join(p.uid for p in params),
                 (int(ends[-1]), params[0].shape[1]), read, tuple(params))


class Weights:
    """The floating parameters and buffers of the exported modules (placeholders of a lazy
    load included), found from an initializer's torch tensor (its data pointer: the exporter
    wraps the module's own tensors)."""

    def __init__(self, *models):
        self.by_ptr: dict[int, Param] = {}
        for index, m in enumerate(models):
            if m is None:
                continue
            lazy = getattr(m, "weight_sources", {})
            for name, p in [*m.named_parameters(), *m.named_buffers()]:
                ptr = p.data_ptr()
                if ptr in self.by_ptr or not p.is_floating_point() or (ptr not in lazy and p.numel() <= 1):
                    continue
                if ptr in lazy:
                    ckpt, key = lazy[ptr]
                    rows = ckpt.rows(key)
                    read = lambda a, b, rows=rows: rows(a, b).float().numpy()  # noqa: E731
                else:
                    t = p.detach()
                    read = lambda a, b, t=t: (t if a is None else t[a:b]).float().numpy()  # noqa: E731
                self.by_ptr[ptr] = Param(name, f"{index}.{name}", tuple(p.shape), read)

    def find(self, value) -> Param | None:
        if value is None or value.const_value is None:
            return None
        raw = getattr(value.const_value, "raw", None)
        return self.by_ptr.get(raw.data_ptr()) if isinstance(raw, torch.Tensor) else None


class Quantized:
    """Quantized weights of one export, computed once: the packed data and the scales of a
    weight are written one after the other, and a table several graphs hold (the token table:
    embed, the tied LM head, every drafting-round graph) is quantized once for all. Results
    stay cached up to `budget` bytes (least recently used first out); a larger one is kept
    only until the next weight is quantized (the E4B PLE table: 1.4 GB at int4)."""

    def __init__(self, budget: int = 1 << 30):
        self.budget, self.entries = budget, OrderedDict()

    def get(self, param: Param, bits: int, block: int, method: str) -> Blocks:
        key = (param.uid, bits, block, method)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        if param.parts:  # a stacked linear: its parts' blocks, row after row
            blocks = [self.get(p, bits, block, method) for p in param.parts]
            cat = lambda name: None if getattr(blocks[0], name) is None else np.concatenate(  # noqa: E731
                [getattr(b, name) for b in blocks])
            return Blocks(cat("packed"), cat("scales"), cat("zero_points"), bits, block)
        for old in [k for k, v in self.entries.items() if _nbytes(v) > self.budget]:
            del self.entries[old]  # drop an oversized previous weight before computing the next
        value = quantize_rows(param.read, *param.shape, bits, block, method)
        self.entries[key] = value
        while len(self.entries) > 1 and sum(_nbytes(v) for v in self.entries.values()) > self.budget:
            self.entries.popitem(last=False)
        return value


def _nbytes(q: Blocks) -> int:
    return q.packed.nbytes + q.scales.nbytes + (q.zero_points.nbytes if q.zero_points is not None else 0)


def _lazy(ir, name: str, dtype, shape, fn):
    return ir.Value(name=name, const_value=ir.LazyTensor(lambda: ir.tensor(fn(), name=name), dtype=dtype,
                                                         shape=ir.Shape(list(shape)), name=name))


def _replace(graph, node, value) -> None:
    """`value` takes the place (uses, name, type) of `node`'s single output; `node` goes."""
    old = node.outputs[0]
    old.replace_all_uses_with(value, replace_graph_outputs=True)
    name, shape, type_ = old.name, old.shape, old.type
    graph.remove(node, safe=True)
    old.name = None
    value.name, value.shape, value.type = name, shape, type_


def write_graph(model, path: Path, weights: Weights, recipe: dict | None, cache: Quantized | None = None) -> dict:
    """Rewrite `model` (an onnx_ir Model from the exporter) per the module docstring and save it
    to `path` with its weights in `path.name + '.data'`. recipe: None (fp32) or the target's ONNX
    quantization (block_size, keep_8bit, method, embedding: "int8" / "int4" / "fp32").
    Returns counts: int4 / int8 MatMulNBits, fp32 linears, quantized tables, and the
    `keep_8bit` patterns that matched a linear (`keep_8bit_matched`)."""
    import onnx_ir as ir
    import onnxscript.optimizer

    graph = model.graph
    cache = cache if cache is not None else Quantized()
    counts = {"int4": 0, "int8": 0, "fp32_linears": 0, "tables": 0}
    matched: set[str] = set()
    table_bits = TABLE_BITS.get((recipe or {}).get("embedding", "fp32"))
    new_inits: dict[tuple, object] = {}

    def init(key, value):
        if key not in new_inits:
            new_inits[key] = value
            graph.register_initializer(value)
        return new_inits[key]

    def blocks_inputs(param: Param, bits: int, method: str, block: int):
        q = lambda: cache.get(param, bits, block, method)  # noqa: E731
        n, k = param.shape
        check_block(k, block, param.name)  # here, not when the tensor is written
        blob, packed_shape = block * bits // 8, (n, k // block)
        hqq = bits == 4 and method == "hqq"
        tag = f"{param.uid}.q{bits}{'hqq' if hqq else ''}"
        packed = init((tag, "packed"), _lazy(ir, f"{tag}.packed", ir.DataType.UINT8, (*packed_shape, blob),
                                             lambda: q().packed))
        scales = init((tag, "scales"), _lazy(ir, f"{tag}.scales", ir.DataType.FLOAT,
                                             (n * k // block,) if hqq else packed_shape, lambda: q().scales))
        zp = None
        if hqq:
            zp = init((tag, "zero_points"), _lazy(ir, f"{tag}.zero_points", ir.DataType.FLOAT, (n * k // block,),
                                                  lambda: q().zero_points))
        return packed, scales, zp

    def linear_param(node):
        """The parameter of a MatMul over a model linear's weight (x @ W^T), or None."""
        if node is None or node.op_type != "MatMul" or node.domain != "":
            return None
        t = node.inputs[1].producer()
        if t is None or t.op_type != "Transpose":
            return None
        param = weights.find(t.inputs[0])
        perm = t.attributes.get("perm")
        if param is None or len(param.shape) != 2 or (perm is not None and list(perm.as_ints()) != [1, 0]):
            return None
        return param

    def bits_of(node, param):
        """8 where the linear's module path (a tied LM head's parameter is named after the
        table) contains a `keep_8bit` pattern, else 4; the patterns hit."""
        scope = node.metadata_props.get("pkg.torch.onnx.name_scopes", "") + " " + param.name
        hits = {s for s in recipe["keep_8bit"] if s in scope}
        return (8 if hits else 4), hits

    def emit_linear(node, x, param, bits, hits):
        """`node`'s output (x @ W^T) computed by the linear's stored form: fp32 MatMul over
        the transposed weight, or MatMulNBits."""
        nonlocal matched
        n, k = param.shape
        if recipe is None or recipe.get("linear", "int4") == "fp32":
            wt = init((param.uid, "t"), _lazy(ir, f"{param.uid}.transposed", ir.DataType.FLOAT, (k, n),
                                               lambda p=param: np.ascontiguousarray(p.full().T)))
            if node.op_type == "MatMul":
                node.replace_input_with(1, wt)
            else:
                mm = ir.node("MatMul", [x, wt], name=f"{node.name}/linear")
                graph.insert_before(node, mm)
                _replace(graph, node, mm.outputs[0])
            counts["fp32_linears"] += 1
            return
        matched |= hits
        method, block = recipe["method"], recipe["block_size"]
        packed, scales, zp = blocks_inputs(param, bits, method, block)
        q = matmul_nbits_node(ir, x, packed, scales, zp, k, n, bits, block, ACCURACY_LEVEL[method], f"{node.name}/nbits")
        graph.insert_before(node, q)
        _replace(graph, node, q.outputs[0])
        counts[f"int{bits}"] += 1

    # Linears of one input concatenated on their output dim (a cache owner's q, k, v
    # projections: export/modules.py) become one linear over the stacked weights: one
    # MatMul node instead of three and a concat, a wider GEMM. Quantized, the stacked weight
    # is its parts' blocks one after the other (the same numbers as unmerged).
    for node in list(graph):
        if node.op_type != "Concat" or node.domain != "" or len(node.inputs) < 2:
            continue
        rank = node.outputs[0].shape.rank() if node.outputs[0].shape is not None else None
        axis = node.attributes.get("axis").as_int()
        parts = [v.producer() for v in node.inputs]
        params = [linear_param(p) for p in parts]
        if rank is None or axis not in (-1, rank - 1) or any(p is None for p in params):
            continue
        x = parts[0].inputs[0]
        if any(p.inputs[0] is not x or len(p.outputs[0].uses()) != 1 for p in parts) or \
                len({p.shape[1] for p in params}) != 1:
            continue
        bits = hits = None
        if recipe is not None and recipe.get("linear", "int4") != "fp32":
            found = [bits_of(p, w) for p, w in zip(parts, params)]
            if len({b for b, _ in found}) != 1:
                continue  # parts stored at different widths stay apart
            bits, hits = found[0][0], set().union(*(h for _, h in found))
        emit_linear(node, x, stacked(params), bits, hits)
        for p in parts:  # read by nothing now: not to be written as linears of their own below
            graph.remove(p, safe=True)

    for node in list(graph):
        param = linear_param(node)
        if param is not None:
            bits, hits = bits_of(node, param) if recipe is not None else (None, None)
            emit_linear(node, node.inputs[0], param, bits, hits)
        elif node.op_type == "Gather" and node.domain == "" and table_bits is not None:
            param = weights.find(node.inputs[0])
            axis = node.attributes.get("axis")
            if param is None or len(param.shape) != 2 or (axis is not None and axis.as_int() != 0):
                continue
            packed, scales, _ = blocks_inputs(param, table_bits, "rtn-a8", recipe["block_size"])
            nodes, out = table_decode_nodes(ir, node.inputs[1], packed, scales, table_bits, param.shape[1],
                                            f"{node.name}/table")
            graph.insert_before(node, nodes)
            _replace(graph, node, out)
            counts["tables"] += 1

    ir.passes.common.RemoveUnusedNodesPass()(model)  # the weights' transposes, the replaced tables
    # remaining parameters as they are; placeholders must never be written as zeros
    for value in list(graph.initializers.values()):
        param = weights.find(value)
        if param is not None and not value.uses():
            graph.initializers.pop(value.name)
        elif param is not None:
            value.const_value = ir.LazyTensor(lambda p=param, name=value.name: ir.tensor(p.full(), name=name),
                                              dtype=ir.DataType.FLOAT, shape=ir.Shape(list(param.shape)),
                                              name=value.name)
        else:  # a placeholder the exporter copied would be written as zeros: refuse
            raw = getattr(value.const_value, "raw", None)
            if isinstance(raw, torch.Tensor) and raw.numel() > 1 and 0 in raw.stride():
                raise RuntimeError(f"internal: initializer {value.name} is a copy of a lazily loaded weight; "
                                   "export from a fully loaded pair (load_pair without lazy=True)")
    if recipe is not None:
        counts["keep_8bit_matched"] = sorted(matched)
    quiet = logging.getLogger("onnx_ir")  # its passes log every folded constant at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        onnxscript.optimizer.optimize(model)  # dead code, small constants folded
    finally:
        quiet.setLevel(level)
    if any(n.domain == "com.microsoft" for n in graph):
        model.opset_imports.setdefault("com.microsoft", 1)
    path = Path(path)
    data = path.with_name(path.name + ".data")
    ir.save(model, path, external_data=data.name)
    return counts
