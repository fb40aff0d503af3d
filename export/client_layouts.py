"""ONNX layouts that other clients load, made from an export's own graphs (no re-export,
no second copy of any weight): graph surgery on `embed.onnx` / `target.onnx` whose
initializers keep pointing at the export's external data.

- onnxruntime-genai (`write_genai_layout`): `genai_decoder.onnx` is embed + target folded
  into one decoder (input_ids, position_ids, past_key_values.{i}.key/value ->
  logits [1, 1, V], present.{i}.key/value): genai's text-only `gemma4_text` decoder feeds
  ids, not embeddings and per-layer inputs, and reads only the last position's logits
  when the graph's logits have a static length of 1. `genai_config.json` beside it: one
  cache per KV-owning layer (layers 0..first_shared-1, the names genai numbers), every
  cache `max_context` slots (slot == position; the sliding layers' window is applied by the
  graph's attention op; the export's window caches are made linear: `_linear_sliding_caches`),
  past and present sharing one buffer (the graph's
  GroupQueryAttention writes the new entries in place), no sliding of the cache or the
  inputs by genai.
- transformers.js (`write_transformers_js_layout`): `onnx/embed_tokens{sfx}.onnx` (our
  embed graph: inputs_embeds and per_layer_inputs, as transformers.js' Gemma 4 expects)
  and `onnx/decoder_model_merged{sfx}.onnx` (the target graph taking num_logits_to_keep
  instead of logit_index), each with its one `<graph>.onnx_data` file: the export's own
  data files are renamed to those names (our graphs and layout.json follow), so the
  weights exist once. `config.json` (model_type gemma4, a text_config, the dtype and
  external-data counts transformers.js reads) and `generation_config.json` at the root.
  sfx is the dtype suffix transformers.js looks for (`_q4` for 4-bit linears).

Neither client runs the drafter: both generate greedily from the target alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.artifacts import LAYOUT_FILE

GENAI_DECODER = "genai_decoder.onnx"
GENAI_CONFIG = "genai_config.json"
CLIENTS = ("onnxruntime-genai", "transformers.js")
# transformers.js picks `<name><suffix>.onnx` by dtype (its DEFAULT_DTYPE_SUFFIX_MAPPING)
WEB_DTYPE = {"fp32": ("fp32", ""), "int4": ("q4", "_q4")}
WEB_EMBED = "embed_tokens"
WEB_DECODER = "decoder_model_merged"
_PREFIX = "client/"  # names of the nodes and constants added here, and of the folded embed graph's


def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _save(model, path: Path) -> None:
    import onnx

    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=False)  # by path: external data beside it


def _const(name: str, values, shape=None):
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(values, dtype=np.int64).reshape(shape if shape is not None else -1), name)


def _set_logits_rows(graph, rows) -> None:
    """Give the logits output a row count: an int (static) or a name (dynamic)."""
    out = next(o for o in graph.output if o.name == "logits")
    dim = out.type.tensor_type.shape.dim[1]
    dim.Clear()
    if isinstance(rows, int):
        dim.dim_value = rows
    else:
        dim.dim_param = rows


def _replace_logit_index(graph, keep_input: str | None) -> None:
    """Drop the logit_index input and compute it in the graph from position_ids: the last
    position ([T - 1]) when keep_input is None, else the last `keep` positions of the call
    (all of them when keep == 0: transformers.js' num_logits_to_keep convention)."""
    from onnx import TensorProto, helper

    inputs = [i for i in graph.input if i.name != "logit_index"]
    if len(inputs) == len(graph.input):
        raise ValueError("target graph has no logit_index input (an export older than format 2?)")
    del graph.input[:]
    graph.input.extend(inputs)
    p = _PREFIX
    graph.initializer.extend([_const(p + "one", [1]), _const(p + "zero", [0]), _const(p + "axis0", [0]),
                              _const(p + "step", 1, ())])
    nodes = [helper.make_node("Shape", ["position_ids"], [p + "tokens"], start=1, end=2, name=p + "tokens")]
    if keep_input is None:
        nodes.append(helper.make_node("Sub", [p + "tokens", p + "one"], ["logit_index"], name=p + "last_row"))
    else:
        graph.input.append(helper.make_tensor_value_info(keep_input, TensorProto.INT64, []))
        nodes += [
            helper.make_node("Reshape", [keep_input, p + "one"], [p + "keep"], name=p + "keep"),
            helper.make_node("Min", [p + "keep", p + "tokens"], [p + "keep_min"], name=p + "keep_min"),
            helper.make_node("Equal", [p + "keep", p + "zero"], [p + "keep_all"], name=p + "keep_all"),
            helper.make_node("Where", [p + "keep_all", p + "tokens", p + "keep_min"], [p + "rows"], name=p + "rows"),
            helper.make_node("Sub", [p + "tokens", p + "rows"], [p + "first"], name=p + "first"),
            helper.make_node("Squeeze", [p + "first", p + "axis0"], [p + "first_s"], name=p + "first_s"),
            helper.make_node("Squeeze", [p + "tokens", p + "axis0"], [p + "tokens_s"], name=p + "tokens_s"),
            helper.make_node("Range", [p + "first_s", p + "tokens_s", p + "step"], ["logit_index"], name=p + "range"),
        ]
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)


