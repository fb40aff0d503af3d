"""The greedy and speculative decoding loops, written once for every exported backend.

A backend implements `StepBackend` (numpy in, numpy out, no torch):
- `eos_token_ids`, `max_draft` (drafts per round its caches allow), `vocab_size` (prompt ids
  outside it are refused before any call);
- `reset()`: empty caches;
- `target(ids, start)`: run the target over `ids` at positions start..start+N-1, writing
  their K/V; returns logits [R, V] of the last R = min(N, max_draft + 1) positions
  (`logit_rows`: every position of a decode step or verify pass, the last ones of a
  prefill) and final hidden states [R, H] of the same positions (the graphs compute the
  KV-shared layers for those rows only). Calling it again at an earlier start is the
  rollback: the cache layout makes entries past the new start invisible (export/modules.py).
  Logits and hidden states of every position: `teacher_forced`;
- `draft(token, state, position)`: one drafter step at `position`, reading the target's
  caches below it; returns logits [V] and the projected state [H];
- optionally `draft_tokens(token, state, position, k)`: the k greedy drafts of a round in
  one call (the exported drafting-round graph/method); when a backend has it, the
  speculative loop uses it instead of k `draft` calls (same tokens, fewer calls).

Speculative round (greedy acceptance), with tok = the next token, not yet in the cache, at
position pos, and h = the target's hidden state at pos - 1 (after `_prefill`):
1. `draft`: d_i = choose(draft(d_{i-1}, s_{i-1}, pos)), d_0 = tok, s_0 = h, for i = 1..k
   (or d_1..d_k = draft_tokens(tok, h, pos, k) in one call);
2. `verify`: target([tok, d_1..d_k], pos) -> choices c_0..c_k at each position;
3. `accept`: the longest prefix with d_i == c_{i-1}, a drafts, plus c_a from the target;
4. next round: tok = c_a at pos + a + 1, h = hidden[a].
Tokens are chosen in one place, `choose_tokens` (argmax: greedy).
The output equals greedy decoding token for token; k shrinks near max_new_tokens as in
transformers (at most max_new_tokens - generated - 1 drafts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from runtime.stats import GenerationStats


class StepBackend(Protocol):
    name: str
    eos_token_ids: tuple[int, ...]  # stops generation unless the caller passes its own
    max_draft: int | None  # the export's ring size allows at most this many drafts per round
    vocab_size: int | None  # prompt ids outside it are refused

    def reset(self) -> None: ...

    def target(self, ids: list[int], start: int) -> tuple[np.ndarray, np.ndarray]: ...

    def draft(self, token: int, state: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]: ...

    # optional: draft_tokens(token, state, position, k) -> list[int], one call per round


# on_target(start, ids, logits, hidden): sees every target call (parity and quality reports
# record logits through it instead of wrapping the backend)
TargetObserver = Callable[[int, list[int], np.ndarray, np.ndarray], None]


class StepTimer:
    """Wall time per kind of step, for stats and benchmarks."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, kind: str, seconds: float) -> None:
        self.totals[kind] = self.totals.get(kind, 0.0) + seconds
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def mean_ms(self) -> dict[str, float]:
        return {k: 1000 * self.totals[k] / self.counts[k] for k in self.totals}


