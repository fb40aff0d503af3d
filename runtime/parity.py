"""`make parity`: exported artifacts against the PyTorch (transformers) reference.

Steps, for each held-out prompt (each longer than two sliding windows):
1. reference: transformers greedy decoding for `--new-tokens` tokens (EOS ignored), then one
   transformers forward over prompt + continuation for logits, final hidden states and the
   shared K/V of the last full and last sliding cache owner at every position;
2. tensors: the backend's greedy run (prefill, then one decode step per token) captured
   step by step; logits, hidden states and the producer caches compared with the reference
   (relative max error, tolerance `RTOL`);
3. tokens: backend greedy and speculative (draft lengths 1..4) equal the reference greedy
   tokens exactly; transformers' own speculative run too;
4. drafts: at every round the backend's drafts equal the reference drafts, computed with
   transformers' `Gemma4AssistantForCausalLM` from the reference hidden state and shared K/V
   of the accepted positions (well defined there; transformers' own loop also feeds its
   drafter rejected sliding entries, see README);
5. rollback: a run with scripted drafts (the greedy continuation, corrupted on a fixed
   pattern) still matches, and the rounds cover none, some and all drafts accepted, whatever
   the drafter's quality (random-weight drafters are never accepted);
6. a table on stdout, `parity.json`, exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from calibration.quality import HELDOUT as PROMPTS  # the held-out prompt files, listed once
from runtime.artifacts import sliding_held
from runtime.loop import greedy_generate, speculative_generate, teacher_forced


# fp32 on both sides, different kernels and summation order (onnxruntime's fused MatMul /
# Softmax vs transformers' SDPA): measured max relative error 8e-7 on the demo pair and
# 6e-5 on a random-weight pair of the same shape (larger activations), over ~690 positions.
# 1e-4 is the usual fp32 bound; a wrong mask or cache slot shows up as 1e-1 and above.
# The same bound holds for ExecuTorch/XNNPACK fp32 because its graph spells tanh-GELU out
# in elementary ops (XNNPACK 1.5.1's own GELU is the erf form, ~1e-2 off on the logits).
RTOL = 1e-4
# Drafts are compared as tokens, with transformers' drafter fed the same inputs as ours: our
# target's hidden state and our producer caches (their own parity is checked above), so only
# the drafter graph differs, by fp32 rounding (~1e-7) grown through up to 4 unrolled steps
# (a random drafter grows a relative difference ~10x per step; measured 2.8e-3 at step 4
# from 1.4e-5). A different argmax is accepted only where the reference's own choice is that
# close: its top two logits, or (centroid heads) the scores of its last chosen and first
# left-out centroid, lie within this relative gap.
DRAFT_TIE = 1e-3


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    value: float | None = None


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, name, ok, detail, value=None):
        self.checks.append(Check(name, bool(ok), detail, value))
        mark = "PASS" if ok else "FAIL"
        print(f"  {mark}  {name:<48} {detail}", flush=True)

    @property
    def ok(self):
        return all(c.ok for c in self.checks)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


class ScriptedDrafts:
    """A drafter that proposes the known greedy continuation `sequence` (prompt + greedy
    tokens), with a wrong token on a fixed pattern of rounds: the first draft of every third
    round, the third draft of the next one, none in the one after. Rounds then end with none,
    some and all drafts accepted whatever the real drafter's quality (a random-weight
    drafter is never accepted), so the target's verify and rollback are exercised on every
    pair; the real drafter is checked separately against transformers' drafter."""

    def __init__(self, backend, sequence: list[int]):
        self.backend = backend
        self.sequence = list(sequence)
        self.name = backend.name
        self.eos_token_ids = backend.eos_token_ids
        self.max_draft = getattr(backend, "max_draft", None)
        self.round = -1

    def reset(self):
        self.round = -1
        self.backend.reset()

    def target(self, ids, start):
        return self.backend.target(ids, start)

    def draft_tokens(self, token, state, position, k):
        # token == sequence[position]: the drafts continue from position + 1
        drafts = self.sequence[position + 1 : position + 1 + k]
        self.round += 1
        wrong = {0: 0, 1: 2}.get(self.round % 3)
        if wrong is not None and wrong < len(drafts):
            drafts[wrong] = drafts[wrong] - 1 if drafts[wrong] else 1  # any other valid id
        return drafts


