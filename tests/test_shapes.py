"""The shape matrix: random-weight pairs with the real models' proportions (export/random_pair.py:
E4B's 8/2 heads and 5:1 layers, E2B's single KV head and double-wide MLPs, a multimodal
checkpoint, centroid heads other than the demo's) through ONNX and ExecuTorch fp32, held to
`make parity`'s checks: logits, hidden states and producer caches within 1e-4 of transformers,
greedy and speculative (k = 1..4) tokens identical to transformers' greedy tokens for 96 new
tokens past two sliding windows, drafts equal to transformers' drafter, rollback.

A new shape is one entry in `export.random_pair.SHAPES`; it is tested here without a change.
The ExecuTorch programs here carry the methods the runtime needs: `target_step` and, for
e4b, the drafting-round method `draft_k4` at 2 KV heads (rounds of k = 1..3 take its first k
drafts, the runtime's path for programs without a round method of that length); e2b carries
`draft_step` (the loop chains it), which lowers in a quarter of the time (e2b's single KV
head is the demo pair's). The multimodal checkpoint loads into e4b's text stack (a test
below), so its program is e4b's and is not lowered twice; its ONNX parity checks its
loading. Lowering dominates the time of this file (minutes per method); `forward` and the
rounds of 1 and 4 drafts are tested on the demo pair (tests/test_executorch.py), every method
of every length in the full exports of `make export`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.random_pair import SHAPES, write_pair

MAX_CONTEXT, MAX_DRAFT = 256, 4
NEW_TOKENS = 96
PROMPT_LEN = 100  # window 32: past three windows
# Random weights give near-ties. A prompt is used only if every greedy step's top-2 logit
# gap in the reference is at least MIN_GAP: 1e-3 is ~400x the fp32 kernel difference
# measured on these pairs (logits ~2.5 in magnitude, relative error ~1e-6), so an argmax
# can only differ if an implementation is wrong.
MIN_GAP = 1e-3
# Drafts are compared with transformers' drafter fed the same target state and caches as ours
# (runtime/parity.py), at make parity's own near-tie allowance (DRAFT_TIE, 1e-3). Near-ties
# are capped per draft length: a wrong mask or cache would change most drafts, not a few.
MAX_DRAFT_TIES = 3
ET_METHODS = {"e4b": ("target_step", f"draft_k{MAX_DRAFT}")}  # others: ET_STEP_METHODS
ET_STEP_METHODS = ("target_step", "draft_step")


def _clear_prompt(target) -> list[int]:
    """The first seeded random prompt whose greedy continuation has no near-tie."""
    from runtime.reference import ReferencePair

    vocab = target.config.vocab_size
    for seed in range(20):
        prompt = [2] + np.random.RandomState(seed).randint(4, vocab, PROMPT_LEN - 1).tolist()
        greedy, _ = ReferencePair(target).generate(prompt, NEW_TOKENS, 0, stop_at_eos=False)
        with torch.no_grad():
            logits = target(torch.tensor([prompt + greedy[:-1]])).logits[0, len(prompt) - 1 :]
        top2 = logits.topk(2, dim=-1).values
        if float((top2[:, 0] - top2[:, 1]).min()) >= MIN_GAP:
            return prompt
    raise AssertionError(f"no seeded prompt without a near-tie (gap < {MIN_GAP}); choose another weight seed")


def _shapes(names):
    """one xdist group per shape: its export and checks stay on one worker (tests/conftest.py)"""
    return [pytest.param(s, marks=pytest.mark.xdist_group(f"shape-{s}")) for s in sorted(names)]


# The multimodal checkpoint's text stack is e4b's (test_multimodal_target_loads_e4bs_text_stack):
# its .pte is e4b's program, so it is lowered for e4b only; its loading is checked by its
# ONNX parity (one loader for both formats).
ET_SHAPES = sorted(set(SHAPES) - {"e4b-multimodal"})


@pytest.fixture(scope="module", params=_shapes(SHAPES))
def shape_pair(request, tmp_path_factory):
    from export.checkpoint import load_pair

    root = tmp_path_factory.mktemp(request.param)
    t_dir, a_dir = write_pair(request.param, root)
    target, drafter = load_pair(t_dir, a_dir)
    return request.param, root, target, drafter, _clear_prompt(target)


def _parity(backend, target, drafter, prompt, label):
    """`make parity`'s checks for one prompt; returns the failed ones."""
    from runtime.parity import Reference, Report, check_prompt

    report = Report()
    check_prompt(
        report, Reference(target, drafter), backend, backend.layout, prompt, NEW_TOKENS, label,
        transformers_speculative=False,  # transformers against itself: not what this file tests
    )
    assert len(report.checks) >= 16  # 7 tensors and greedy, k = 1..4 tokens and drafts, rollback
    ties = [c for c in report.checks if "transformers drafter" in c.name and c.value > MAX_DRAFT_TIES]
    return [f"{c.name}: {c.detail}" for c in report.checks if not c.ok] + [f"{c.name}: too many near-ties" for c in ties]