def _timed(timer, kind, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    timer.add(kind, time.perf_counter() - t0)
    return out


def choose_tokens(logits: np.ndarray) -> np.ndarray:
    """The one place a token is chosen from logits ([..., V] -> [...]): greedy today;
    sampling goes here (the speculative acceptance rule would change with it)."""
    return np.argmax(logits, axis=-1)


def check_prompt_ids(prompt_ids: list[int], vocab_size: int | None) -> None:
    """The one check of prompt ids every backend shares (raises ValueError, which the CLIs
    report as `error: ...` with exit status 2)."""
    if not prompt_ids:
        raise ValueError("empty prompt: give at least one token")
    if vocab_size is not None:
        bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token id(s) {bad[:5]} outside the vocabulary 0..{vocab_size - 1}")


def _check_draft_length(backend, draft_tokens: int) -> None:
    if draft_tokens < 1:
        raise ValueError("draft_tokens must be >= 1 for speculative decoding; use greedy_generate")
    limit = getattr(backend, "max_draft", None)
    if limit is not None and draft_tokens > limit:
        raise ValueError(
            f"draft_tokens {draft_tokens} exceeds the export's max_draft {limit} (its sliding caches hold "
            f"window + {limit} + 1 slots, so longer rounds could evict entries still in the window); "
            f"use at most {limit} drafts or re-export with --max-draft {draft_tokens}"
        )


def logit_rows(n: int, max_draft: int) -> int:
    """Rows of logits a target call over n tokens returns: every position of a decode step or
    verify pass (n <= max_draft + 1), the last max_draft + 1 of a longer call."""
    return min(n, max_draft + 1)


def logit_index(n: int, max_draft: int) -> np.ndarray:
    """The positions within a call of n tokens whose logits it returns (the graphs' input)."""
    return np.arange(n - logit_rows(n, max_draft), n, dtype=np.int64)


def prefill_chunks(n: int, chunk: int, max_draft: int) -> list[tuple[int, int, np.ndarray]]:
    """(begin, end, logit_index) of each target call of a call over n tokens split into
    chunks of at most `chunk`: only the last one returns logits (its last logit_rows(n)
    positions; it is made that long if the split would leave it shorter), earlier ones
    compute the one row the graphs cannot do without."""
    rows = logit_rows(n, max_draft)
    starts = list(range(0, n, chunk))
    if n - starts[-1] < rows:
        starts = [s for s in starts if s < n - rows] + [n - rows]
    ends = starts[1:] + [n]
    return [
        (a, b, logit_index(b - a, max_draft) if b == n else np.asarray([b - a - 1], dtype=np.int64))
        for a, b in zip(starts, ends)
    ]


def teacher_forced(backend, ids: list[int], start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, V] and hidden states [N, H] of every position of ids, from target calls of
    at most max_draft + 1 tokens each (quality and parity reports compare every position)."""
    step = (getattr(backend, "max_draft", None) or 0) + 1
    logits, hidden = [], []
    for c in range(0, len(ids), step):
        lg, hd = backend.target(ids[c : c + step], start + c)
        logits.append(lg)
        hidden.append(hd)
    return np.concatenate(logits), np.concatenate(hidden)


def run_target(backend, ids: list[int], start: int, timer: StepTimer, kind: str, on_target=None):
    """One target call (prefill chunk, decode step or verify pass) -> logits [R, V] of the last
    R positions, hidden [R, H] of the same positions."""
    logits, hidden = _timed(timer, kind, backend.target, ids, start)
    if on_target is not None:
        on_target(start, ids, logits, hidden)
    return logits, hidden


def chained_drafts(backend, token: int, state, position: int, k: int, timer: StepTimer | None = None) -> list[int]:
    """k drafts from k single `draft` steps, all at `position` (what `draft_tokens`
    computes in one call; backends fall back to this for exports without the drafting-round
    graphs). timer: records each step as kind "draft"."""
    drafts = []
    for _ in range(k):
        if timer is None:
            logits, state = backend.draft(token, state, position)
        else:
            logits, state = _timed(timer, "draft", backend.draft, token, state, position)
        token = int(choose_tokens(logits))
        drafts.append(token)
    return drafts


def draft(backend, token: int, state, position: int, k: int, timer: StepTimer) -> list[int]:
    """The k drafts of a round: one `draft_tokens` call where the backend has it."""
    round_drafter = getattr(backend, "draft_tokens", None)
    if round_drafter is not None and k > 0:
        return _timed(timer, f"draft_round{k}", round_drafter, token, state, position, k)
    return chained_drafts(backend, token, state, position, k, timer)


def verify(backend, token: int, drafts: list[int], position: int, timer: StepTimer, on_target=None):
    """[token, d_1..d_k] at positions position..position+k -> the target's choices c_0..c_k
    and its hidden states [k+1, H]."""
    logits, hidden = run_target(backend, [token] + drafts, position, timer, f"verify{len(drafts) + 1}", on_target)
    return choose_tokens(logits), hidden


def accept(drafts: list[int], choices) -> int:
    """Greedy acceptance: the longest prefix of drafts with d_i == c_{i-1}."""
    a = 0
    while a < len(drafts) and drafts[a] == int(choices[a]):
        a += 1
    return a


def _emit(new, out, eos, max_new, on_token) -> bool:
    """Append new tokens, stopping at EOS or max_new; True when generation is over."""
    for t in new:
        out.append(t)
        if on_token:
            on_token(t)
        if t in eos or len(out) >= max_new:
            return True
    return False


def _prefill(backend, prompt_ids, timer, on_target):
    check_prompt_ids(prompt_ids, getattr(backend, "vocab_size", None))
    backend.reset()
    return run_target(backend, list(prompt_ids), 0, timer, "prefill", on_target)


def greedy_generate(
    backend: StepBackend,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
    on_target: TargetObserver | None = None,
) -> tuple[list[int], GenerationStats, StepTimer]:
    timer, stats, out = StepTimer(), GenerationStats(), []
    t0 = time.perf_counter()
    logits, _ = _prefill(backend, prompt_ids, timer, on_target)
    stats.target_passes += 1
    tok, pos = int(choose_tokens(logits[-1])), len(prompt_ids)
    done = _emit([tok], out, eos_token_ids, max_new_tokens, on_token)
    while not done:
        logits, _ = run_target(backend, [tok], pos, timer, "decode", on_target)  # logits: [1, V]
        stats.target_passes += 1
        tok, pos = int(choose_tokens(logits[-1])), pos + 1
        done = _emit([tok], out, eos_token_ids, max_new_tokens, on_token)
    stats.new_tokens, stats.seconds = len(out), time.perf_counter() - t0
    return out, stats, timer


def speculative_generate(
    backend: StepBackend,
    prompt_ids: list[int],
    max_new_tokens: int,
    draft_tokens: int,
    eos_token_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
    on_round: Callable[[int, list[int], int], None] | None = None,
    on_target: TargetObserver | None = None,
) -> tuple[list[int], GenerationStats, StepTimer]:
    """on_round(pos, drafts, accepted) observes each round (parity checks use it)."""
    _check_draft_length(backend, draft_tokens)
    timer, stats, out = StepTimer(), GenerationStats(), []
    t0 = time.perf_counter()
    logits, hidden = _prefill(backend, prompt_ids, timer, on_target)
    stats.target_passes += 1
    tok, h, pos = int(choose_tokens(logits[-1])), hidden[-1], len(prompt_ids)
    done = _emit([tok], out, eos_token_ids, max_new_tokens, on_token)
    while not done:
        k = min(draft_tokens, max_new_tokens - len(out) - 1)
        drafts = draft(backend, tok, h, pos, k, timer)
        choices, hidden = verify(backend, tok, drafts, pos, timer, on_target)  # choices: [k+1]
        stats.target_passes += 1
        a = accept(drafts, choices)
        stats.drafted += k
        stats.accepted += a
        if on_round:
            on_round(pos, drafts, a)
        done = _emit(drafts[:a] + [int(choices[a])], out, eos_token_ids, max_new_tokens, on_token)
        tok, h, pos = int(choices[a]), hidden[a], pos + a + 1
    stats.new_tokens, stats.seconds = len(out), time.perf_counter() - t0
    return out, stats, timer
