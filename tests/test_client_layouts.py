"""The client layouts' pieces on small inputs (export/client_layouts.py); the layouts of a
real export running in onnxruntime-genai and transformers.js are tested in
tests/test_export_target.py."""

from __future__ import annotations

import numpy as np
import pytest

from export import client_layouts as cl

TEXT_CONFIG = {"num_attention_heads": 8, "pad_token_id": 0}


def _layout(sliding_slots=640, full_slots=640, owners=(0, 1, 2, 3, 4, 5), sliding_cache="linear"):
    types = ["sliding_attention", "sliding_attention", "full_attention"] * 4
    shapes = {str(i): [1, 2, sliding_slots if types[i] == "sliding_attention" else full_slots, 256 if types[i] ==
                       "sliding_attention" else 512] for i in owners}
    return {"max_context": 640, "max_draft": 4, "ring_slots": 640, "sliding_window": 64, "cache_owners": list(owners),
            "cache_shapes": shapes, "layer_types": types, "eos_token_ids": [1, 106], "bos_token_id": 2,
            "vocab_size": 2048, "hidden_size": 128, "sliding_cache": sliding_cache}


def test_genai_config_describes_our_cache_layout():
    config = cl.genai_config(_layout(), TEXT_CONFIG)
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "gemma4_text" and decoder["filename"] == cl.GENAI_DECODER
    assert decoder["num_hidden_layers"] == 6 and decoder["num_key_value_heads"] == 2
    assert decoder["head_size"] == 512  # full layers' head dim; genai reads per-layer dims from the graph
    # every cache max_context slots, no window handling by genai: the graph's attention op applies it
    assert "sliding_window" not in decoder
    assert config["search"]["max_length"] == 640 and config["search"]["past_present_share_buffer"]
    assert config["model"]["eos_token_id"] == [1, 106]
    # window caches (our runtime's) are made linear in genai's decoder: accepted at any size
    assert cl.genai_config(_layout(sliding_slots=196, sliding_cache="window"), TEXT_CONFIG) == config


@pytest.mark.parametrize(
    "layout, message",
    [
        (_layout(sliding_slots=69), "layer 0 has 69 slots; genai would allocate 640"),
        (_layout(full_slots=1024), "layer 2 has 1024 slots; genai would allocate 640"),
        (_layout(owners=(1, 2, 3)), "not layers 0..n-1"),
        (_layout(sliding_cache="ring"), "ring-cache graphs"),
    ],
)
def test_genai_config_refuses_caches_genai_would_size_differently(layout, message):
    with pytest.raises(ValueError, match=message):
        cl.genai_config(layout, TEXT_CONFIG)


def _rows_graph():
    """hidden [1, T, 3] -> the rows logit_index names, as target.onnx selects logits."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["hidden", "logit_index"], ["logits"], axis=1)],
        "rows",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "T", 3]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "T"]),
         helper.make_tensor_value_info("logit_index", TensorProto.INT64, ["R"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "R", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


@pytest.mark.parametrize("keep, rows", [(None, [4]), (0, [0, 1, 2, 3, 4]), (1, [4]), (2, [3, 4]), (9, [0, 1, 2, 3, 4])])
def test_logit_rows_follow_the_clients_conventions(keep, rows):
    """genai: the last position only; transformers.js: the last num_logits_to_keep positions,
    all of them for 0."""
    import onnx
    import onnxruntime as ort

    model = _rows_graph()
    cl._replace_logit_index(model.graph, None if keep is None else "num_logits_to_keep")
    onnx.checker.check_model(model, full_check=True)
    assert "logit_index" not in {i.name for i in model.graph.input}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    hidden = np.arange(15, dtype=np.float32).reshape(1, 5, 3)
    feed = {"hidden": hidden, "position_ids": np.arange(7, 12)[None]}
    if keep is not None:
        feed["num_logits_to_keep"] = np.array(keep, dtype=np.int64)
    (logits,) = sess.run(None, feed)
    np.testing.assert_array_equal(logits, hidden[:, rows])


def test_a_graph_without_logit_index_is_refused():
    model = _rows_graph()
    model.graph.input.remove(next(i for i in model.graph.input if i.name == "logit_index"))
    with pytest.raises(ValueError, match="no logit_index input"):
        cl._replace_logit_index(model.graph, None)