def test_onnx_matches_transformers(shape_pair):
    from export.onnx_export import export_onnx
    from runtime.onnx_backend import OnnxBackend

    name, root, target, drafter, prompt = shape_pair
    export_onnx(target, drafter, root / "onnx", MAX_CONTEXT, MAX_DRAFT, call_tokens=64)  # window caches < MAX_CONTEXT
    assert _parity(OnnxBackend(root / "onnx"), target, drafter, prompt, f"onnx/{name}") == []


@pytest.mark.parametrize("shape_pair", _shapes(ET_SHAPES), indirect=True)
def test_executorch_matches_transformers(shape_pair):
    import json

    from export.executorch_export import write_executorch
    from runtime.executorch_backend import ExecuTorchBackend

    name, root, target, drafter, prompt = shape_pair
    methods = ET_METHODS.get(name, ET_STEP_METHODS)
    info = write_executorch(target, drafter, root / "executorch", MAX_CONTEXT, MAX_DRAFT, methods=methods)
    assert set(methods) <= set(info["methods"])
    # the dynamic token count survives (prefill chunks, decode and verify from one method)
    io = json.loads((root / "executorch" / "executorch_report.json").read_text())["io"]
    assert io["target_step"]["inputs"][0]["shape"] == [1, "tokens"]
    for method, share in info["delegation"].items():
        assert share["matmuls_outside"] == [], (method, share)
    assert _parity(ExecuTorchBackend(root / "executorch"), target, drafter, prompt, f"executorch/{name}") == []


@pytest.mark.xdist_group("q8-e4b")
def test_8da4w_program_with_two_kv_heads(tmp_path, native_cli):
    """The android quantization (8da4w linears, int8 tables, 8-bit attention and head) of an
    E4B-shaped program (2 KV heads): every matmul inside XNNPACK, and speculative decoding
    (k = 1..4) gives the quantized program's own greedy tokens, past two windows, in the
    Python backend and in the native runner alike. (Its quality against fp32 is a gate of
    `make export`; random weights make it meaningless.)"""
    from runtime.native_runner import NativeRunner

    from export.checkpoint import load_pair
    from export.executorch_export import write_executorch
    from runtime.executorch_backend import ExecuTorchBackend
    from runtime.loop import greedy_generate, speculative_generate

    target, drafter = load_pair(*write_pair("e4b", tmp_path))
    q = {"linear": "8da4w", "group_size": 32, "embedding": "int8", "keep_8bit": ["lm_head", "self_attn", "per_layer"]}
    methods = ET_STEP_METHODS
    info = write_executorch(target, drafter, tmp_path / "q8", MAX_CONTEXT, MAX_DRAFT, q, methods=methods)
    assert info["quantization"]["linears_int4"] > 0 and info["quantization"]["embeddings"] > 0
    for method in methods:
        share = info["delegation"][method]
        # measured 91.0% for target_step (draft_k4 93.7%; the demo's fp32 draft_step 85%)
        assert share["matmuls_outside"] == [] and share["delegated_share"] >= 0.84, (method, share)
        # masks and ring writes inside the delegate at grouped heads too (test_executorch.py)
        assert not [op for op in share["outside_by_operator"] if "where" in op], (method, share)
    backend = ExecuTorchBackend(tmp_path / "q8")
    prompt = [2] + np.random.RandomState(0).randint(4, 2048, PROMPT_LEN - 1).tolist()
    own, _, _ = greedy_generate(backend, prompt, NEW_TOKENS)
    assert len(own) == NEW_TOKENS
    for k in range(1, MAX_DRAFT + 1):
        assert speculative_generate(backend, prompt, NEW_TOKENS, k)[0] == own, k
    native = NativeRunner(tmp_path / "q8", cli=native_cli)  # rounds of single draft_step calls here
    for k in range(0, MAX_DRAFT + 1):
        assert native.generate(prompt, NEW_TOKENS, k, stop_at_eos=False)[0] == own, k


