"""The shared loops and the cache layout, on a scripted backend (no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.config import preset
from export.modules import CacheLayout
from runtime.loop import greedy_generate, speculative_generate

V = 50


def next_token(tok: int) -> int:
    return (3 * tok + 1) % V


class Scripted:
    """Target: the next token is next_token(current). Drafter: right except where
    `wrong(position, step)` says. Records the target calls."""

    name = "scripted"
    eos_token_ids = ()

    def __init__(self, wrong=lambda pos, step: False):
        self.wrong = wrong
        self.calls = []
        self.step = 0

    def reset(self):
        self.calls = []

    def target(self, ids, start):
        self.calls.append((start, list(ids)))
        logits = np.zeros((len(ids), V), np.float32)
        logits[np.arange(len(ids)), [next_token(t) for t in ids]] = 1.0
        return logits, np.zeros((len(ids), 4), np.float32) + np.arange(start, start + len(ids))[:, None]

    def draft(self, token, state, position):
        step = int(state[0]) if state.shape == (5,) else 0
        guess = next_token(token)
        if self.wrong(position, step):
            guess = (guess + 1) % V
        logits = np.zeros(V, np.float32)
        logits[guess] = 1.0
        return logits, np.full(5, step + 1, np.float32)


def test_greedy_is_one_pass_per_token():
    b = Scripted()
    out, stats, _ = greedy_generate(b, [1, 2, 3], 6)
    expected = [next_token(3)]
    while len(expected) < 6:
        expected.append(next_token(expected[-1]))
    assert out == expected
    assert stats.target_passes == 6 and b.calls[0] == (0, [1, 2, 3]) and b.calls[1][0] == 3


def test_all_drafts_accepted_gives_k_plus_one_per_pass():
    b = Scripted()
    out, stats, _ = speculative_generate(b, [1, 2, 3], 11, 4)
    greedy, _, _ = greedy_generate(Scripted(), [1, 2, 3], 11)
    assert out == greedy
    # prefill -> 1 token; then rounds of 4 drafts + 1: 5 + 5 = 11
    assert stats.target_passes == 3 and stats.accepted == 8 and stats.drafted == 8
    assert stats.mean_accepted_length == 5.0
    assert [c[0] for c in b.calls] == [0, 3, 8]


def test_partial_acceptance_restarts_at_the_first_rejected_position():
    # the third draft of every round is wrong: 2 accepted + 1 target token per round
    b = Scripted(wrong=lambda pos, step: step == 2)
    out, stats, _ = speculative_generate(b, [1, 2, 3], 10, 4)
    assert out == greedy_generate(Scripted(), [1, 2, 3], 10)[0]
    starts = [c[0] for c in b.calls]
    assert starts == [0, 3, 6, 9]  # each round keeps 3 of the positions it verified
    assert stats.accepted == 2 * 3 and stats.mean_accepted_length == 3.0


def test_drafts_shrink_near_the_end_like_transformers():
    b = Scripted()
    out, stats, _ = speculative_generate(b, [1], 4, 4)
    assert len(out) == 4
    # 1 from prefill, then at most max_new - generated - 1 = 2 drafts, giving 3 tokens
    assert [len(ids) for _, ids in b.calls] == [1, 3]


def test_eos_stops_generation():
    b = Scripted()
    b.eos_token_ids = (next_token(next_token(3)),)
    out, _, _ = speculative_generate(b, [1, 2, 3], 20, 4, eos_token_ids=b.eos_token_ids)
    assert out == [next_token(3), next_token(next_token(3))]


def test_ring_positions_pinned():
    layout = CacheLayout(preset("demo").target.attention, max_context=256, max_draft=4)
    assert layout.ring_slots == 69
    # before any call: every slot empty (negative)
    assert (layout.ring_positions(torch.tensor(0)) < 0).all()
    pos = layout.ring_positions(torch.tensor(100))
    assert pos.tolist()[:3] == [69, 70, 71] and pos[99 % 69] == 99 and pos.max() == 99 and pos.min() == 31
    # a stale slot written by a rejected position 102 (start rolled back to 101) reads as 33
    stale = layout.ring_positions(torch.tensor(101))[102 % 69]
    assert stale == 102 - 69
    assert stale < 101 - 64 - 1  # below the drafter's window (and the target's)


def test_window_caches_pinned():
    """The ONNX graphs' window caches (runtime/artifacts.py): the base the graph computes
    equals the runtime's at every start, is a multiple of the block, leaves every position a
    call at start reads (start - window - 1 .. start - 1) held even for a call up to
    max_draft positions back, and the call's new entries fit; slots hold base + slot, empty
    from start on; entries move both ways."""
    from runtime.artifacts import shift_window, sliding_base, window_held

    layout = CacheLayout(preset("demo").target.attention, max_context=1024, max_draft=4, call_tokens=256)
    info = {"sliding_cache": "window", "sliding_block": layout.sliding_block, "sliding_window": 64, "max_draft": 4}
    assert layout.ring_slots == 64 + 4 + 64 + 256 and layout.sliding_block == 64
    for start in range(0, 1024):
        base = sliding_base(start, info)
        assert base == int(layout.sliding_base(torch.tensor(start))) and base % 64 == 0
        assert start + 256 - base <= layout.ring_slots
        assert all(window_held(base, start - back, info) for back in range(min(start, 4) + 1))
    assert not window_held(128, 100, info)
    pos = layout.ring_positions(torch.tensor(300))  # base 192
    assert pos[0] == 192 and pos[107] == 299 and (pos[108:] < 0).all()
    buf = np.arange(2 * 10, dtype=np.float32).reshape(1, 2, 10, 1)
    shift_window([buf], 64, 67)  # slot s takes slot s + 3
    assert buf[0, 1, :7, 0].tolist() == list(range(13, 20))
    shift_window([buf], 67, 65)  # slot s + 2 takes slot s
    assert buf[0, 1, 2:9, 0].tolist() == list(range(13, 20))


def test_layout_refuses_a_context_inside_the_window():
    with pytest.raises(ValueError, match="must exceed the sliding window"):
        CacheLayout(preset("demo").target.attention, max_context=64, max_draft=4)
    # the .pte's masks compute on positions as float32, exact below 2**24
    CacheLayout(preset("demo").target.attention, max_context=2**24 - 1, max_draft=4)
    with pytest.raises(ValueError, match="below 2\\*\\*24"):
        CacheLayout(preset("demo").target.attention, max_context=2**24, max_draft=4)


@pytest.mark.parametrize("n,chunk", [(1, 4), (5, 4), (101, 50), (100, 50), (10, 1), (7, 256), (3, 2)])
def test_prefill_chunks_cover_every_position_once_and_end_with_the_logit_rows(n, chunk):
    from runtime.loop import logit_rows, prefill_chunks

    max_draft = 4
    calls = prefill_chunks(n, chunk, max_draft)
    assert [a for a, _, _ in calls] == sorted({a for a, _, _ in calls})
    assert [b for _, b, _ in calls][:-1] == [a for a, _, _ in calls][1:] and calls[0][0] == 0 and calls[-1][1] == n
    a, b, rows = calls[-1]
    assert list(rows) == list(range(b - a - logit_rows(n, max_draft), b - a)) and len(rows) == min(n, max_draft + 1)
    for a, b, rows in calls[:-1]:
        assert list(rows) == [b - a - 1] and b - a <= chunk