def rollback_check(backend, prompt_ids, expected, k) -> tuple[bool, dict]:
    """Speculative decoding with `ScriptedDrafts`: (tokens equal `expected`, and rounds with
    none, some and all drafts accepted all occurred; the counts)."""
    outcomes = {"none": 0, "some": 0, "all": 0}

    def count(pos, drafts, accepted):
        outcomes["none" if accepted == 0 else "all" if accepted == len(drafts) else "some"] += 1

    tokens, _, _ = speculative_generate(
        ScriptedDrafts(backend, list(prompt_ids) + list(expected)), prompt_ids, len(expected), k, on_round=count
    )
    return tokens == list(expected) and all(outcomes.values()), outcomes


class Reference:
    def __init__(self, target, drafter):
        self.target, self.drafter = target, drafter

    @torch.no_grad()
    def forward(self, ids: list[int]):
        out = self.target(torch.tensor([ids]), return_shared_kv_states=True, output_hidden_states=True)
        shared = {k: (v[0], v[1]) for k, v in out.shared_kv_states.items()}
        return out.logits[0].numpy(), out.hidden_states[-1][0].numpy(), shared, out.hidden_states[-1]

    @torch.no_grad()
    def drafts(self, seq: list[int], hidden: torch.Tensor, shared, pos: int, k: int):
        """transformers' drafter at position pos over the accepted positions < pos, from the
        target state `hidden` [1, >=pos, H] and the producer caches `shared`: the draft
        tokens, each step's logits and each step's centroid margin (relative gap between the
        last chosen and the first left-out centroid score; inf for dense heads)."""
        kv = {t: (kk[:, :, :pos], vv[:, :, :pos]) for t, (kk, vv) in shared.items()}
        token = torch.tensor([[seq[pos]]])
        state = hidden[:, pos - 1 : pos]
        out, logits, margins = [], [], []
        me = self.drafter.masked_embedding
        scores = []  # the centroid head's scores of each step, seen through a hook
        hook = None if me is None else me.centroids.register_forward_hook(lambda m, i, o: scores.append(o.flatten()))
        try:
            for _ in range(k):
                res = self.drafter(
                    inputs_embeds=torch.cat([self.target.model.embed_tokens(token), state], dim=-1),
                    position_ids=torch.tensor([[pos]]),
                    shared_kv_states=kv,
                    attention_mask=torch.ones(1, pos + 1, dtype=torch.long),
                )
                token = res.logits.argmax(-1)
                state = res.last_hidden_state
                out.append(int(token))
                logits.append(res.logits[0, 0].numpy())
                margins.append(float("inf") if me is None else _centroid_margin(scores[-1], me.centroid_intermediate_top_k))
        finally:
            if hook is not None:
                hook.remove()
        return out, logits, margins


def _centroid_margin(scores: torch.Tensor, top_k: int) -> float:
    """Relative gap between the last centroid a head keeps and the first it leaves out."""
    top = torch.sort(scores, descending=True).values
    return float((top[top_k - 1] - top[top_k]) / top[top_k - 1].abs().clamp(min=1e-12))


class BackendInputs:
    """The drafter inputs a backend holds at a round: the target's hidden state of the last
    accepted position (seen through on_target) and its producer caches, laid out as the
    reference's shared KV (positions outside what the backend's ring still holds keep the
    reference's values; the drafter's sliding window never reaches them)."""

    def __init__(self, backend, layout, shared, hidden_t: torch.Tensor):
        self.backend, self.layout = backend, layout
        self.shared, self.hidden = shared, hidden_t.clone()

    def on_target(self, start, ids, logits, hidden):
        first = start + len(ids) - len(hidden)  # a call returns its last rows' hidden states
        n = max(0, min(len(hidden), self.hidden.shape[1] - first))
        self.hidden[0, first : first + n] = torch.from_numpy(np.asarray(hidden)[:n])

    def at(self, pos: int, drafted: int):
        caches = producer_caches(self.backend, self.layout)
        if caches is None:
            return self.hidden, self.shared
        # the positions below pos the sliding cache holds now (a ring: the verify pass of this
        # round wrote positions pos..pos+drafted over its oldest slots), and their slots
        ring, ring_slots = sliding_held(self.layout, pos + drafted + 1, getattr(self.backend, "sliding_base", 0))
        keep = ring < pos
        ring, ring_slots = ring[keep], ring_slots[keep]
        lo = int(ring[0]) if len(ring) else pos
        kv = {}
        for kind, key in (("full", "full_attention"), ("sliding", "sliding_attention")):
            pair = []
            for idx, name in enumerate(("key", "value")):
                t = self.shared[key][idx][:, :, :pos].clone()
                ours = caches[f"{kind}.{name}"]
                if kind == "full":
                    t[:, :, :pos] = torch.from_numpy(np.ascontiguousarray(ours[:, :, :pos]))
                else:
                    t[:, :, lo:pos] = torch.from_numpy(np.ascontiguousarray(ours[:, :, ring_slots]))
                pair.append(t)
            kv[key] = tuple(pair)
        return self.hidden, kv


