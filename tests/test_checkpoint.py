"""Strict checkpoint loading: every key mapped, every shape checked, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.checkpoint import (
    CheckpointError,
    PairMismatchError,
    load_drafter,
    load_pair,
    load_target,
    read_config,
)
from export.config import UnsupportedModelError
from tests.conftest import REPO

IDS = torch.tensor([[2] + list(range(10, 150))])  # longer than two 64-token windows


def _edit_weights(path, fn):
    file = path / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_target_and_drafter_load_exactly_like_transformers(random_pair_dir):
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    ours = load_target(random_pair_dir / "target")
    ref = Gemma4ForCausalLM.from_pretrained(random_pair_dir / "target").eval()
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, ref(IDS).logits)
    d_ours = load_drafter(random_pair_dir / "assistant")
    d_ref = Gemma4AssistantForCausalLM.from_pretrained(random_pair_dir / "assistant").eval()
    for (n1, t1), (n2, t2) in zip(sorted(d_ours.state_dict().items()), sorted(d_ref.state_dict().items())):
        assert n1 == n2 and torch.equal(t1, t2), n1
    assert d_ours.lm_head.weight is d_ours.model.embed_tokens.weight


def test_multimodal_checkpoint_yields_its_text_decoder(random_pair_dir, tmp_path):
    from transformers import Gemma4ForConditionalGeneration

    from export.random_pair import multimodal_config

    cfg = multimodal_config(read_config(random_pair_dir / "target").hf_config)
    torch.manual_seed(1)
    Gemma4ForConditionalGeneration(cfg).save_pretrained(tmp_path / "mm")
    ref = Gemma4ForConditionalGeneration.from_pretrained(tmp_path / "mm").eval()
    ours = load_target(tmp_path / "mm")
    assert read_config(tmp_path / "mm").model_type == "gemma4"
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, ref(input_ids=IDS).logits)


def test_sharded_checkpoint_with_index(random_pair_dir, tmp_path):
    from transformers import Gemma4ForCausalLM

    model = Gemma4ForCausalLM.from_pretrained(random_pair_dir / "target")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    ours = load_target(tmp_path / "sharded")
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, model.eval()(IDS).logits)


@pytest.mark.parametrize("embedding", ["int8", "int4"])
def test_quantizing_as_read_equals_quantizing_the_loaded_model(random_pair_dir, embedding):
    """The bounded-memory reader (one layer at a time, tables by row chunks) gives exactly
    the model that loading in fp32 and quantizing afterwards gives."""
    from export.quantize import count_quantized, quantize_for_executorch

    q = {"linear": "8da4w", "group_size": 32, "embedding": embedding, "keep_8bit": ["self_attn"]}
    streamed = load_target(random_pair_dir / "target", quantization=q)
    after = load_target(random_pair_dir / "target")
    report = quantize_for_executorch([after], **q)
    assert count_quantized([streamed]) == {k: report[k] for k in ("linears_int4", "linears_int8", "embeddings")}
    assert report["linears_int8"] > 0 and report["linears_int4"] > 0 and report["embeddings"] == 2
    assert streamed.lm_head.weight is not None and not streamed.lm_head.weight.is_meta
    with torch.no_grad():
        assert torch.equal(streamed(IDS).logits, after(IDS).logits)


def test_quantizing_as_read_refuses_a_keep_8bit_pattern_that_matches_nothing(random_pair_dir):
    q = {"linear": "8da4w", "group_size": 32, "embedding": "int8", "keep_8bit": ["self_atn"]}
    with pytest.raises(ValueError, match="self_atn"):
        load_target(random_pair_dir / "target", quantization=q)


def test_missing_tensor_is_named(pair_copy):
    _edit_weights(pair_copy / "target", lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.layers.3.mlp.up_proj.weight"):
        load_target(pair_copy / "target")


def test_renamed_tensor_is_named_both_ways(pair_copy):
    def rename(t):
        t["model.layers.0.self_attn.q_prj.weight"] = t.pop("model.layers.0.self_attn.q_proj.weight")

    _edit_weights(pair_copy / "target", rename)
    with pytest.raises(CheckpointError) as e:
        load_target(pair_copy / "target")
    assert "missing tensor(s): model.layers.0.self_attn.q_proj.weight" in str(e.value)
    assert "unexpected tensor(s): model.layers.0.self_attn.q_prj.weight" in str(e.value)


def test_reshaped_tensor_is_named_with_shapes(pair_copy):
    def reshape(t):
        t["model.embed_tokens_per_layer.weight"] = t["model.embed_tokens_per_layer.weight"][:, :100].contiguous()

    _edit_weights(pair_copy / "target", reshape)
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens_per_layer.weight' has shape \[2048, 100\], expected \[2048, 384\]"):
        load_target(pair_copy / "target")


def test_truncated_file_is_reported(pair_copy):
    file = pair_copy / "target" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_target(pair_copy / "target")


def test_pickled_weights_are_refused_not_opened(pair_copy):
    d = pair_copy / "target"
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        load_target(d)


def test_drafter_backbone_mismatch_is_named_before_weights_are_read(pair_copy):
    cfg_file = pair_copy / "assistant" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["backbone_hidden_size"] = 256
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(PairMismatchError, match="backbone_hidden_size 256 != target hidden_size 128"):
        load_pair(pair_copy / "target", pair_copy / "assistant")


def test_every_pair_mismatch_is_listed(pair_copy):
    cfg_file = pair_copy / "assistant" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["text_config"]["sliding_window"] = 32
    cfg["text_config"]["rope_parameters"]["full_attention"]["rope_theta"] = 5.0
    cfg["text_config"]["per_layer_config"]["3"]["head_dim"] = 128
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(PairMismatchError) as e:
        load_pair(pair_copy / "target", pair_copy / "assistant")
    problems = "\n".join(e.value.problems)
    assert "sliding_window: drafter 32 != target 64" in problems
    assert "full_attention RoPE" in problems
    assert "full_attention head_dim: drafter 128 != target 64" in problems


def test_token_ordering_must_be_a_permutation(pair_copy):
    def break_ordering(t):
        t["masked_embedding.token_ordering"][5] = t["masked_embedding.token_ordering"][6]

    _edit_weights(pair_copy / "assistant", break_ordering)
    with pytest.raises(CheckpointError, match="not a permutation"):
        load_drafter(pair_copy / "assistant")


def test_unsupported_variants_fail_at_the_config(pair_copy):
    cfg_file = pair_copy / "target" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 64}))
    with pytest.raises(UnsupportedModelError, match="MoE"):
        read_config(pair_copy / "target")
    cfg_file.write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(UnsupportedModelError, match="model_type 'llama' is not supported"):
        read_config(pair_copy / "target")


def test_roles_are_checked(random_pair_dir):
    with pytest.raises(CheckpointError, match="expected a Gemma 4 target"):
        load_target(random_pair_dir / "assistant")
    with pytest.raises(CheckpointError, match="expected gemma4_assistant"):
        load_drafter(random_pair_dir / "target")


@pytest.mark.parametrize(
    "corrupt, needle",
    [
        ("reshape", "has shape [128, 512], expected [512, 128]"),
        ("backbone", "backbone_hidden_size 64 != target hidden_size 128"),
    ],
)
def test_cli_exits_nonzero_and_names_the_problem(pair_copy, corrupt, needle):
    if corrupt == "reshape":
        _edit_weights(
            pair_copy / "target",
            lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", t["model.layers.1.mlp.up_proj.weight"].T.contiguous()),
        )
    else:
        cfg_file = pair_copy / "assistant" / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg_file.write_text(json.dumps({**cfg, "backbone_hidden_size": 64}))
    proc = subprocess.run(
        [
            sys.executable, "-m", "runtime.generate", "--checkpoint", str(pair_copy / "target"),
            "--assistant", str(pair_copy / "assistant"), "--prompt-ids", "2,10,11", "--draft-tokens", "2",
            "--max-new-tokens", "4", "--json",
        ],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert proc.stdout == ""
