"""The export modules in eager PyTorch against transformers, on a random pair with two KV
heads per layer type (the demo pair has one): grouped-query attention, both op flavours
(onnxruntime form and XNNPACK form), chunked prefill and a drafter step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from export.config import FULL, SLIDING, AttentionLayout, TargetSpec, preset
from export.modules import CacheLayout, DrafterStep, DraftTokens, EmbedStep, TargetStep

MAX_CONTEXT, MAX_DRAFT = 256, 4


@pytest.fixture(scope="module")
def grouped_pair():
    from export.hf_compat import patch_transformers

    patch_transformers()
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    demo = preset("demo")
    a = demo.target.attention
    target_spec = dataclasses.replace(
        demo.target,
        attention=AttentionLayout(a.layer_types, 4, 2, 32, 64, a.sliding_window, a.num_kv_shared_layers),
    )
    da = demo.drafter.attention
    drafter_spec = dataclasses.replace(
        demo.drafter,
        attention=AttentionLayout(da.layer_types, 4, 2, 32, 64, da.sliding_window, da.num_kv_shared_layers),
    )
    torch.manual_seed(1)
    target = Gemma4ForCausalLM(target_spec.to_hf()).eval()
    drafter = Gemma4AssistantForCausalLM(drafter_spec.to_hf(target_spec)).eval()
    drafter.masked_embedding.token_ordering.copy_(torch.randperm(drafter_spec.vocab_size))
    for m in (target, drafter):
        m.requires_grad_(False)
    return target, drafter


@pytest.mark.parametrize("form", ["onnxruntime", "xnnpack", "fused"],
                         ids=["onnxruntime-form", "xnnpack-form", "fused-attention-linear-caches"])
def test_grouped_heads_chunked_prefill_and_drafter_match_transformers(grouped_pair, form):
    """fused: the ONNX graphs' form (export/gqa.py's reference of GroupQueryAttention over
    linear caches; the graph itself is checked in tests/test_onnx.py and test_shapes.py)."""
    target, drafter = grouped_pair
    spec = TargetSpec.from_hf(target.config)
    assert spec.attention.kv_heads(SLIDING) == 2 and spec.attention.kv_heads(FULL) == 2
    xnnpack, fused = form == "xnnpack", form == "fused"
    layout = CacheLayout(spec.attention, MAX_CONTEXT, MAX_DRAFT, linear=fused)
    embed = EmbedStep(target)
    step = TargetStep(target, layout, xnnpack=xnnpack, fused=fused)
    dstep = DrafterStep(drafter, layout, xnnpack=xnnpack)
    ids = torch.randint(3, spec.vocab_size, (1, 150))  # past two 64-token windows
    with torch.no_grad():
        ref = target(ids, return_shared_kv_states=True, output_hidden_states=True)
        caches = [torch.zeros(layout.shape(i)) for i in layout.owners for _ in range(2)]
        logits, hidden = [], []
        for a, b in ((0, 97), (97, 150)):  # two chunks, the second crossing the window
            e, ple = embed(ids[:, a:b])
            lg, hd, *caches = step(e, ple, torch.arange(a, b)[None], torch.arange(b - a), *caches)  # every row
            caches = caches[: 2 * len(layout.owners)]  # fused: the shared layers' outputs follow
            logits.append(lg[0])
            hidden.append(hd[0])
        ours = torch.cat(logits)
        # fp32, different summation order; a wrong head grouping or mask is O(1) off
        assert ((ours - ref.logits[0]).abs().max() / ref.logits[0].abs().max()).item() < 1e-4

        # drafter step at position p = 150 over the target's producer caches
        p = layout.attention.kv_producers()
        shared = [caches[2 * p[FULL]], caches[2 * p[FULL] + 1], caches[2 * p[SLIDING]], caches[2 * p[SLIDING] + 1]]
        token = torch.tensor([[5]])
        state = torch.cat(hidden)[None, -1:]
        inp = torch.cat([target.model.embed_tokens(token), state], dim=-1)
        d_logits, d_state = dstep(inp, torch.tensor([[150]]), *shared)
        kv = {k: (v[0], v[1]) for k, v in ref.shared_kv_states.items()}
        expected = drafter(
            inputs_embeds=inp,
            position_ids=torch.tensor([[150]]),
            shared_kv_states=kv,
            attention_mask=torch.ones(1, 151, dtype=torch.long),
        )
    assert int(d_logits.argmax()) == int(expected.logits.argmax())
    cand = d_logits[0, 0] > -1e29
    ref_l = expected.logits[0, 0][cand]
    assert ((d_logits[0, 0][cand] - ref_l).abs().max() / ref_l.abs().max()).item() < 1e-4
    rel = (d_state - expected.last_hidden_state).abs().max() / expected.last_hidden_state.abs().max()
    assert rel.item() < 1e-4


def test_fused_attention_needs_linear_caches(grouped_pair):
    target, _ = grouped_pair
    spec = TargetSpec.from_hf(target.config)
    with pytest.raises(ValueError, match="linear caches"):
        TargetStep(target, CacheLayout(spec.attention, MAX_CONTEXT, MAX_DRAFT), fused=True)
    assert CacheLayout(spec.attention, MAX_CONTEXT, MAX_DRAFT, linear=True).shape(0)[2] == MAX_CONTEXT


@pytest.mark.parametrize("xnnpack", [False, True], ids=["onnxruntime-form", "xnnpack-form"])
def test_drafting_round_equals_transformers_drafter_chain(grouped_pair, xnnpack):
    """DraftTokens (k steps, embedding and argmax inside) drafts what transformers' drafter
    drafts step by step (its argmax fed back through the target's embedding), here with
    grouped heads (2 KV heads)."""
    target, drafter = grouped_pair
    spec = TargetSpec.from_hf(target.config)
    layout = CacheLayout(spec.attention, MAX_CONTEXT, MAX_DRAFT)
    embed, step = EmbedStep(target), TargetStep(target, layout, xnnpack=xnnpack)
    rounds = DraftTokens(DrafterStep(drafter, layout, xnnpack=xnnpack), target.model.embed_tokens, MAX_DRAFT)
    ids = torch.randint(3, spec.vocab_size, (1, 150))
    with torch.no_grad():
        ref = target(ids, return_shared_kv_states=True, output_hidden_states=True)
        caches = [torch.zeros(layout.shape(i)) for i in layout.owners for _ in range(2)]
        e, ple = embed(ids)
        _, hidden, *caches = step(e, ple, torch.arange(150)[None], torch.tensor([149]), *caches)
        p = layout.attention.kv_producers()
        shared = [caches[2 * p[FULL]], caches[2 * p[FULL] + 1], caches[2 * p[SLIDING]], caches[2 * p[SLIDING] + 1]]
        ours = rounds(torch.tensor([[5]]), hidden[:, -1:], torch.tensor([[150]]), *shared)[0].tolist()
        kv = {k: (v[0], v[1]) for k, v in ref.shared_kv_states.items()}
        expected, token, state = [], torch.tensor([[5]]), ref.hidden_states[-1][:, -1:]
        for _ in range(MAX_DRAFT):
            out = drafter(
                inputs_embeds=torch.cat([target.model.embed_tokens(token), state], dim=-1),
                position_ids=torch.tensor([[150]]),
                shared_kv_states=kv,
                attention_mask=torch.ones(1, 151, dtype=torch.long),
            )
            token = out.logits[0, -1:].argmax(-1, keepdim=True)
            state = out.last_hidden_state
            expected.append(int(token))
    assert ours == expected