def producer_caches(backend, layout) -> dict[str, np.ndarray] | None:
    """The caches of the last full and last sliding owner, as the backend holds them."""
    if hasattr(backend, "shared_kv"):  # ExecuTorch: buffers inside the program
        return backend.shared_kv()
    caches = getattr(backend, "caches", None)
    if caches is None:
        return None
    from runtime.artifacts import shared_kv_sources

    # "shared_kv.full_attention.key" -> "full.key", the names backend.shared_kv() uses
    return {
        name.split(".", 1)[1].replace("_attention", ""): caches[source]
        for name, source in shared_kv_sources(layout["kv_producers"]).items()
    }


def check_prompt(
    report, ref, backend, layout, prompt_ids, new_tokens, label, draft_tie: float = DRAFT_TIE, transformers_speculative=True
):
    """All checks for one prompt. transformers_speculative: also run transformers' own
    assisted generation per draft length (its tokens must equal its greedy tokens; `make
    parity` reports its acceptance beside ours; tests of the exported graphs skip it)."""
    from runtime.reference import ReferencePair

    pair = ReferencePair(ref.target, ref.drafter)
    t0 = time.time()
    greedy, _ = pair.generate(prompt_ids, new_tokens, 0, stop_at_eos=False)
    seq = list(prompt_ids) + greedy
    ref_logits, ref_hidden, shared, hidden_t = ref.forward(seq[:-1])
    print(f"  [{label}] reference: {len(prompt_ids)} prompt + {new_tokens} new tokens ({time.time() - t0:.1f}s)")

    # tensors: hidden states as greedy decoding computes them (a prefill chunk returns those of
    # its last rows, a decode step its one) and of every position in verify-sized calls, with
    # the logits of every position (a call returns its last max_draft + 1 rows only), which
    # also leaves the caches holding seq[:-1]
    seen = {}

    def observe(start, ids, logits, hidden):
        for j, row in enumerate(hidden):
            seen[start + len(ids) - len(hidden) + j] = row

    ours, _, _ = greedy_generate(backend, prompt_ids, new_tokens, on_target=observe)
    at = sorted(seen)
    backend.reset()
    logits, hidden = teacher_forced(backend, seq[:-1])
    e_logits = rel_err(logits, ref_logits)
    e_hidden = max(rel_err(np.stack([seen[p] for p in at]), ref_hidden[at]), rel_err(hidden, ref_hidden))
    report.add(f"{label}: logits, {len(logits)} positions", e_logits <= RTOL, f"rel err {e_logits:.2e}", e_logits)
    report.add(f"{label}: final hidden states", e_hidden <= RTOL, f"rel err {e_hidden:.2e}", e_hidden)
    n = len(seq) - 1
    caches = producer_caches(backend, layout)
    if caches is not None:
        slots = layout["ring_slots"]
        prod = layout["kv_producers"]
        for idx, kind in enumerate(("key", "value")):
            full = caches[f"full.{kind}"][:, :, :n]
            e = rel_err(full, shared["full_attention"][idx].numpy())
            report.add(
                f"{label}: full cache {prod['full_attention']} {kind} (slots 0..{n - 1})", e <= RTOL, f"rel err {e:.2e}", e
            )
            positions, held = sliding_held(layout, n, getattr(backend, "sliding_base", 0))
            ring = caches[f"sliding.{kind}"][:, :, held]
            e = rel_err(ring, shared["sliding_attention"][idx].numpy()[:, :, positions])
            report.add(
                f"{label}: sliding cache {prod['sliding_attention']} {kind} ({slots} slots)", e <= RTOL, f"rel err {e:.2e}",
                e,
            )
    report.add(f"{label}: greedy tokens", ours == greedy, f"{_first_diff(ours, greedy)}")

    # tokens and drafts, speculative
    for k in range(1, layout["max_draft"] + 1):
        mismatched, ties = [], []

        inputs = BackendInputs(backend, layout, shared, hidden_t)

        def on_round(pos, drafts, accepted, mismatched=mismatched, ties=ties, inputs=inputs):
            state, kv = inputs.at(pos, len(drafts))
            expected, ref_logits, margins = ref.drafts(seq, state, kv, pos, len(drafts))
            for ours, theirs, lg, margin in zip(drafts, expected, ref_logits, margins):
                if ours != theirs:
                    # a near-tie in the reference's choice is not a disagreement
                    gap = float(lg[theirs] - lg[ours])
                    tie = gap <= draft_tie * abs(float(lg[theirs])) or margin <= draft_tie
                    (ties if tie else mismatched).append(pos)
                    break  # later steps start from a different token

        spec, stats, _ = speculative_generate(
            backend, prompt_ids, new_tokens, k, on_round=on_round, on_target=inputs.on_target
        )
        detail = f"{_first_diff(spec, greedy)}; mean accepted length {stats.mean_accepted_length:.2f}"
        hf_ok = True
        if transformers_speculative:
            hf_spec, hf_stats = pair.generate(prompt_ids, new_tokens, k, stop_at_eos=False)
            hf_ok = hf_spec == greedy
            detail += f" (transformers {hf_stats.mean_accepted_length:.2f})"
        report.add(f"{label}: speculative k={k} tokens", spec == greedy and hf_ok, detail, stats.mean_accepted_length)
        report.add(
            f"{label}: drafts k={k} == transformers drafter",
            not mismatched,
            f"{stats.verify_passes} rounds, {len(mismatched)} differ"
            + (f" (first at {mismatched[0]})" if mismatched else "")
            + (f", {len(ties)} near-ties" if ties else ""),
            len(ties),
        )

    ok, outcomes = rollback_check(backend, prompt_ids, greedy, 4)
    report.add(
        f"{label}: scripted drafts k=4 (rollback)",
        ok,
        f"rounds with none/some/all accepted: {outcomes['none']}/{outcomes['some']}/{outcomes['all']}",
    )


