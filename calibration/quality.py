"""Quality of an exported (possibly quantized) pair against the fp32 reference, and the
draft-length calibration.

Quality, on the held-out prompts (each past two sliding windows):
- top-1 agreement and mean KL(fp32 || exported) of the target's next-token distributions,
  teacher-forced over prompt + the fp32 greedy continuation (the reference is transformers);
- speculative output of the exported pair equal to the exported target's own greedy output
  (every draft length 1..max_draft). Exact up to near-ties: a program whose verify pass
  (k+1 rows) and decode step (1 row) give different logits for the same position (int8
  dynamic activations: measured here up to ~0.05) may take the other branch of a near-tie;
  a divergence is allowed only where the greedy top-2 logit gap is within twice that
  measured difference (`batch_variance`; fp32 programs measure ~1e-5, so they are held to
  exact equality in practice);
- mean accepted length of the exported pair against the fp32 pair in the same loop
  (runtime/eager_backend.py: the export modules in fp32 eager PyTorch), over the held-out
  and the calibration prompts, for every draft length; gated at the deployed one.
Gates from the deployment target fail the export with a message naming each miss.

Draft-length calibration, on the calibration prompts: P(at least i drafts accepted) for
i = 1..max_draft from speculative runs at max_draft; the target decode, verify(k+1) and
drafting costs (a drafting-round call of k drafts where the backend has one, else k drafter
steps); predicted tokens/s(k) = (1 + sum_{i<=k} P(a >= i)) / (verify(k+1) + drafting(k)),
and the k that maximises it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from runtime.loop import greedy_generate, speculative_generate, teacher_forced

HERE = Path(__file__).resolve().parent
HELDOUT = sorted((HERE / "prompts").glob("heldout_*.py"))
CALIBRATION = sorted((HERE / "prompts").glob("calib_*.py"))
CALIBRATION_PROMPT_TOKENS = 448  # the head of each calibration prompt (past two demo windows)


def calibration_prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p.read_text()).ids[:CALIBRATION_PROMPT_TOKENS] for p in CALIBRATION]


class GateError(RuntimeError):
    """An export that misses a quality gate of its deployment target."""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def distribution_metrics(logits: np.ndarray, ref_logits: np.ndarray) -> dict:
    """top-1 agreement and mean KL(ref || ours) over positions."""
    top1 = float((logits.argmax(-1) == ref_logits.argmax(-1)).mean())
    lp, lq = _log_softmax(ref_logits), _log_softmax(logits)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return {"top1_agreement": round(top1, 5), "mean_kl": round(kl, 6), "positions": int(len(logits))}


def batch_variance(backend, ids: list[int], windows: int = 24, k: int = 4) -> float:
    """max |logits of a (k)-token verify pass - logits of the same positions decoded one by
    one|: how far a program's verify and decode results differ for identical inputs (fp32
    programs: ~1e-5; dynamic int8 activations: ~1e-2, the rows take different kernels and a
    1-ulp difference can cross an int8 rounding boundary)."""
    greedy, _, _ = greedy_generate(backend, ids, windows * k + 1)
    seq = list(ids) + greedy
    worst = 0.0
    for w in range(windows):
        p = len(ids) + w * k
        backend.reset()
        backend.target(seq[:p], 0)
        decoded = np.concatenate([backend.target([seq[p + j]], p + j)[0] for j in range(k)])
        verified, _ = backend.target(seq[p : p + k], p)
        worst = max(worst, float(np.abs(verified - decoded).max()))
    return worst


def compare_speculative(backend, ids, new_tokens, max_draft, tie: float, fp32_backend=None):
    """Speculative output (k = 1..max_draft) against the backend's own greedy output. A
    divergence counts as a near-tie (allowed) only where the greedy top-2 logit gap is
    within `tie`; anything else is a mismatch. Returns (rows, accepted lengths per k,
    fp32 accepted lengths per k, the greedy output)."""
    rows_seen = []  # the last row of every target call (greedy: one per new token)
    greedy, _, _ = greedy_generate(backend, ids, new_tokens, on_target=lambda s, i, logits, h: rows_seen.append(logits[-1]))
    gaps = [float(np.diff(np.sort(r)[-2:])[0]) for r in rows_seen]
    rows, mal, mal_fp32 = [], {}, {}
    for k in range(1, max_draft + 1):
        spec, stats, _ = speculative_generate(backend, ids, new_tokens, k)
        mal[k] = stats.mean_accepted_length
        if fp32_backend is not None:
            mal_fp32[k] = speculative_generate(fp32_backend, ids, new_tokens, k)[1].mean_accepted_length
        if spec == greedy:
            rows.append({"draft_tokens": k, "outcome": "identical"})
            continue
        i = next((i for i, (a, b) in enumerate(zip(spec, greedy)) if a != b), min(len(spec), len(greedy)))
        gap = gaps[i] if i < len(gaps) else float("inf")
        outcome = "near-tie" if gap <= tie else "mismatch"
        rows.append({"draft_tokens": k, "outcome": outcome, "first_difference": i, "greedy_top2_gap": round(gap, 6)})
    return rows, mal, mal_fp32, greedy


def quality_report(
    backend,
    fp32_backend,
    reference,
    prompts: list[list[int]],
    new_tokens: int,
    max_draft: int,
    extra_prompts: list[list[int]] = (),
) -> dict:
    """reference: runtime.reference.ReferencePair (transformers fp32). Distribution metrics on
    `prompts`; accepted lengths and speculative == greedy on `prompts` + `extra_prompts`
    (acceptance depends on the text each pair generates, so more text, less noise)."""
    import torch

    agree, kls, positions = [], [], 0
    mal, mal_fp32, comparisons = {}, {}, []
    per_prompt = []
    # the near-tie allowance: twice this program's measured verify/decode difference
    variance = batch_variance(backend, prompts[0])
    tie = 2 * variance
    own_greedy = []
    for ids in list(prompts) + list(extra_prompts):
        rows, m, m32, greedy = compare_speculative(backend, ids, new_tokens, max_draft, tie, fp32_backend)
        own_greedy.append(greedy)
        comparisons += rows
        for k in m:
            mal.setdefault(k, []).append(m[k])
            mal_fp32.setdefault(k, []).append(m32[k])
    for ids, own in zip(prompts, own_greedy):
        greedy_ref, _ = reference.generate(ids, new_tokens, 0, stop_at_eos=False)
        seq = list(ids) + greedy_ref[:-1]
        with torch.no_grad():
            ref_logits = reference.target(torch.tensor([seq])).logits[0].numpy()
        backend.reset()
        logits, _ = teacher_forced(backend, seq)  # every position, in verify-sized calls
        m = distribution_metrics(logits, ref_logits)
        agree.append(m["top1_agreement"] * m["positions"])
        kls.append(m["mean_kl"] * m["positions"])
        positions += m["positions"]
        per_prompt.append({"prompt_tokens": len(ids), **m, "greedy_equals_fp32_greedy": own == greedy_ref})
    by_k = {
        k: {
            "mean_accepted_length": round(statistics.mean(mal[k]), 4),
            "fp32_mean_accepted_length": round(statistics.mean(mal_fp32[k]), 4),
        }
        for k in mal
    }
    for row in by_k.values():
        row["relative_drop"] = round(1 - row["mean_accepted_length"] / row["fp32_mean_accepted_length"], 4)
    return {
        "prompts": per_prompt,
        "new_tokens": new_tokens,
        "top1_agreement": round(sum(agree) / positions, 5),
        "mean_kl": round(sum(kls) / positions, 6),
        "speculative_equals_own_greedy": all(r["outcome"] != "mismatch" for r in comparisons),
        "speculative_runs": {
            "identical": sum(r["outcome"] == "identical" for r in comparisons),
            "near_tie": [r for r in comparisons if r["outcome"] == "near-tie"],
            "mismatch": [r for r in comparisons if r["outcome"] == "mismatch"],
        },
        "verify_decode_max_logit_difference": round(variance, 7),
        "near_tie_gap": round(tie, 7),
        "accepted_length_by_draft_tokens": by_k,
        "accepted_length_prompts": len(prompts) + len(extra_prompts),
    }


def check_gates(report: dict, gates, label: str, draft_tokens: int) -> list[str]:
    """Messages for every missed gate (empty: all pass). The accepted-length gate applies at
    the draft length the export deploys (`draft_tokens`); every length is reported."""
    misses = []
    if report["top1_agreement"] < gates.min_top1_agreement:
        misses.append(
            f"{label}: top-1 agreement {report['top1_agreement']:.4f} < {gates.min_top1_agreement} "
            f"(short by {gates.min_top1_agreement - report['top1_agreement']:.4f})"
        )
    if report["mean_kl"] > gates.max_mean_kl:
        misses.append(
            f"{label}: mean KL {report['mean_kl']:.4f} > {gates.max_mean_kl} (over by {report['mean_kl'] - gates.max_mean_kl:.4f})"
        )
    drop = report["accepted_length_by_draft_tokens"][draft_tokens]["relative_drop"]
    if drop > gates.max_accepted_length_drop:
        misses.append(
            f"{label}: mean accepted length at {draft_tokens} drafts drops {100 * drop:.1f}% vs the fp32 pair "
            f"(gate {100 * gates.max_accepted_length_drop:.1f}%)"
        )
    if not report["speculative_equals_own_greedy"]:
        first = report["speculative_runs"]["mismatch"][0]
        misses.append(
            f"{label}: speculative output leaves the target's own greedy output at new token "
            f"{first['first_difference']} (k={first['draft_tokens']}) where the greedy top-2 gap "
            f"{first['greedy_top2_gap']:.4f} exceeds the near-tie allowance {report['near_tie_gap']:.4f}"
        )
    return misses


def median_ms(fn, repeats: int = 25, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure_step_costs(backend, context: list[int], max_draft: int, repeats: int = 25, warmup: int = 3) -> dict:
    """Median ms of each step kind at a context past the prompt: decode, verify(k+1),
    drafter step and (where the backend has it) a drafting round of k.

    Each kind is timed where the loops run it: a decode step right after another decode
    step (greedy), a drafting round right after a verify pass and a verify pass right after
    a drafting round (speculative; each model runs slower after the other has filled the
    caches). All kinds are measured in every repeat, so machine drift over the measurement
    hits them alike instead of making one block of calls look cheap."""
    backend.reset()
    _, hidden = backend.target(context, 0)
    pos, tok, state = len(context), context[-1], hidden[-1]
    rounds = hasattr(backend, "draft_tokens")
    times: dict[str, list[float]] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        fn(*args)
        times.setdefault(name, []).append(time.perf_counter() - t0)

    for _ in range(warmup + repeats):
        backend.target([tok], pos)
        timed("decode_ms", backend.target, [tok], pos)
        for k in range(1, max_draft + 1):
            if rounds:
                timed(f"draft_round{k}_ms", backend.draft_tokens, tok, state, pos, k)
            timed(f"verify{k + 1}_ms", backend.target, [tok] * (k + 1), pos)
        timed("draft_ms", backend.draft, tok, state, pos)
    order = ["decode_ms", *[f"verify{k + 1}_ms" for k in range(1, max_draft + 1)], "draft_ms"]
    order += [f"draft_round{k}_ms" for k in range(1, max_draft + 1) if rounds]
    return {name: round(1000 * statistics.median(times[name][warmup:]), 3) for name in order}


def drafting_ms(costs: dict, k: int) -> float:
    """Cost of drafting k tokens: one drafting-round call where the backend has it (and it
    was measured), else k drafter steps."""
    if f"draft_round{k}_ms" in costs:
        return costs[f"draft_round{k}_ms"]
    return k * costs["draft_ms"]


def predicted_speedup(tokens_per_round: float, costs: dict, k: int) -> float:
    """Speculative over greedy tokens/s at k drafts: a round yields `tokens_per_round` tokens
    (1 + the expected accepted drafts) for one verify(k+1) pass and one drafting of k,
    where greedy yields one token per decode step."""
    return tokens_per_round * costs["decode_ms"] / (costs[f"verify{k + 1}_ms"] + drafting_ms(costs, k))


def calibrate_draft_length(backend, prompts: list[list[int]], new_tokens: int, max_draft: int, step_costs=None) -> dict:
    """Acceptance per draft position, step costs (measured unless given), predicted
    tokens/s for each draft length, and the choice."""
    reached = np.zeros(max_draft + 1)
    rounds = 0

    def on_round(pos, drafts, accepted):
        nonlocal rounds
        if len(drafts) == max_draft:  # full rounds only (the last ones may be shortened)
            rounds += 1
            reached[: accepted + 1] += 1

    for ids in prompts:
        speculative_generate(backend, ids, new_tokens, max_draft, on_round=on_round)
    p_at_least = [round(float(reached[i] / rounds), 4) for i in range(1, max_draft + 1)]
    measured = step_costs is None
    if not measured:
        needed = ["decode_ms", "draft_ms"] + [f"verify{k + 1}_ms" for k in range(1, max_draft + 1)]
        missing = [k for k in needed if not isinstance(step_costs.get(k), (int, float))]
        if missing:
            raise ValueError(f"step costs lack {missing}; give milliseconds for {needed}")
    costs = measure_step_costs(backend, prompts[0], max_draft) if measured else dict(step_costs)
    greedy_tok_s = 1000 / costs["decode_ms"]
    predicted = {
        k: round(greedy_tok_s * predicted_speedup(1 + sum(p_at_least[:k]), costs, k), 1) for k in range(1, max_draft + 1)
    }
    best = max(predicted, key=predicted.get)
    greedy = round(greedy_tok_s, 1)
    return {
        "rounds": rounds,
        "p_at_least_i_accepted": p_at_least,
        "step_costs_ms": costs,
        "step_costs_source": "measured" if measured else "given",
        "predicted_tok_s": {str(k): v for k, v in predicted.items()},
        "predicted_greedy_tok_s": greedy,
        "draft_tokens": best,
        "predicted_speedup": round(predicted[best] / greedy, 3),
    }
