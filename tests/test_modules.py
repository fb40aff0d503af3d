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
                         ids=["onnxruntime-form", "xnnpack-form", "fused-attention-window-caches"])
def test_grouped_heads_chunked_prefill_and_drafter_match_transformers(grouped_pair, form):
    """fused: the ONNX graphs' form (export/gqa.py's reference of GroupQueryAttention over
    window caches, moved between calls as the runtime moves them; the graph itself is
    checked in tests/test_onnx.py and test_shapes.py)."""
    from runtime.artifacts import shift_window

    target, drafter = grouped_pair
    spec = TargetSpec.from_hf(target.config)
    assert spec.attention.kv_heads(SLIDING) == 2 and spec.attention.kv_heads(FULL) == 2
    xnnpack, fused = form == "xnnpack", form == "fused"
    # fused: calls of at most 50 tokens, so a window cache of 64 + 4 + 64 + 50 slots < MAX_CONTEXT
    layout = CacheLayout(spec.attention, MAX_CONTEXT, MAX_DRAFT, call_tokens=50 if fused else None)
    embed = EmbedStep(target)
    step = TargetStep(target, layout, xnnpack=xnnpack, fused=fused)
    dstep = DrafterStep(drafter, layout, xnnpack=xnnpack)
    n = 200
    ids = torch.randint(3, spec.vocab_size, (1, n))  # past three 64-token windows
    sliding = [2 * k + kv for k, i in enumerate(layout.owners) if layout.attention.layer_types[i] == SLIDING
               for kv in (0, 1)]
    bases = [0]

    def move(caches, start):  # what the runtime does before a call (runtime/onnx_backend.py)
        new = int(layout.sliding_base(torch.tensor(start)))
        shift_window([caches[j].numpy() for j in sliding], bases[-1], new)
        bases.append(new)

    with torch.no_grad():
        ref = target(ids, return_shared_kv_states=True, output_hidden_states=True)
        caches = [torch.zeros(layout.shape(i)) for i in layout.owners for _ in range(2)]
        logits, hidden, few_logits, few_hidden, few_rows = [], [], [], [], []
        # chunks crossing the window; fused: calls of at most call_tokens
        for a, b in ((0, 50), (50, 100), (100, 150), (150, n)) if fused else ((0, 97), (97, n)):
            if fused:
                move(caches, a)
            e, ple = embed(ids[:, a:b])
            # the last 3 rows only (the KV-shared layers then compute those rows alone), from
            # the same caches (functional: the call below does not change them)
            lg3, hd3, *_ = step(e, ple, torch.arange(a, b)[None], torch.arange(b - a - 3, b - a), *caches)
            lg, hd, *caches = step(e, ple, torch.arange(a, b)[None], torch.arange(b - a), *caches)  # every row
            caches = caches[: 2 * len(layout.owners)]  # fused: the shared layers' outputs follow
            logits.append(lg[0])
            hidden.append(hd[0])
            few_logits.append(lg3[0])
            few_hidden.append(hd3[0])
            few_rows += list(range(b - 3, b))
        ours = torch.cat(logits)
        # fp32, different summation order; a wrong head grouping or mask is O(1) off
        assert ((ours - ref.logits[0]).abs().max() / ref.logits[0].abs().max()).item() < 1e-4
        ref_hidden = ref.hidden_states[-1][0]
        assert ((torch.cat(hidden) - ref_hidden).abs().max() / ref_hidden.abs().max()).item() < 1e-4
        # same tolerance: a shared layer reading the wrong rows, positions or masks is O(1) off
        for got, want in ((torch.cat(few_logits), ref.logits[0, few_rows]), (torch.cat(few_hidden), ref_hidden[few_rows])):
            assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
        if fused:
            move(caches, n)
            assert bases == [0, 0, 0, 0, 64, 128]  # the window moved twice, once before the drafter

        # drafter step at position p = n over the target's producer caches
        p = layout.attention.kv_producers()
        shared = [caches[2 * p[FULL]], caches[2 * p[FULL] + 1], caches[2 * p[SLIDING]], caches[2 * p[SLIDING] + 1]]
        token = torch.tensor([[5]])
        state = torch.cat(hidden)[None, -1:]
        inp = torch.cat([target.model.embed_tokens(token), state], dim=-1)
        d_logits, d_state = dstep(inp, torch.tensor([[n]]), *shared)
        kv = {k: (v[0], v[1]) for k, v in ref.shared_kv_states.items()}
        expected = drafter(
            inputs_embeds=inp,
            position_ids=torch.tensor([[n]]),
            shared_kv_states=kv,
            attention_mask=torch.ones(1, n + 1, dtype=torch.long),
        )
    assert int(d_logits.argmax()) == int(expected.logits.argmax())
    cand = d_logits[0, 0] > -1e29
    ref_l = expected.logits[0, 0][cand]
    assert ((d_logits[0, 0][cand] - ref_l).abs().max() / ref_l.abs().max()).item() < 1e-4
    rel = (d_state - expected.last_hidden_state).abs().max() / expected.last_hidden_state.abs().max()
    assert rel.item() < 1e-4


def test_fused_attention_needs_window_caches(grouped_pair):
    target, _ = grouped_pair
    spec = TargetSpec.from_hf(target.config)
    with pytest.raises(ValueError, match="window caches"):
        TargetStep(target, CacheLayout(spec.attention, MAX_CONTEXT, MAX_DRAFT), fused=True)
    layout = CacheLayout(spec.attention, MAX_CONTEXT, MAX_DRAFT, call_tokens=50)
    assert layout.shape(0)[2] == 64 + 4 + 64 + 50 and layout.shape(5)[2] == MAX_CONTEXT  # sliding, full
    # a window cache that would reach max_context is linear (base always 0)
    wide = CacheLayout(spec.attention, MAX_CONTEXT, MAX_DRAFT, call_tokens=124)
    assert wide.ring_slots == MAX_CONTEXT and int(wide.sliding_base(torch.tensor(MAX_CONTEXT - 1))) == 0
    with pytest.raises(ValueError, match="verify pass"):
        CacheLayout(spec.attention, MAX_CONTEXT, MAX_DRAFT, call_tokens=MAX_DRAFT)


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
