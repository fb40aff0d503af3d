"""ONNX export of the target and drafter steps.

Steps:
1. load the pair (strict) and fix the cache layout (max context, max draft -> ring slots);
2. export the graphs with the dynamo exporter (opset 20), weights as external data:
   - `embed.onnx`: input_ids -> inputs_embeds, per_layer_inputs (the embedding table and
     the PLE table live only here; the drafter gets its token embedding from this graph);
   - `target.onnx`: inputs_embeds, per_layer_inputs, position_ids, logit_index,
     past_key_values.{i}.key/value (cache owners only) -> logits (of the rows logit_index
     names, at most max_draft + 1: the call's last positions), last_hidden_state (of the same
     rows; the KV-shared layers compute only those), present.{i}.key/value; the token
     count is dynamic (prefill chunk, decode, verify);
   - `drafter.onnx`: inputs_embeds, position_ids, shared_kv.{full,sliding}_attention.{key,value}
     -> logits, projected_state (one step, the community layout);
   - `drafter_k{k}.onnx` for k = 1..max_draft: input_ids, state, position_ids, shared_kv.*
     -> draft_tokens [1, k]: a whole drafting round in one call (`DraftTokens`: token
     embedding, k steps, argmax inside), the runtime's fast path;
3. `onnx.checker` on each graph, then `check_graphs`: names, opset and cache shapes as the
   layout says (sliding caches are window caches of window + 64 + CALL_TOKENS slots, full
   caches max_context: runtime/artifacts.py);
4. each graph's weights written one at a time as they are read (export/onnx_weights.py:
   linears stored transposed in fp32 or as MatMulNBits, tables optionally quantized), then
   external data deduplicated across graphs (export/onnx_data.py): a tensor several graphs
   hold (the token embedding table: embed + drafter_k graphs; the drafter weights) is
   stored once and listed in `layout.json` so the runtime loads it once for all sessions;
5. `layout.json` records what a runtime needs (names, shapes, producers, ids, sizes).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from export.config import TargetSpec
from export.gqa import ONNX_TRANSLATIONS
from export.modules import CacheLayout, DrafterStep, DraftTokens, EmbedStep, TargetStep, layout_dict
from export.onnx_data import dedup_external_data
from export.onnx_weights import Quantized, Weights, write_graph
from runtime.artifacts import LAYOUT_FILE, SHARED_KV_NAMES

OPSET = 20  # Gelu(approximate="tanh") is one op from opset 20
CALL_TOKENS = 256  # tokens per target call (prefill chunk) the window caches are sized for


def draft_graph_name(k: int) -> str:
    return f"drafter_k{k}.onnx"


def graph_order(out_dir: Path) -> list[str]:
    """The graphs of an export directory in a fixed order (first holder of a shared tensor
    keeps it)."""
    names = ["embed.onnx", "target.onnx", "drafter.onnx"]
    k = 1
    while (Path(out_dir) / draft_graph_name(k)).exists():
        names.append(draft_graph_name(k))
        k += 1
    return [n for n in names if (Path(out_dir) / n).exists()]


class _ListCaches(torch.nn.Module):
    """torch.export wants a fixed signature: caches as one list argument."""

    def __init__(self, step: TargetStep):
        super().__init__()
        self.step = step

    def forward(self, inputs_embeds, per_layer_inputs, position_ids, logit_index, caches: list[torch.Tensor]):
        return self.step(inputs_embeds, per_layer_inputs, position_ids, logit_index, *caches)


def _export(module, args, path: Path, input_names, output_names, weights: Weights, recipe: dict | None,
            cache: Quantized, dynamic_shapes=None) -> dict:
    """Trace `module` (its optimizer off: it would fold the placeholders' transposes into real
    tensors) and write the graph with its weights (export/onnx_weights.py)."""
    import onnx

    from export.executorch_export import _memory  # the same progress figure as the .pte's

    t0 = time.time()
    program = torch.onnx.export(
        module,
        args,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        dynamo=True,
        optimize=False,
        custom_translation_table=ONNX_TRANSLATIONS,
        opset_version=OPSET,
        verbose=False,
    )
    traced = time.time() - t0
    counts = write_graph(program.model, path, weights, recipe, cache)
    onnx.checker.check_model(str(path), full_check=False)
    done = ", ".join(f"{k} {v}" for k, v in counts.items() if v and k != "keep_8bit_matched")
    print(f"      {path.name}: traced {traced:.1f}s, written {time.time() - t0 - traced:.1f}s"
          f"{f' ({done})' if done else ''} ({_memory()})", flush=True)
    return counts


def export_onnx(target, drafter, out_dir: Path, max_context: int, max_draft: int, recipe: dict | None = None,
                call_tokens: int = CALL_TOKENS) -> dict:
    """Write embed.onnx, target.onnx, drafter.onnx, drafter_k*.onnx and layout.json into
    out_dir. recipe: the target's ONNX quantization (`OnnxSpec.recipe`; None: fp32), applied as
    each weight is written. call_tokens: the most tokens a target call of our runtime takes
    (its prefill chunk), which sizes the sliding window caches. A pair loaded with
    `load_pair(lazy=True)` is exported in bounded memory (one weight at a time); layout.json's
    `quantization` holds the MatMulNBits counts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = TargetSpec.from_hf(target.config)
    layout = CacheLayout(spec.attention, max_context, max_draft, call_tokens=min(call_tokens, max_context))
    caches = [torch.zeros(layout.shape(i)) for i in layout.owners for _ in range(2)]
    names = layout.cache_names()
    tokens = torch.export.Dim("tokens", min=1, max=max_context)
    rows = torch.export.Dim("logit_rows", min=1, max=max_draft + 1)
    n = 3
    ids = torch.full((1, n), spec.bos_token_id, dtype=torch.long)
    weights, cache = Weights(target, drafter), Quantized()
    counts = {}

    with torch.no_grad():
        print("[onnx] embed graph", flush=True)
        embed = EmbedStep(target).eval()
        counts["embed.onnx"] = _export(embed, (ids,), out_dir / "embed.onnx", ["input_ids"],
                                       ["inputs_embeds", "per_layer_inputs"], weights, recipe, cache,
                                       ({1: tokens},))
        embeds = torch.zeros(1, n, spec.hidden_size)
        ple = torch.zeros(1, n, spec.attention.num_layers, spec.ple_dim)

        print("[onnx] target graph", flush=True)
        step = _ListCaches(TargetStep(target, layout, fused=True)).eval()
        counts["target.onnx"] = _export(
            step,
            (embeds, ple, torch.arange(n)[None], torch.arange(1, n), caches),
            out_dir / "target.onnx",
            ["inputs_embeds", "per_layer_inputs", "position_ids", "logit_index", *names],
            ["logits", "last_hidden_state", *[x.replace("past_key_values", "present") for x in names],
             *shared_output_names(spec.attention)],
            weights,
            recipe,
            cache,
            ({1: tokens}, {1: tokens}, {1: tokens}, {0: rows}, [None] * len(caches)),
        )

        if drafter is not None:
            print("[onnx] drafter graph", flush=True)
            dstep = DrafterStep(drafter, layout).eval()
            shared = [caches[i] for i in layout.shared_cache_indices()]
            inp = torch.zeros(1, 1, 2 * spec.hidden_size)
            counts["drafter.onnx"] = _export(
                dstep,
                (inp, torch.tensor([[n]]), *shared),
                out_dir / "drafter.onnx",
                ["inputs_embeds", "position_ids", *SHARED_KV_NAMES],
                ["logits", "projected_state"],
                weights,
                recipe,
                cache,
            )
            print(f"[onnx] drafting-round graphs k = 1..{max_draft}", flush=True)
            state = torch.zeros(1, 1, spec.hidden_size)
            for k in range(1, max_draft + 1):
                counts[draft_graph_name(k)] = _export(
                    DraftTokens(dstep, target.model.embed_tokens, k).eval(),
                    (ids[:, :1], state, torch.tensor([[n]]), *shared),
                    out_dir / draft_graph_name(k),
                    ["input_ids", "state", "position_ids", *SHARED_KV_NAMES],
                    ["draft_tokens"],
                    weights,
                    recipe,
                    cache,
                )

    info = layout_dict(target, drafter, layout)
    info["quantization"] = {"recipe": recipe, "graphs": counts}
    (out_dir / LAYOUT_FILE).write_text(json.dumps(info, indent=1) + "\n")
    print("[onnx] tensors several graphs hold: stored once", flush=True)
    share_weights(out_dir)
    check_graphs(out_dir)
    return info


