"""`make bench-peers`: the adaptations that let the peers read our checkpoints, and the ratio
arithmetic of its report. (The peers' own runs are the benchmark's; mobius-onnx is a
benchmark-only dependency and not installed for `make test`.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime import bench_peers
from tests.conftest import DEMO


def test_full_attention_head_dim_comes_from_per_layer_config():
    cfg = json.loads((DEMO / "target" / "config.json").read_text())
    assert cfg["head_dim"] == 32
    assert bench_peers._full_head_dim(cfg) == 64  # the demo's full layers (per_layer_config)
    assert bench_peers._full_head_dim({"layer_types": ["full_attention"], "head_dim": 32, "global_head_dim": 128}) == 128
    assert bench_peers._full_head_dim({"layer_types": ["sliding_attention"], "head_dim": 32}) == 32


def test_executorch_example_config_reads_the_checkpoint_not_its_defaults():
    """Without the adaptation the example's reader gives full layers head_dim 512 (its E2B
    default) and ignores the nested rope_parameters."""
    from executorch.examples.models.gemma4.text_decoder.gemma4_config import Gemma4Config

    raw = Gemma4Config.from_json(str(DEMO / "target" / "config.json"))
    assert raw.global_head_dim == 512  # what the adaptation is for
    cfg = bench_peers.executorch_example_config(DEMO / "target", max_seq_len=1024)
    assert cfg.global_head_dim == 64 and cfg.head_dim == 32
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.partial_rotary_factor) == (1e6, 1e4, 0.25)
    assert cfg.num_self_decoder_layers == 6 and cfg.sliding_window == 64
    assert cfg.max_seq_len == 1024 and cfg.enable_dynamic_shape


def test_causal_lm_weights_are_renamed_for_the_example(tmp_path):
    src = tmp_path / "ck"
    src.mkdir()
    save_file(
        {"model.embed_tokens.weight": torch.ones(2, 2), "model.language_model.norm.weight": torch.zeros(2),
         "lm_head.weight": torch.ones(1)},
        str(src / "model.safetensors"),
    )
    out = tmp_path / "out"
    out.mkdir()
    bench_peers._weights_as_conditional_generation(src, out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["lm_head.weight", "model.language_model.embed_tokens.weight",
                                    "model.language_model.norm.weight"]


def test_ratios_are_per_repeat_medians():
    """ours / peer within each repeat, then the median (drift between repeats cancels)."""
    raw = {80: {
        "onnx": {"prefill_ms": [10.0, 20.0, 40.0], "decode_ms": [1.0, 2.0, 4.0], "tokens_equal": True},
        "mobius": {"prefill_ms": [5.0, 40.0, 20.0], "decode_ms": [2.0, 2.0, 2.0], "tokens_equal": False},
    }}
    s = bench_peers.summarize(raw)["80"]
    assert s["backends"]["onnx"] == {"prefill_ms": 20.0, "decode_ms": 2.0, "tokens_equal_transformers": True,
                                     "runs": {"prefill_ms": [10.0, 20.0, 40.0], "decode_ms": [1.0, 2.0, 4.0]}}
    assert s["backends"]["mobius"]["tokens_equal_transformers"] is False
    # per repeat: prefill 2.0, 0.5, 2.0 -> 2.0 (the ratio of medians would be 20/20 = 1.0)
    assert s["ratios"] == {"onnx/mobius": {"prefill_ms": 2.0, "decode_ms": 1.0}}


def test_prompts_have_the_asked_lengths_and_start_with_bos():
    prompts = bench_peers.bench_prompts(DEMO / "target", [80, 600])
    assert [len(p) for p in prompts.values()] == [80, 600]
    assert all(p[0] == 2 for p in prompts.values())
    assert prompts[600][:80] == prompts[80]


@pytest.mark.parametrize("argv", [["--long", "1000", "--max-seq-len", "1024"]])
def test_refuses_a_long_prompt_past_the_example_cache(argv, capsys):
    assert bench_peers.main(argv) == 2
    assert "--max-seq-len" in capsys.readouterr().err