def _drop_output(graph, name: str) -> None:
    keep = [o for o in graph.output if o.name != name]
    del graph.output[:]
    graph.output.extend(keep)


def _drop_shared_outputs(graph) -> None:
    """The KV-shared layers' `shared.*` outputs exist for a runtime that binds them to their
    producer's buffers (ours); a client that does not is better off without them
    (onnxruntime keeps them internal)."""
    for o in [o.name for o in graph.output if o.name.startswith("shared.")]:
        _drop_output(graph, o)


def _linear_sliding_caches(graph, layout: dict) -> None:
    """Sliding caches of max_context slots, slot == position, as clients allocate them: the
    export's graph keeps them as window caches whose base the runtime moves
    (runtime/artifacts.py), which a client does not do. Each sliding attention node takes
    the full layers' lengths and the whole RoPE tables instead of the window's (base 0
    always), the sliding caches' inputs and outputs get max_context slots, and the base's
    arithmetic, left unused, goes."""
    if layout.get("sliding_cache") != "window":
        return
    nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    windowed = [n for n in nodes if any(a.name == "local_window_size" for a in n.attribute)]
    full = next(n for n in nodes if n not in windowed)
    producer = {o: n for n in graph.node for o in n.output}
    for n in windowed:
        n.input[5], n.input[6] = full.input[5], full.input[6]  # seqlens_k, total_sequence_length
        for j in (7, 8):  # cos, sin: the table rows of the window -> the table
            rows = producer.get(n.input[j])
            if rows is None or rows.op_type != "Gather":
                raise ValueError(f"{n.name}: RoPE table input {n.input[j]!r} is not a Gather of the table")
            n.input[j] = rows.input[0]
    types = layout["layer_types"]
    for v in [*graph.input, *graph.output]:
        parts = v.name.split(".")
        if parts[0] in ("past_key_values", "present", "shared") and types[int(parts[1])] == "sliding_attention":
            dim = v.type.tensor_type.shape.dim[2]
            dim.Clear()
            dim.dim_value = layout["max_context"]
    _prune(graph)


def _prune(graph) -> None:
    """Drop nodes whose results nothing reads, then initializers nothing reads."""
    while True:
        used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _fold_embed(graph, embed_graph) -> None:
    """Put the embed graph in front of the target graph: its outputs (inputs_embeds,
    per_layer_inputs) feed the target's inputs of those names; every other name of the
    embed graph gets a prefix (the two exports reuse value names); input_ids joins the
    inputs."""
    outs = {o.name for o in embed_graph.output}
    ins = {i.name for i in embed_graph.input}
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in embed_graph.node for a in n.attribute):
        raise ValueError("embed graph has subgraphs; folding it is not supported")

    def rename(name: str) -> str:
        return name if (not name or name in outs or name in ins) else _PREFIX + "embed/" + name

    nodes = []
    for n in embed_graph.node:
        n.input[:] = [rename(x) for x in n.input]
        n.output[:] = [rename(x) for x in n.output]
        n.name = rename(n.name)
        nodes.append(n)
    for t in embed_graph.initializer:
        t.name = rename(t.name)
    for v in embed_graph.value_info:
        v.name = rename(v.name)
    missing = outs - {i.name for i in graph.input}
    if missing:
        raise ValueError(f"target graph lacks the embed graph's outputs {sorted(missing)} as inputs")
    inputs = list(embed_graph.input) + [i for i in graph.input if i.name not in outs]
    del graph.input[:]
    graph.input.extend(inputs)
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    graph.initializer.extend(embed_graph.initializer)
    graph.value_info.extend(embed_graph.value_info)


