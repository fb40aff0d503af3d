"""`make bench`: speed of greedy and speculative decoding, measured side by side in one run.

Steps:
1. load the pair (transformers reference) and the ONNX and ExecuTorch exports (cached by
   their inputs; `--backend` picks one);
2. per-step latency at a context past two sliding windows: target decode (1 token), target
   verify (k+1 tokens) and one drafter step, in onnxruntime, ExecuTorch and PyTorch eager
   (transformers), median of repeated calls (calibration/quality.py `measure_step_costs`);
3. generation on the held-out prompts, `--new-tokens` each (EOS ignored), greedy and
   speculative for each draft length, runs interleaved and repeated:
   decode tokens/s over the prompt set = total (new tokens - 1) / total time after the
   prefill passes; speedup = median over repeats of speculative / greedy tokens/s of the
   same repeat, which cancels the drift of a shared machine;
4. predicted speedup from the measured acceptance and the step costs of the same runs:
   mean_accepted_length * decode_ms / (verify_ms(k+1) + k * draft_ms);
5. a table on stdout; under `--out`: bench.json keyed by backend and speedup.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from calibration.quality import HELDOUT as PROMPTS  # the held-out prompt files, listed once
from calibration.quality import drafting_ms, median_ms, predicted_speedup
from calibration.quality import measure_step_costs as step_costs
from runtime.loop import StepTimer, greedy_generate, speculative_generate



@torch.no_grad()
def torch_step_costs(target, drafter, context: list[int], max_draft: int) -> dict[str, float]:
    """transformers eager: one forward over new tokens with a cache of `context`."""
    ids = torch.tensor([context])
    out = target(ids, use_cache=True, return_shared_kv_states=True, output_hidden_states=True)
    cache = out.past_key_values
    cache.activate_past_recording()  # lets crop() undo each timed step, as assisted decoding does

    def step(n):
        target(torch.tensor([[context[-1]] * n]), past_key_values=cache, use_cache=True)
        cache.crop(-n)  # drop the n timed entries (negative: required once a window is full)

    costs = {"decode_ms": median_ms(lambda: step(1), repeats=15)}
    for k in range(1, max_draft + 1):
        costs[f"verify{k + 1}_ms"] = median_ms(lambda k=k: step(k + 1), repeats=15)
    shared = {k: (v[0], v[1]) for k, v in out.shared_kv_states.items()}
    inp = torch.cat([target.model.embed_tokens(ids[:, -1:]), out.hidden_states[-1][:, -1:]], dim=-1)
    pos = torch.tensor([[len(context)]])
    mask = torch.ones(1, len(context) + 1, dtype=torch.long)
    costs["draft_ms"] = median_ms(
        lambda: drafter(inputs_embeds=inp, position_ids=pos, shared_kv_states=shared, attention_mask=mask), repeats=15
    )
    return costs


def decode_time(stats, timer) -> tuple[int, float]:
    """(tokens, seconds) of the decode phase: everything after the prefill pass."""
    prefill = timer.totals.get("prefill", 0.0)
    return stats.new_tokens - 1, max(stats.seconds - prefill, 1e-9)


def bench_loops(backend, prompts, new_tokens, draft_lengths, repeats):
    """Greedy and speculative runs interleaved prompt by prompt. Per repeat, tokens/s over
    the whole prompt set (total decode tokens / total decode time) for each setting, and the
    speculative / greedy ratio of that repeat (its runs are seconds apart, so machine drift
    cancels); medians over repeats are reported."""
    rates = {k: [] for k in [0, *draft_lengths]}
    ratios = {k: [] for k in draft_lengths}
    accept = {k: [] for k in draft_lengths}
    timers = {k: StepTimer() for k in [0, *draft_lengths]}  # step costs over all runs
    for _ in range(repeats):
        tokens = {k: 0 for k in rates}
        seconds = {k: 0.0 for k in rates}
        for ids in prompts:
            for k in [0, *draft_lengths]:
                if k:
                    _, stats, timer = speculative_generate(backend, ids, new_tokens, k)
                    accept[k].append(stats.mean_accepted_length)
                else:
                    _, stats, timer = greedy_generate(backend, ids, new_tokens)
                n, t = decode_time(stats, timer)
                tokens[k] += n
                seconds[k] += t
                for kind, total in timer.totals.items():
                    timers[k].totals[kind] = timers[k].totals.get(kind, 0.0) + total
                    timers[k].counts[kind] = timers[k].counts.get(kind, 0) + timer.counts[kind]
        for k in rates:
            rates[k].append(tokens[k] / seconds[k])
        for k in draft_lengths:
            ratios[k].append(rates[k][-1] / rates[0][-1])
    return (
        {k: statistics.median(v) for k, v in rates.items()},
        {k: statistics.median(v) for k, v in ratios.items()},
        {k: statistics.mean(v) for k, v in accept.items()},
        {k: t.mean_ms() for k, t in timers.items()},
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for backend, entry in results.items():
        rows = entry["by_draft_tokens"]
        ks = [r["draft_tokens"] for r in rows]
        ax1.plot(ks, [r["speedup"] for r in rows], "o-", label=f"{backend} measured")
        ax1.plot(ks, [r["predicted_speedup"] for r in rows], "x--", label=f"{backend} predicted")
        ax2.plot(ks, [r["mean_accepted_length"] for r in rows], "o-", label=backend)
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set(xlabel="draft tokens", ylabel="speedup over greedy", title="decode speedup")
    ax2.set(xlabel="draft tokens", ylabel="tokens per verify pass", title="mean accepted length")
    for ax in (ax1, ax2):
        ax.set_xticks(ks)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    from runtime.generate import add_pair_arguments, load_tokenizer

    ap = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__.split("\n")[0])
    add_pair_arguments(ap)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-draft", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="PyTorch eager threads (default: all cores)")
    ap.add_argument(
        "--backend", choices=("onnx", "executorch", "all"), default="all", help="exported backends to measure"
    )
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench"))
    ap.add_argument(
        "--predict-from",
        type=Path,
        metavar="BENCH_JSON",
        help="with --artifacts only: measure that export's step costs (no checkpoint is read, no generation) "
        "and predict its speedup at the acceptance recorded in an earlier bench.json (e.g. results/bench-demo.json)",
    )
    ap.add_argument("--context", type=int, default=600, help="--predict-from: context length of the step costs")
    args = ap.parse_args(argv)
    if args.predict_from is not None:
        return predict_main(args, argv)

    from export.checkpoint import load_pair
    from runtime.parity import open_backends
    from runtime.reference import ReferencePair

    try:
        target, drafter = load_pair(args.checkpoint, args.assistant)
        tok = load_tokenizer(args.checkpoint)
        if drafter is None:
            raise ValueError("the benchmark needs a drafter (ASSISTANT)")
        backends = {name: b for name, (_, b, _) in open_backends(args).items()}
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = [tok.encode(p.read_text()).ids for p in PROMPTS]
    ks = list(range(1, args.max_draft + 1))

    print(f"bench: {args.checkpoint.name} + {args.assistant.name}, {len(prompts)} prompts x {args.new_tokens} tokens")
    costs = {name: step_costs(b, prompts[0], args.max_draft) for name, b in backends.items()}
    torch.set_num_threads(args.threads or torch.get_num_threads())
    costs["torch"] = torch_step_costs(target, drafter, prompts[0], args.max_draft)

    results = {}
    for name, backend in backends.items():
        print(f"  generation runs: {name}", flush=True)
        rates, ratios, accept, step_ms = bench_loops(backend, prompts, args.new_tokens, ks, args.repeats)
        results[name] = _entries(rates, ratios, accept, step_ms, costs[name], ks)

    # transformers reference: its own greedy and assisted generate, one run each per prompt
    pair = ReferencePair(target, drafter)
    ref_rates = {k: [] for k in [0, *ks]}
    ref_ratios = {k: [] for k in ks}
    ref_accept = {k: [] for k in ks}
    for ids in prompts:
        for k in [0, *ks]:
            _, st = pair.generate(ids, args.new_tokens, k, stop_at_eos=False)
            ref_rates[k].append(st.new_tokens / st.seconds)  # prefill included: generate() is one call
            if k:
                ref_ratios[k].append(ref_rates[k][-1] / ref_rates[0][-1])
                ref_accept[k].append(st.mean_accepted_length)
    results["torch"] = _entries(
        {k: statistics.median(v) for k, v in ref_rates.items()},
        {k: statistics.median(v) for k, v in ref_ratios.items()},
        {k: statistics.mean(v) for k, v in ref_accept.items()},
        None,
        costs["torch"],
        ks,
    )

    _print_table(costs, results)
    args.out.mkdir(parents=True, exist_ok=True)
    from runtime.results import command_line

    record = {
        "subject": f"{args.checkpoint.name} + {args.assistant.name}, {len(prompts)} prompts x {args.new_tokens} tokens",
        "command": command_line("runtime.bench", argv),
        "step_costs_ms": costs,
        **results,
    }
    (args.out / "bench.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(results, args.out / "speedup.png")
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'speedup.png'}")
    return 0


def predict_main(args, argv) -> int:
    """Step costs of an export alone (a real-size one: its checkpoint need not fit in memory)
    and the speedups they predict at an earlier run's mean accepted lengths: a prediction
    from measured costs, for exports whose own drafter accepts nothing (random weights)."""
    from runtime.artifacts import ArtifactError
    from runtime.parity import open_backends

    try:
        if args.artifacts is None:
            raise ValueError("--predict-from needs --artifacts (the export to measure)")
        recorded = json.loads(args.predict_from.read_text())
        opened = open_backends(args)
        if len(opened) != 1:
            raise ValueError(f"{args.artifacts} holds {len(opened)} formats; give one format's directory")
        ((name, (_, backend, _)),) = opened.items()
        rows = (recorded.get(name) or {}).get("by_draft_tokens") or []
        accept = {r["draft_tokens"]: r["mean_accepted_length"] for r in rows if r["draft_tokens"] <= backend.max_draft}
        if not accept:
            raise ValueError(f"{args.predict_from} holds no {name} acceptance (by_draft_tokens) for at most "
                             f"{backend.max_draft} drafts; give a make bench output")
    except (ValueError, OSError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # any ids in the vocabulary: the costs do not depend on them
    context = [2] + [(3 + 7 * i) % backend.vocab_size for i in range(args.context - 1)]
    print(f"step costs of {args.artifacts} ({name}) at a {args.context}-token context, {args.repeats} repeats", flush=True)
    costs = step_costs(backend, context, max(accept), repeats=args.repeats, warmup=2)
    predicted = {k: round(predicted_speedup(a, costs, k), 3) for k, a in accept.items()}
    print("  " + "  ".join(f"{k} {v:.4g}" for k, v in costs.items()))
    for k, a in accept.items():
        print(f"  k = {k}: mean accepted length {a:.2f} (recorded) -> predicted speedup {predicted[k]:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    from runtime.results import command_line

    record = {"subject": f"{args.artifacts} ({name}), step costs at {args.context} tokens",
              "command": command_line("runtime.bench", argv), "step_costs_ms": costs,
              "acceptance_from": str(args.predict_from), "mean_accepted_length": accept, "predicted_speedup": predicted}
    (args.out / "predicted.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out / 'predicted.json'}")
    return 0


def _entries(rates, ratios, accept, step_ms, costs, ks) -> dict:
    rows = []
    for k in ks:
        if step_ms:  # costs from the generation runs themselves
            decode = step_ms[0].get("decode", costs["decode_ms"])
            verify = step_ms[k].get(f"verify{k + 1}", costs[f"verify{k + 1}_ms"])
            if f"draft_round{k}" in step_ms[k]:
                drafting = step_ms[k][f"draft_round{k}"]
            else:
                drafting = k * step_ms[k].get("draft", costs["draft_ms"])
        else:
            decode, verify, drafting = costs["decode_ms"], costs[f"verify{k + 1}_ms"], drafting_ms(costs, k)
        rows.append(
            {
                "draft_tokens": k,
                "greedy_tok_s": round(rates[0], 2),
                "speculative_tok_s": round(rates[k], 2),
                "speedup": round(ratios[k], 3),
                "predicted_speedup": round(predicted_speedup(accept[k], {"decode_ms": decode, f"verify{k + 1}_ms": verify, f"draft_round{k}_ms": drafting}, k), 3),
                "mean_accepted_length": round(accept[k], 3),
                "decode_step_ms": round(decode, 4),
                "verify_step_ms": round(verify, 4),
                "draft_step_ms": round(drafting / k, 4),
                "drafting_ms": round(drafting, 4),
            }
        )
    best = max(rows, key=lambda r: r["speedup"])
    return {**best, "by_draft_tokens": rows}


def _print_table(costs, results) -> None:
    print("\nstep latency (ms, median)")
    kinds = list(dict.fromkeys(k for c in costs.values() for k in c))
    width = max(len(k) for k in kinds) + 2
    print(f"  {'backend':<11}" + "".join(f"{k:>{width}}" for k in kinds))
    for backend, c in costs.items():
        print(f"  {backend:<11}" + "".join(f"{c[k]:>{width}.3f}" if k in c else f"{'-':>{width}}" for k in kinds))
    print("\ngeneration (decode tokens/s after prefill)")
    print(f"  {'backend':<8}{'k':>3}{'greedy':>10}{'spec':>10}{'speedup':>9}{'predicted':>10}{'accepted':>10}")
    for backend, entry in results.items():
        for r in entry["by_draft_tokens"]:
            print(
                f"  {backend:<8}{r['draft_tokens']:>3}{r['greedy_tok_s']:>10.1f}{r['speculative_tok_s']:>10.1f}"
                f"{r['speedup']:>9.2f}{r['predicted_speedup']:>10.2f}{r['mean_accepted_length']:>10.2f}"
            )


if __name__ == "__main__":
    sys.exit(main())