def test_shapes_carry_the_real_proportions():
    """What each shape is for (so an edit to SHAPES cannot quietly drop a property)."""
    from export.config import FULL, SLIDING

    e4b, e2b, mm = SHAPES["e4b"], SHAPES["e2b"], SHAPES["e4b-multimodal"]
    a = e4b.target.attention
    assert (a.num_attention_heads, a.num_key_value_heads, a.global_head_dim // a.head_dim) == (8, 2, 2)
    assert a.layer_types[:6] == (SLIDING,) * 5 + (FULL,) and a.num_kv_shared_layers > 0
    assert e4b.drafter.use_ordered_embeddings
    assert (e4b.drafter.num_centroids, e4b.drafter.centroid_intermediate_top_k) != (64, 8)  # the demo's
    b = e2b.target.attention
    assert b.num_key_value_heads == 1 and b.layer_types[:5] == (SLIDING,) * 4 + (FULL,)
    assert e2b.target.use_double_wide_mlp and not e2b.drafter.use_ordered_embeddings
    assert mm.multimodal


def test_double_wide_mlps_are_in_the_shared_layers(tmp_path):
    from export.checkpoint import load_target, read_config

    t_dir, _ = write_pair("e2b", tmp_path)
    spec = read_config(t_dir).spec
    target = load_target(t_dir)
    widths = [layer.mlp.gate_proj.out_features for layer in target.model.layers]
    first = spec.attention.first_shared_layer
    assert spec.use_double_wide_mlp
    assert set(widths[:first]) == {spec.intermediate_size} and set(widths[first:]) == {2 * spec.intermediate_size}


def test_random_pair_cli_refuses_an_unknown_shape(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run(
        [sys.executable, "-m", "export.random_pair", "--shape", "e9b", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2 and "unknown shape 'e9b'; known: e2b, e4b, e4b-multimodal" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_multimodal_target_loads_e4bs_text_stack(tmp_path):
    """The multimodal checkpoint holds vision and audio towers, and loads (text decoder only)
    into the module e4b's text-only checkpoint loads into: same class, spec, parameter names
    and shapes. So its ExecuTorch program is e4b's (lowered once, for e4b)."""
    from export.checkpoint import SafetensorsCheckpoint, load_target, read_config
    from export.config import TargetSpec

    t_dir, _ = write_pair("e4b-multimodal", tmp_path / "mm")
    keys = SafetensorsCheckpoint(t_dir).keys()
    assert read_config(t_dir).model_type == "gemma4"
    assert any(k.startswith("model.vision_tower.") for k in keys) and any(k.startswith("model.audio_tower.") for k in keys)
    mm = load_target(t_dir)
    e4b = load_target(write_pair("e4b", tmp_path / "e4b")[0])
    assert type(mm) is type(e4b)
    assert TargetSpec.from_hf(mm.config) == TargetSpec.from_hf(e4b.config) == SHAPES["e4b"].target
    shapes = {k: v.shape for k, v in mm.state_dict().items()}
    assert shapes == {k: v.shape for k, v in e4b.state_dict().items()}
