"""The export modules run eagerly in PyTorch fp32 as a step backend: the same cache layout
and drafter semantics as the exported programs (accepted positions only), without any
exporter in between. The fp32 baseline for quality reports and draft-length calibration.
"""

from __future__ import annotations

import numpy as np
import torch

from export.config import TargetSpec
from export.modules import CacheLayout, DrafterStep, EmbedStep, TargetStep
from runtime.artifacts import eos_ids
from runtime.loop import logit_index


class EagerBackend:
    name = "eager"

    def __init__(self, target, drafter, max_context: int = 1024, max_draft: int = 4):
        spec = TargetSpec.from_hf(target.config)
        self.layout = CacheLayout(spec.attention, max_context, max_draft)
        self.vocab_size = spec.vocab_size
        self.max_draft = max_draft
        self.embed = EmbedStep(target)
        self.step = TargetStep(target, self.layout)
        self.draft_step = DrafterStep(drafter, self.layout) if drafter is not None else None
        self.eos_token_ids = eos_ids(target.generation_config.eos_token_id)
        self._shared = self.layout.shared_cache_indices()
        self.reset()

    def reset(self) -> None:
        self.caches = [torch.zeros(self.layout.shape(i)) for i in self.layout.owners for _ in range(2)]

    @torch.no_grad()
    def target(self, ids: list[int], start: int) -> tuple[np.ndarray, np.ndarray]:
        t = torch.tensor([ids])
        e, ple = self.embed(t)
        rows = torch.from_numpy(logit_index(len(ids), self.layout.max_draft))
        logits, hidden, *self.caches = self.step(e, ple, torch.arange(start, start + len(ids))[None], rows, *self.caches)
        return logits[0].numpy(), hidden[0].numpy()

    @torch.no_grad()
    def draft(self, token: int, state: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
        e, _ = self.embed(torch.tensor([[token]]))
        inp = torch.cat([e, torch.from_numpy(np.asarray(state, dtype=np.float32)).reshape(1, 1, -1)], dim=-1)
        shared = [self.caches[i] for i in self._shared]
        logits, state = self.draft_step(inp, torch.tensor([[position]]), *shared)
        return logits[0, 0].numpy(), state[0, 0].numpy()