def _first_diff(a, b) -> str:
    if a == b:
        return f"{len(a)} tokens identical"
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at new token {i}"


def open_backends(args) -> dict:
    """name -> (artifacts dir, backend, quantized): cached exports of the checkpoints, an
    earlier export dir, or a `make export` output (its manifest's hashes verified first)."""
    from export.cache import cached_executorch_export, cached_onnx_export
    from runtime.executorch_backend import PROGRAM_FILE, ExecuTorchBackend
    from runtime.onnx_backend import OnnxBackend

    def open_dir(d: Path):
        return ExecuTorchBackend(d) if (d / PROGRAM_FILE).is_file() else OnnxBackend(d)

    if args.artifacts is not None:
        if (args.artifacts / "manifest.json").is_file():
            from export.build import verify_manifest

            manifest = verify_manifest(args.artifacts)
            print(f"manifest: {len(manifest['files'])} files match their sha256")
            out = {}
            for fmt, entry in manifest["formats"].items():
                d = args.artifacts / entry["directory"]
                linear = (manifest["quantization"].get(fmt) or {}).get("linear", "fp32")
                out[fmt] = (d, open_dir(d), linear != "fp32")
            return out
        if (args.artifacts / PROGRAM_FILE).is_file():
            return {"executorch": (args.artifacts, ExecuTorchBackend(args.artifacts), False)}
        return {"onnx": (args.artifacts, OnnxBackend(args.artifacts), False)}
    out = {}
    if args.backend in ("onnx", "all"):
        d = cached_onnx_export(args.checkpoint, args.assistant)
        out["onnx"] = (d, OnnxBackend(d), False)
    if args.backend in ("executorch", "all"):
        d = cached_executorch_export(args.checkpoint, args.assistant)
        out["executorch"] = (d, ExecuTorchBackend(d), False)
    return out


