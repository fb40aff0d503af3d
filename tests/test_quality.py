"""The quality gates, the draft-length calibration formula and the near-tie rule, on
scripted backends and hand-made reports (no model, seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.quality import calibrate_draft_length, check_gates, compare_speculative, predicted_speedup
from export.targets import Gates
from tests.test_loop import V, Scripted, next_token

GATES = Gates(min_top1_agreement=0.95, max_mean_kl=0.1, max_accepted_length_drop=0.1)


def _report(**changes) -> dict:
    report = {
        "top1_agreement": 0.97,
        "mean_kl": 0.01,
        "accepted_length_by_draft_tokens": {3: {"relative_drop": 0.02}},
        "speculative_equals_own_greedy": True,
        "speculative_runs": {"mismatch": []},
        "near_tie_gap": 0.05,
    }
    report.update(changes)
    return report


def test_a_report_within_every_gate_passes():
    assert check_gates(_report(), GATES, "onnx", 3) == []


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"top1_agreement": 0.94}, "onnx: top-1 agreement 0.9400 < 0.95 (short by 0.0100)"),
        ({"mean_kl": 0.15}, "onnx: mean KL 0.1500 > 0.1 (over by 0.0500)"),
        ({"accepted_length_by_draft_tokens": {3: {"relative_drop": 0.2}}}, "drops 20.0% vs the fp32 pair (gate 10.0%)"),
        (
            {"speculative_equals_own_greedy": False,
             "speculative_runs": {"mismatch": [{"first_difference": 7, "draft_tokens": 2, "greedy_top2_gap": 0.3}]}},
            "at new token 7 (k=2) where the greedy top-2 gap 0.3000 exceeds the near-tie allowance 0.0500",
        ),
    ],
    ids=["top1", "kl", "accepted-length", "speculative"],
)
def test_each_gate_names_its_miss(changes, needle):
    (miss,) = check_gates(_report(**changes), GATES, "onnx", 3)
    assert needle in miss


def test_predicted_speedup_formula():
    costs = {"decode_ms": 2.0, "verify3_ms": 3.0, "draft_ms": 0.5}
    # 2.5 tokens per round for 3 ms of verify + 2 x 0.5 ms of drafting, against 1 token per 2 ms
    assert predicted_speedup(2.5, costs, 2) == pytest.approx(2.5 * 2.0 / 4.0)
    assert predicted_speedup(2.5, {**costs, "draft_round2_ms": 0.2}, 2) == pytest.approx(2.5 * 2.0 / 3.2)
    # a round cost alone is enough (make bench passes only the measured round)
    assert predicted_speedup(2.5, {"decode_ms": 2.0, "verify3_ms": 3.0, "draft_round2_ms": 0.2}, 2) == pytest.approx(
        2.5 * 2.0 / 3.2
    )


def test_calibration_counts_acceptance_per_position_and_picks_the_best_length():
    # the drafter's third draft of every round is wrong: P(a >= 1) = P(a >= 2) = 1, then 0
    backend = Scripted(wrong=lambda pos, step: step == 2)
    costs = {"decode_ms": 1.0, "draft_ms": 0.1, "verify2_ms": 1.1, "verify3_ms": 1.2, "verify4_ms": 1.3, "verify5_ms": 1.4}
    out = calibrate_draft_length(backend, [[1, 2, 3]], 40, 4, step_costs=costs)
    assert out["p_at_least_i_accepted"] == [1.0, 1.0, 0.0, 0.0]
    # tokens/s(k) = (1 + sum P) / (verify(k+1) + k * draft): k=2 gives 3 / 1.4 ms, the best
    assert out["predicted_tok_s"] == {"1": round(1000 * 2 / 1.2, 1), "2": round(1000 * 3 / 1.4, 1),
                                      "3": round(1000 * 3 / 1.6, 1), "4": round(1000 * 3 / 1.8, 1)}
    assert out["draft_tokens"] == 2 and out["predicted_speedup"] == round(3 / 1.4, 3)
    with pytest.raises(ValueError, match="step costs lack"):
        calibrate_draft_length(backend, [[1, 2, 3]], 10, 4, step_costs={"decode_ms": 1.0})


class _Flipping(Scripted):
    """A target whose logits for a multi-row call (a verify pass) pick another token at one
    position: the batch-variance a quantized program can show. `gap` is the greedy top-2
    gap there."""

    def __init__(self, at: int, gap: float):
        super().__init__()
        self.at, self.gap = at, gap

    def target(self, ids, start):
        logits = np.zeros((len(ids), V), np.float32)
        for row, t in enumerate(ids):
            logits[row, next_token(t)] = 1.0
            logits[row, (next_token(t) + 1) % V] = 1.0 - self.gap
            if len(ids) > 1 and start + row == self.at:  # verify passes take the runner-up here
                logits[row, (next_token(t) + 1) % V] = 1.0 + self.gap
        return logits, np.zeros((len(ids), 4), np.float32)


@pytest.mark.parametrize("gap, outcome", [(0.01, "near-tie"), (0.5, "mismatch")])
def test_a_divergence_is_a_near_tie_only_within_the_allowance(gap, outcome):
    rows, _, _, _ = compare_speculative(_Flipping(at=12, gap=gap), [1, 2, 3], 30, 2, tie=0.05)
    assert {r["outcome"] for r in rows} == {outcome}
    assert all(r["first_difference"] == 12 - 3 + 1 for r in rows)
