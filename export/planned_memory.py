"""Planned memory of an ExecuTorch program, per method: the arenas ExecuTorch's memory planner
sized at export (activations; mutable buffers such as the KV caches), which a phone must
hold while the method runs.

    python -m export.planned_memory artifacts/android/executorch/pair.pte
    python -m export.planned_memory --synthetic-vocab 262144 --out DIR

`--synthetic-vocab V` first exports `target_step` of a tiny-width random target (the e4b
random shape's layers, hidden 64) with a V-token vocabulary at max_context 1024, so the part
of the plan that scales with the vocabulary shows without a real-size checkpoint: the logits
a target call returns (at most max_draft + 1 rows since format 2; max_context rows before).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def planned_arenas(pte: Path) -> dict[str, list[int]]:
    """method -> bytes of each planned arena (index 0 is reserved; 1: activations; 2: mutable buffers)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(Path(pte).read_bytes())
    program = getattr(program, "program", program)
    return {plan.name: list(plan.non_const_buffer_sizes) for plan in program.execution_plan}


def synthetic_program(vocab: int, out: Path, max_context: int = 1024, max_draft: int = 4) -> Path:
    import dataclasses

    import torch

    from export.executorch_export import export_executorch
    from export.hf_compat import patch_transformers
    from export.random_pair import SHAPES

    patch_transformers()
    from transformers import Gemma4ForCausalLM

    spec = dataclasses.replace(
        SHAPES["e4b"].target, vocab_size=vocab, ple_vocab_size=vocab, hidden_size=64, intermediate_size=128
    )
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(spec.to_hf()).eval()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "target_step.pte"
    export_executorch(model, None, path, max_context, max_draft, methods=("target_step",))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.planned_memory", description=__doc__.split("\n")[0])
    ap.add_argument("pte", nargs="?", type=Path, help="a .pte file")
    ap.add_argument("--synthetic-vocab", type=int, help="export a tiny-width target with this vocabulary first")
    ap.add_argument("--out", type=Path, default=Path("artifacts/planned_memory"), help="folder for the synthetic program")
    args = ap.parse_args(argv)
    if args.synthetic_vocab:
        args.pte = synthetic_program(args.synthetic_vocab, args.out)
    if args.pte is None or not args.pte.is_file():
        print("error: give a .pte file (or --synthetic-vocab V)", file=sys.stderr)
        return 2
    print(f"{args.pte}: planned arenas per method (MB)")
    print(f"  {'method':<16}{'activations':>14}{'mutable buffers':>18}")
    for name, sizes in sorted(planned_arenas(args.pte).items()):
        if not any(sizes):
            continue  # constant (metadata) methods
        act = sizes[1] if len(sizes) > 1 else 0
        mut = sizes[2] if len(sizes) > 2 else 0
        print(f"  {name:<16}{act / 1e6:>14.1f}{mut / 1e6:>18.1f}")
    print("  (the methods share the mutable buffers; loaded with shared arenas, as the runners here load a program, they share one activation arena of the largest size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