def check_quantized(report, ref, backend, layout, prompts, new_tokens, label, gates, draft_tokens, extra_prompts) -> None:
    """A quantized export cannot match fp32 to 1e-4; it is held to its target's quality gates
    instead, and its own speculative output must equal its own greedy output exactly."""
    from calibration.quality import quality_report
    from runtime.eager_backend import EagerBackend
    from runtime.reference import ReferencePair

    fp32 = EagerBackend(ref.target, ref.drafter, layout["max_context"], layout["max_draft"])
    q = quality_report(
        backend, fp32, ReferencePair(ref.target, ref.drafter), prompts, new_tokens, layout["max_draft"], extra_prompts
    )
    report.add(f"{label}: top-1 agreement vs fp32", q["top1_agreement"] >= gates.min_top1_agreement,
               f"{q['top1_agreement']:.4f} (gate >= {gates.min_top1_agreement})", q["top1_agreement"])
    report.add(f"{label}: mean KL vs fp32", q["mean_kl"] <= gates.max_mean_kl,
               f"{q['mean_kl']:.5f} (gate <= {gates.max_mean_kl})", q["mean_kl"])
    runs = q["speculative_runs"]
    report.add(f"{label}: speculative k=1..{layout['max_draft']} == own greedy", q["speculative_equals_own_greedy"],
               f"{runs['identical']} runs identical, {len(runs['near_tie'])} part at a near-tie "
               f"(gap <= {q['near_tie_gap']:.4f}), {len(runs['mismatch'])} mismatches")
    drop = q["accepted_length_by_draft_tokens"][draft_tokens]["relative_drop"]
    report.add(f"{label}: accepted length at {draft_tokens} drafts vs fp32 pair", drop <= gates.max_accepted_length_drop,
               f"drop {100 * drop:.1f}% (gate {100 * gates.max_accepted_length_drop:.0f}%)", drop)
    ok, outcomes = True, {"none": 0, "some": 0, "all": 0}
    for ids in prompts:
        own, _, _ = greedy_generate(backend, ids, new_tokens)
        same, counts = rollback_check(backend, ids, own, 4)
        ok &= same
        outcomes = {key: outcomes[key] + counts[key] for key in outcomes}
    report.add(f"{label}: scripted drafts k=4 (rollback)", ok,
               f"rounds with none/some/all accepted: {outcomes['none']}/{outcomes['some']}/{outcomes['all']}")


def main(argv=None) -> int:
    from runtime.generate import add_pair_arguments, load_tokenizer

    ap = argparse.ArgumentParser(prog="python -m runtime.parity", description=__doc__.split("\n")[0])
    add_pair_arguments(ap)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument(
        "--backend",
        choices=("onnx", "executorch", "all"),
        default="all",
        help="exported backends to check (default: all; with --artifacts, the one that directory holds)",
    )
    ap.add_argument("--out", type=Path, default=Path("artifacts/parity/parity.json"))
    ap.add_argument(
        "--draft-tie",
        type=float,
        default=DRAFT_TIE,
        help=f"relative near-tie allowance for drafts (default {DRAFT_TIE:g}): a draft that differs from "
        "transformers' drafter (fed the same inputs) counts only where the reference's own choice is that close",
    )
    args = ap.parse_args(argv)

    from export.checkpoint import load_pair

    try:
        target, drafter = load_pair(args.checkpoint, args.assistant)
        tok = load_tokenizer(args.checkpoint)
        if drafter is None:
            raise ValueError("parity needs a drafter (ASSISTANT)")
        backends = open_backends(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ref = Reference(target, drafter)
    report = Report()
    prompts = [(path.stem, tok.encode(path.read_text()).ids) for path in PROMPTS]
    for name, (artifacts, backend, quantized) in backends.items():
        if quantized:
            from export.build import manifest_gates

            manifest = json.loads((artifacts.parent / "manifest.json").read_text())
            gates = manifest_gates(manifest)  # the gates it was built with, not today's targets/
            print(f"parity: {name} {artifacts} (quantized) vs fp32 transformers, against the target's gates")
            from calibration.quality import calibration_prompts

            calib = calibration_prompts(tok)
            check_quantized(
                report, ref, backend, backend.layout, [p for _, p in prompts], args.new_tokens, name, gates,
                manifest["draft_tokens"], calib,
            )
            continue
        print(f"parity: {name} {artifacts} vs transformers, tolerance rel {RTOL:g}")
        for stem, ids in prompts:
            check_prompt(report, ref, backend, backend.layout, ids, args.new_tokens, f"{name}/{stem}", args.draft_tie)
    from runtime.results import command_line

    subject = ", ".join(f"{name} {artifacts}" for name, (artifacts, _, _) in backends.items())
    record = {
        "ok": report.ok,
        "rtol": RTOL,
        "subject": f"{subject} vs transformers ({args.checkpoint.name} + {args.assistant.name})",
        "command": command_line("runtime.parity", argv),
        "checks": [c.__dict__ for c in report.checks],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    failed = [c for c in report.checks if not c.ok]
    print(f"\n{len(report.checks) - len(failed)} passed, {len(failed)} failed  (details: {args.out})")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