def _merge_opsets(model, other) -> None:
    have = {o.domain: o for o in model.opset_import}
    for o in other.opset_import:
        if o.domain not in have:
            model.opset_import.append(o)
        elif have[o.domain].version != o.version:
            raise ValueError(f"opset of domain {o.domain!r} differs: {have[o.domain].version} vs {o.version}")


def genai_decoder(onnx_dir: Path):
    """embed.onnx + target.onnx as one decoder for onnxruntime-genai (a ModelProto)."""
    onnx_dir = Path(onnx_dir)
    model = _load(onnx_dir / "target.onnx")
    _linear_sliding_caches(model.graph, json.loads((onnx_dir / LAYOUT_FILE).read_text()))
    embed = _load(onnx_dir / "embed.onnx")
    _merge_opsets(model, embed)
    model.ir_version = max(model.ir_version, embed.ir_version)
    _fold_embed(model.graph, embed.graph)
    _replace_logit_index(model.graph, keep_input=None)
    _set_logits_rows(model.graph, 1)
    _drop_output(model.graph, "last_hidden_state")
    _drop_shared_outputs(model.graph)
    model.graph.name = "gemma4_genai_decoder"
    return model


def genai_config(layout: dict, text_config: dict) -> dict:
    """genai_config.json for `genai_decoder.onnx` (see the module docstring); text_config:
    the target's config.json."""
    max_context = layout["max_context"]
    owners = layout["cache_owners"]
    types = layout["layer_types"]
    shapes = {int(i): s for i, s in layout["cache_shapes"].items()}
    full = [i for i in owners if types[i] != "sliding_attention"]
    if layout.get("sliding_cache") not in ("window", "linear"):
        raise ValueError("ring-cache graphs (an export of an older version): genai's shared buffers need linear caches; "
                         "re-export")
    # window caches become max_context slots in the decoder (`_linear_sliding_caches`)
    linearized = {i for i in owners if layout["sliding_cache"] == "window" and types[i] == "sliding_attention"}
    for i in owners:  # the sizes genai will allocate must be the decoder's static cache shapes
        if shapes[i][2] != max_context and i not in linearized:
            raise ValueError(f"cache of layer {i} has {shapes[i][2]} slots; genai would allocate {max_context}")
    if owners != list(range(len(owners))):
        raise ValueError(f"cache owners {owners} are not layers 0..n-1; genai numbers its caches from 0")
    eos = layout["eos_token_ids"]
    return {
        "model": {
            "type": "gemma4_text",
            "bos_token_id": layout["bos_token_id"],
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": text_config.get("pad_token_id", 0),
            "vocab_size": layout["vocab_size"],
            "context_length": max_context,
            "decoder": {
                "filename": GENAI_DECODER,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": layout["hidden_size"],
                "num_attention_heads": text_config["num_attention_heads"],
                "num_key_value_heads": shapes[owners[0]][1],
                "head_size": shapes[(full or owners)[0]][3],
                "num_hidden_layers": len(owners),
                "inputs": {
                    "input_ids": "input_ids",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "max_length": max_context,
            "min_length": 0,
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_layout(onnx_dir: Path, text_config: dict) -> None:
    """genai_decoder.onnx + genai_config.json into onnx_dir."""
    onnx_dir = Path(onnx_dir)
    layout = json.loads((onnx_dir / LAYOUT_FILE).read_text())
    config = genai_config(layout, text_config)
    decoder = genai_decoder(onnx_dir)
    _save(decoder, onnx_dir / GENAI_DECODER)
    (onnx_dir / GENAI_CONFIG).write_text(json.dumps(config, indent=1) + "\n")


def _data_locations(model) -> set[str]:
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def _own_copies(onnx_dir: Path, model, own: str) -> None:
    """Point every initializer of `model` that lives in another graph's data file (a tied LM
    head stored once, in embed.onnx.data) at a copy appended to `own`: transformers.js loads
    one data file per graph. The export's own graphs keep their offsets into `own`."""
    from export.onnx_data import PAGE, _external, _read

    foreign = [t for t in model.graph.initializer if (_external(t) or {}).get("location", own) != own]
    if not foreign:
        return
    with open(onnx_dir / own, "ab") as out:
        for t in foreign:
            ext = _external(t)
            out.write(b"\0" * (-out.tell() % PAGE))
            offset = out.tell()
            out.write(_read(onnx_dir / ext["location"], int(ext.get("offset", 0)), int(ext["length"])))
            del t.external_data[:]
            for key, value in (("location", own), ("offset", str(offset)), ("length", ext["length"])):
                entry = t.external_data.add()
                entry.key, entry.value = key, value


def rename_data_files(onnx_dir: Path, renames: dict[str, str]) -> None:
    """Rename external data files of onnx_dir and point every graph (and layout.json's
    shared tensors) at the new names."""
    onnx_dir = Path(onnx_dir)
    for old, new in renames.items():
        if (onnx_dir / old).exists():
            (onnx_dir / old).rename(onnx_dir / new)
    for path in sorted(onnx_dir.glob("*.onnx")):
        model = _load(path)
        if not _data_locations(model) & set(renames):
            continue
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location" and e.value in renames:
                    e.value = renames[e.value]
        _save(model, path)
    layout_path = onnx_dir / LAYOUT_FILE
    info = json.loads(layout_path.read_text())
    for entry in info.get("shared_initializers", []):
        entry["file"] = renames.get(entry["file"], entry["file"])
    layout_path.write_text(json.dumps(info, indent=1) + "\n")


def web_decoder(onnx_dir: Path):
    """target.onnx taking num_logits_to_keep instead of logit_index (a ModelProto)."""
    model = _load(Path(onnx_dir) / "target.onnx")
    _linear_sliding_caches(model.graph, json.loads((Path(onnx_dir) / LAYOUT_FILE).read_text()))
    _replace_logit_index(model.graph, keep_input="num_logits_to_keep")
    _set_logits_rows(model.graph, "logit_rows")
    _drop_output(model.graph, "last_hidden_state")
    _drop_shared_outputs(model.graph)
    model.graph.name = "gemma4_decoder"
    return model


def write_transformers_js_layout(onnx_dir: Path, linear: str, text_config: dict, generation_config: dict | None) -> None:
    """The transformers.js files (see the module docstring) into onnx_dir and its parent."""
    onnx_dir = Path(onnx_dir)
    root = onnx_dir.parent
    if linear not in WEB_DTYPE:
        raise ValueError(f"no transformers.js dtype for linear {linear!r}; known: {sorted(WEB_DTYPE)}")
    dtype, sfx = WEB_DTYPE[linear]
    embed_name, decoder_name = f"{WEB_EMBED}{sfx}.onnx", f"{WEB_DECODER}{sfx}.onnx"
    graphs = {embed_name: _load(onnx_dir / "embed.onnx"), decoder_name: web_decoder(onnx_dir)}
    # each transformers.js graph reads exactly one data file, named after it: the export's
    # data files of embed.onnx and target.onnx become those files
    renames = {}
    for (name, model), source in zip(graphs.items(), ("embed.onnx", "target.onnx")):
        own = f"{source}.data"
        _own_copies(onnx_dir, model, own)
        if _data_locations(model):
            renames[own] = f"{name}_data"
    rename_data_files(onnx_dir, renames)
    for name, model in graphs.items():
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = renames[e.value]
        _save(model, onnx_dir / name)

    config = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": {**text_config, "model_type": "gemma4_text"},
        "transformers.js_config": {
            "dtype": dtype,
            "use_external_data_format": {name: 1 for name, model in graphs.items() if _data_locations(model)},
        },
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in text_config:
            config[key] = text_config[key]
    (root / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    if generation_config is not None:
        (root / "generation_config.json").write_text(json.dumps(generation_config, indent=1) + "\n")


def client_files(onnx_dir: Path, client: str) -> list[str]:
    """The files a client reads from an export (its config, its graphs and the data files
    they point at), relative to the export's root (onnx_dir's parent)."""
    onnx_dir = Path(onnx_dir)
    if client == "onnxruntime-genai":
        configs, graphs = [f"{onnx_dir.name}/{GENAI_CONFIG}"], [GENAI_DECODER]
    elif client == "transformers.js":
        configs = [n for n in ("config.json", "generation_config.json") if (onnx_dir.parent / n).exists()]
        graphs = sorted(p.name for p in onnx_dir.glob(f"{WEB_EMBED}*.onnx")) + sorted(
            p.name for p in onnx_dir.glob(f"{WEB_DECODER}*.onnx"))
    else:
        raise ValueError(f"unknown client {client!r}; known: {', '.join(CLIENTS)}")
    data = sorted({loc for g in graphs for loc in _data_locations(_load(onnx_dir / g))})
    return configs + [f"{onnx_dir.name}/{n}" for n in graphs + data]
