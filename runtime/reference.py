"""The PyTorch reference: transformers' own greedy and MTP speculative generation.

Every exported artifact is checked against this. It runs the unmodified transformers
classes (`Gemma4ForCausalLM.generate`, with `assistant_model=Gemma4AssistantForCausalLM` for
speculative decoding, i.e. transformers' `SinglePositionMultiTokenCandidateGenerator`) and
only observes them: forward hooks count target passes and drafter steps.

Steps of `ReferencePair.generate`:
1. prompt ids -> tensor [1, T];
2. greedy: `generate(do_sample=False)`; speculative: the drafter's generation config asks
   for `draft_tokens` candidates per round (constant schedule);
3. new ids streamed through `on_token` as transformers emits them;
4. stats: target passes (prefill + one per decode/verify), drafted = drafter steps,
   accepted = new tokens - 1 - verify passes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch

from export.checkpoint import load_pair
from runtime.artifacts import eos_ids
from runtime.loop import check_prompt_ids
from runtime.stats import GenerationStats


class _Streamer:
    """transformers streamer protocol (put/end) -> per-token callback, prompt skipped."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for tok in value.flatten().tolist():
            self.on_token(int(tok))

    def end(self) -> None:
        pass


class _CallCounter:
    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def remove(self):
        self._handle.remove()


class ReferencePair:
    """A target and an optional drafter loaded with `export.checkpoint` (strict)."""

    def __init__(self, target, drafter=None):
        self.target = target
        self.drafter = drafter

    @classmethod
    def from_dirs(cls, target_dir: str | Path, drafter_dir: str | Path | None = None) -> "ReferencePair":
        target, drafter = load_pair(target_dir, drafter_dir)
        return cls(target, drafter)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.target.generation_config.eos_token_id
        return list(eos_ids(self.target.config.eos_token_id if eos is None else eos))

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        draft_tokens: int = 0,
        stop_at_eos: bool = True,
        on_token: Callable[[int], None] | None = None,
    ) -> tuple[list[int], GenerationStats]:
        """Greedy (draft_tokens=0) or speculative generation; returns new ids and stats."""
        check_prompt_ids(prompt_ids, self.target.config.vocab_size)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if draft_tokens < 0:
            raise ValueError(f"draft_tokens must be >= 0, got {draft_tokens}")
        if draft_tokens and self.drafter is None:
            raise ValueError("draft_tokens > 0 needs a drafter (ASSISTANT / --assistant)")

        config = copy.deepcopy(self.target.generation_config)
        config.do_sample = False
        config.max_new_tokens = max_new_tokens
        # Not stopping at EOS must not suppress it either (min_new_tokens would mask its logit
        # and change the greedy tokens): without EOS ids nothing stops early.
        config.min_new_tokens = None
        # None would be filled in from the model's generation config (transformers 5 merges unset
        # fields), so "never stop" is an id no token has
        config.eos_token_id = self.eos_token_ids if stop_at_eos else [-1]
        config.pad_token_id = self.target.config.pad_token_id
        for attr in ("temperature", "top_p", "top_k"):
            setattr(config, attr, None)
        kwargs = {}
        if draft_tokens:
            self.drafter.generation_config.num_assistant_tokens = draft_tokens
            self.drafter.generation_config.num_assistant_tokens_schedule = "constant"
            kwargs["assistant_model"] = self.drafter

        ids = torch.tensor([prompt_ids], dtype=torch.long)
        counters = [_CallCounter(self.target)] + ([_CallCounter(self.drafter)] if draft_tokens else [])
        streamer = _Streamer(on_token) if on_token else None
        t0 = time.perf_counter()
        try:
            out = self.target.generate(
                ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer, **kwargs
            )
        finally:
            for c in counters:
                c.remove()
        seconds = time.perf_counter() - t0
        new = out[0, len(prompt_ids) :].tolist()
        stats = GenerationStats(
            new_tokens=len(new),
            target_passes=counters[0].calls,
            drafted=counters[1].calls if draft_tokens else 0,
            seconds=seconds,
        )
        stats.accepted = stats.new_tokens - 1 - stats.verify_passes if draft_tokens else 0
        return new, stats
