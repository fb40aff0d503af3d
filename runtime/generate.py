"""`make generate` / `python -m runtime.generate`: greedy or speculative generation.

Steps:
1. resolve the prompt (text, a file, or comma-separated ids) into token ids with the
   target's tokenizer.json;
2. build the backend named by --backend from the registry (`torch`: the transformers
   reference);
3. generate, streaming text to stdout as tokens arrive (or, with --json, print one JSON
   object with `new_token_ids`, `text` and `stats` at the end).

Python entry point: `runtime.generate.generate(prompt=..., max_new_tokens=..., ...)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.native_runner import NativeError

REPO = Path(__file__).resolve().parent.parent
DEMO_TARGET = REPO / "export" / "demo" / "weights" / "target"
DEMO_ASSISTANT = REPO / "export" / "demo" / "weights" / "assistant"


class UsageError(ValueError):
    """Bad command-line input; the message says what to do."""


@dataclass
class GenerateResult:
    prompt_ids: list[int]
    new_token_ids: list[int]
    text: str
    stats: object  # runtime.stats.GenerationStats

    def to_dict(self) -> dict:
        return {
            "prompt_ids": self.prompt_ids,
            "new_token_ids": self.new_token_ids,
            "text": self.text,
            "stats": self.stats.to_dict(),
        }


def load_tokenizer(checkpoint: Path):
    from tokenizers import Tokenizer

    path = Path(checkpoint) / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{path} not found: the checkpoint needs a tokenizer.json for text prompts (or use --prompt-ids)")
    return Tokenizer.from_file(str(path))


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"PROMPT_IDS must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise UsageError("PROMPT_IDS is empty")
    return ids


class LoopRunner:
    """A step backend (onnx, executorch) driven by the shared loops in runtime/loop.py."""

    def __init__(self, backend):
        self.backend = backend

    def generate(self, prompt_ids, max_new_tokens, draft_tokens=0, stop_at_eos=True, on_token=None):
        from runtime.loop import greedy_generate, speculative_generate

        eos = self.backend.eos_token_ids if stop_at_eos else ()
        if draft_tokens:
            new, stats, timer = speculative_generate(
                self.backend, prompt_ids, max_new_tokens, draft_tokens, eos, on_token
            )
        else:
            new, stats, timer = greedy_generate(self.backend, prompt_ids, max_new_tokens, eos, on_token)
        stats.step_ms = timer.mean_ms()
        return new, stats


def _torch_backend(checkpoint: Path, assistant: Path | None, artifacts: Path | None):
    from runtime.reference import ReferencePair

    if artifacts is not None:
        raise UsageError("ARTIFACTS applies to exported backends (onnx, executorch); the torch reference reads CHECKPOINT")
    return ReferencePair.from_dirs(checkpoint, assistant)


def _onnx_backend(checkpoint: Path, assistant: Path | None, artifacts: Path | None):
    from runtime.onnx_backend import OnnxBackend

    if artifacts is None:
        from export.cache import cached_onnx_export  # needs torch: only when exporting

        artifacts = cached_onnx_export(checkpoint, assistant)
    return LoopRunner(OnnxBackend(artifacts))


def _executorch_backend(checkpoint: Path, assistant: Path | None, artifacts: Path | None):
    from runtime.executorch_backend import ExecuTorchBackend

    if artifacts is None:
        from export.cache import cached_executorch_export

        artifacts = cached_executorch_export(checkpoint, assistant)
    return LoopRunner(ExecuTorchBackend(artifacts))


def _native_backend(checkpoint: Path, assistant: Path | None, artifacts: Path | None):
    from runtime.native_runner import NativeRunner

    if artifacts is None:
        from export.cache import cached_executorch_export

        artifacts = cached_executorch_export(checkpoint, assistant)
    return NativeRunner(artifacts)


BACKENDS: dict[str, Callable] = {
    "torch": _torch_backend,
    "onnx": _onnx_backend,
    "executorch": _executorch_backend,
    "native": _native_backend,  # the C++ runner over the .pte (make native)
}


def make_backend(name: str, checkpoint: Path, assistant: Path | None, artifacts: Path | None = None):
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise UsageError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None
    return factory(checkpoint, assistant, artifacts)


def generate(
    prompt: str | None = None,
    prompt_ids: list[int] | None = None,
    max_new_tokens: int = 64,
    draft_tokens: int = 0,
    backend: str = "torch",
    checkpoint: str | Path = DEMO_TARGET,
    assistant: str | Path | None = DEMO_ASSISTANT,
    stop_at_eos: bool = True,
    on_text: Callable[[str], None] | None = None,
    artifacts: str | Path | None = None,
) -> GenerateResult:
    """Generate from a text prompt or from token ids. draft_tokens=0 is greedy decoding."""
    if (prompt is None) == (prompt_ids is None):
        raise UsageError("give exactly one of a text prompt or prompt token ids")
    checkpoint = Path(checkpoint)
    artifacts = Path(artifacts) if artifacts else None
    tokenizer = load_tokenizer(artifacts or checkpoint) if prompt is not None or on_text else None
    ids = tokenizer.encode(prompt).ids if prompt is not None else list(prompt_ids)
    runner = make_backend(backend, checkpoint, Path(assistant) if assistant else None, artifacts)

    on_token = None
    if on_text is not None:
        streamed: list[int] = []
        printed = [""]

        def on_token(tok: int) -> None:
            streamed.append(tok)
            text = tokenizer.decode(streamed)
            if text.startswith(printed[0]):  # emit whole characters only
                on_text(text[len(printed[0]) :])
                printed[0] = text

    new_ids, stats = runner.generate(ids, max_new_tokens, draft_tokens, stop_at_eos=stop_at_eos, on_token=on_token)
    text = tokenizer.decode(new_ids) if tokenizer else ""
    return GenerateResult(ids, new_ids, text, stats)


def add_pair_arguments(ap: argparse.ArgumentParser) -> None:
    """--checkpoint, --assistant, --artifacts: shared by generate, parity and bench."""
    ap.add_argument("--checkpoint", type=Path, default=DEMO_TARGET, help="target checkpoint dir (default: demo)")
    ap.add_argument("--assistant", type=Path, default=DEMO_ASSISTANT, help="drafter checkpoint dir (default: demo)")
    ap.add_argument("--artifacts", type=Path, help="an earlier export dir (default: export, cached, from the checkpoints)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m runtime.generate",
        description="Greedy or MTP-speculative generation with a Gemma 4 target and its drafter.",
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draft-tokens", type=int, default=0, help="drafts per round; 0 = greedy (default)")
    ap.add_argument("--backend", default="torch", help=f"one of: {', '.join(sorted(BACKENDS))}")
    add_pair_arguments(ap)
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    args = ap.parse_args(argv)

    try:
        if args.prompt_file is not None:
            if not args.prompt_file.is_file():
                raise UsageError(f"PROMPT_FILE {args.prompt_file} does not exist")
            prompt, ids = args.prompt_file.read_text(encoding="utf-8"), None
        elif args.prompt_ids is not None:
            prompt, ids = None, parse_prompt_ids(args.prompt_ids)
        else:
            prompt, ids = (args.prompt if args.prompt is not None else "def main():\n"), None
        on_text = None if args.json else (lambda s: print(s, end="", flush=True))
        result = generate(
            prompt=prompt,
            prompt_ids=ids,
            max_new_tokens=args.max_new_tokens,
            draft_tokens=args.draft_tokens,
            backend=args.backend,
            checkpoint=args.checkpoint,
            assistant=args.assistant,
            stop_at_eos=not args.ignore_eos,
            on_text=on_text,
            artifacts=args.artifacts,
        )
    except (ValueError, OSError) as e:  # UsageError, CheckpointError, ArtifactError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NativeError as e:  # a run the native runner refused or that failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        s = result.stats
        print(
            f"\n\n[{args.backend}] {s.new_tokens} tokens in {s.seconds:.2f}s ({s.tokens_per_second:.1f} tok/s), "
            f"target passes {s.target_passes}, drafted {s.drafted}, accepted {s.accepted}, "
            f"mean accepted length {s.mean_accepted_length:.2f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
