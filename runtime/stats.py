"""Statistics of one generation, shared by every backend (imports no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    """Counts for one generate call.

    target_passes counts every forward of the target, prefill included; each later pass is a
    decode step (greedy) or a verify pass (speculative). mean_accepted_length is the number
    of new tokens per pass after prefill: 1.0 for greedy, 1 + accepted drafts per round for
    speculative decoding (the prefill pass yields the first new token on its own).
    """

    new_tokens: int = 0
    target_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    step_ms: dict[str, float] = field(default_factory=dict)  # mean wall time per step kind

    @property
    def verify_passes(self) -> int:
        return max(0, self.target_passes - 1)

    @property
    def mean_accepted_length(self) -> float:
        return (self.new_tokens - 1) / self.verify_passes if self.verify_passes else float(self.new_tokens)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            verify_passes=self.verify_passes,
            mean_accepted_length=round(self.mean_accepted_length, 4),
            acceptance_rate=round(self.acceptance_rate, 4),
            tokens_per_second=round(self.tokens_per_second, 2),
            seconds=round(self.seconds, 4),
            step_ms={k: round(v, 4) for k, v in self.step_ms.items()},
        )
        return d