def shared_output_names(attention) -> list[str]:
    """The target graph's outputs after the present caches: per KV-shared layer, the cache its
    attention op writes (the producer's entries again; bound to the producer's buffers)."""
    return [f"shared.{i}.{kv}" for i in range(attention.first_shared_layer, attention.num_layers)
            for kv in ("key", "value")]


def share_weights(out_dir: Path) -> dict:
    """Store every tensor that several graphs hold once and record the sharing in
    layout.json (`shared_initializers`); run again after any rewrite of the graphs."""
    out_dir = Path(out_dir)
    shared = dedup_external_data(out_dir, graph_order(out_dir))
    info = json.loads((out_dir / LAYOUT_FILE).read_text())
    info["shared_initializers"] = shared
    (out_dir / LAYOUT_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return shared


def check_graphs(out_dir: Path) -> None:
    """The exported graphs have the names, opset and cache shapes the layout promises."""
    import onnx

    out_dir = Path(out_dir)
    info = json.loads((out_dir / LAYOUT_FILE).read_text())

    def io(path):
        m = onnx.load(str(path), load_external_data=False)
        opset = max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
        if opset < OPSET:
            raise ValueError(f"{path.name}: opset {opset} < {OPSET}")

        def shape(v):
            return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]

        return {v.name: shape(v) for v in m.graph.input}, {v.name: shape(v) for v in m.graph.output}

    ins, outs = io(out_dir / "target.onnx")
    for i in info["cache_owners"]:
        expected = info["cache_shapes"][str(i)]
        for kv in ("key", "value"):
            for name, table in ((f"past_key_values.{i}.{kv}", ins), (f"present.{i}.{kv}", outs)):
                if table.get(name) != expected:
                    raise ValueError(f"target.onnx: {name} has shape {table.get(name)}, layout says {expected}")
    for name in ("inputs_embeds", "per_layer_inputs", "position_ids"):
        if not isinstance(ins[name][1], str):
            raise ValueError(f"target.onnx: {name} has a fixed token count {ins[name][1]}; expected dynamic")
    if "logit_index" not in ins or not isinstance(ins["logit_index"][0], str):
        raise ValueError(f"target.onnx: logit_index {ins.get('logit_index')}; expected a dynamic row count")
    for name in ("logits", "last_hidden_state"):
        if name not in outs:
            raise ValueError(f"target.onnx: output {name} missing")
    if (out_dir / "drafter.onnx").exists():
        d_ins, d_outs = io(out_dir / "drafter.onnx")
        if set(d_outs) != {"logits", "projected_state"}:
            raise ValueError(f"drafter.onnx: outputs {sorted(d_outs)}")
        for k in range(1, info["max_draft"] + 1):
            path = out_dir / draft_graph_name(k)
            if not path.exists():
                raise ValueError(f"{path.name} missing: the drafting-round graphs cover k = 1..{info['max_draft']}")
            k_ins, k_outs = io(path)
            if k_outs.get("draft_tokens") != [1, k] or sorted(k_ins) != sorted(
                ["input_ids", "state", "position_ids", *SHARED_KV_NAMES]
            ):
                raise ValueError(f"{path.name}: inputs {sorted(k_ins)}, outputs {k_outs}")


def copy_tokenizer(checkpoint: Path, out_dir: Path) -> None:
    tok = Path(checkpoint) / "tokenizer.json"
    if tok.is_file():
        shutil.copyfile(tok, Path(out_dir) / "tokenizer.json")
