"""`make export TARGET=<t>` / `python -m export --target <t>`.

Steps today:
1. read and check the pair (strict weight mapping, pair compatibility);
2. reference check: on a held-out prompt that runs past two sliding windows, transformers'
   speculative output must equal its greedy output, with the acceptance statistics printed;
3. stop, saying so: the per-target artifacts (ExecuTorch programs, quantized graphs and the
   manifest; issues 4 and 5) are not built yet, so nothing is written to OUT and the exit
   status is 3. The fp32 ONNX graphs already export (`make parity`, `make generate
   BACKEND=onnx`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from runtime.generate import DEMO_ASSISTANT, DEMO_TARGET

REPO = Path(__file__).resolve().parent.parent
KNOWN_TARGETS = ("android", "ios", "linux-x86_64")
HELDOUT_PROMPT = REPO / "calibration" / "prompts" / "heldout_inventory.py"
EXIT_NOT_EXPORTED = 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="android", help=f"deployment target: {', '.join(KNOWN_TARGETS)}")
    ap.add_argument("--checkpoint", type=Path, default=DEMO_TARGET)
    ap.add_argument("--assistant", type=Path, default=DEMO_ASSISTANT)
    ap.add_argument("--out", type=Path, default=Path("artifacts"))
    ap.add_argument("--check-tokens", type=int, default=64, help="new tokens in the reference check")
    args = ap.parse_args(argv)
    if args.target not in KNOWN_TARGETS:
        print(f"error: unknown target {args.target!r}; known: {', '.join(KNOWN_TARGETS)}", file=sys.stderr)
        return 2

    from export.checkpoint import CheckpointError
    from runtime.generate import load_tokenizer
    from runtime.reference import ReferencePair

    t0 = time.time()
    print(f"[1/3] reading {args.checkpoint} and {args.assistant}", flush=True)
    try:
        pair = ReferencePair.from_dirs(args.checkpoint, args.assistant)
        ids = load_tokenizer(args.checkpoint).encode(HELDOUT_PROMPT.read_text()).ids
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_target = sum(p.numel() for p in pair.target.parameters())
    n_drafter = sum(p.numel() for p in pair.drafter.parameters())
    print(f"      target {n_target / 1e6:.2f}M parameters, drafter {n_drafter / 1e6:.2f}M parameters")

    print(f"[2/3] reference check: {len(ids)}-token held-out prompt, {args.check_tokens} new tokens", flush=True)
    greedy, g_stats = pair.generate(ids, args.check_tokens, 0, stop_at_eos=False)
    spec, s_stats = pair.generate(ids, args.check_tokens, 4, stop_at_eos=False)
    if greedy != spec:
        first = next(i for i, (a, b) in enumerate(zip(greedy, spec)) if a != b)
        print(f"error: speculative output differs from greedy at new token {first}", file=sys.stderr)
        return 1
    print(
        f"      speculative == greedy; mean accepted length {s_stats.mean_accepted_length:.2f} with 4 drafts "
        f"({s_stats.accepted}/{s_stats.drafted} drafts accepted) [{time.time() - t0:.1f}s]"
    )
    print(
        f"[3/3] NOT EXPORTED: the {args.target!r} artifacts (ExecuTorch .pte, quantized graphs, manifest) are "
        f"not built yet (open issues 4-5); nothing was written to {args.out}. fp32 ONNX graphs: "
        "`make parity` / `make generate BACKEND=onnx`.",
        file=sys.stderr,
    )
    return EXIT_NOT_EXPORTED


if __name__ == "__main__":
    sys.exit(main())
