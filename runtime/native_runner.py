"""`make generate BACKEND=native`: the C++ runner (native/, built by `make native`) driven as a
subprocess, behind the same `generate()` interface as the Python loops.

The runner reads everything from the `.pte` (no layout.json), streams one token id per line
and ends with one JSON line of statistics (runtime/stats.py's fields); exit 2 is bad input,
1 a refused or failed run (for example speculative decoding over unshared caches). Standard
library only: this is part of the runtime core.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from runtime.artifacts import ArtifactError
from runtime.stats import GenerationStats

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "build" / "native" / "gemma4-spec"
PROGRAM_FILE = "pair.pte"


class NativeError(RuntimeError):
    """The native runner refused or failed; the message is its own."""


class NativeRunner:
    def __init__(self, artifacts: str | Path, cli: Path = CLI, shared_arenas: bool = True, prefill_chunk: int | None = None):
        self.pte = Path(artifacts) / PROGRAM_FILE if Path(artifacts).is_dir() else Path(artifacts)
        if not self.pte.is_file():
            raise ArtifactError(f"{self.pte} not found: BACKEND=native runs an ExecuTorch export's {PROGRAM_FILE}")
        if not Path(cli).is_file():
            raise ArtifactError(f"{cli} not found: build the native runner first with `make native`")
        self.cli, self.shared_arenas, self.prefill_chunk = Path(cli), shared_arenas, prefill_chunk

    def command(self, prompt_ids, max_new_tokens, draft_tokens=0, stop_at_eos=True) -> list[str]:
        cmd = [str(self.cli), "--pte", str(self.pte), "--prompt-ids", ",".join(map(str, prompt_ids)),
               "--max-new-tokens", str(max_new_tokens), "--draft-tokens", str(draft_tokens)]
        if not stop_at_eos:
            cmd.append("--ignore-eos")
        if not self.shared_arenas:
            cmd.append("--no-shared-arenas")
        if self.prefill_chunk:
            cmd += ["--prefill-chunk", str(self.prefill_chunk)]
        return cmd

    def generate(self, prompt_ids, max_new_tokens, draft_tokens=0, stop_at_eos=True, on_token=None):
        proc = subprocess.Popen(
            self.command(prompt_ids, max_new_tokens, draft_tokens, stop_at_eos),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        new, summary = [], None
        for line in proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                summary = json.loads(line)
            elif line:
                new.append(int(line))
                if on_token is not None:
                    on_token(new[-1])
        # stderr also carries ExecuTorch's own log lines; the runner's message starts with "error: "
        errors = [line[len("error: "):] for line in proc.stderr.read().splitlines() if line.startswith("error: ")]
        rc = proc.wait()
        if rc != 0 or summary is None:
            message = "; ".join(errors) or f"the native runner stopped with exit status {rc}"
            if rc == 2:
                raise ValueError(message)  # bad input: `make generate` exits 2 with it
            raise NativeError(message)
        stats = GenerationStats(
            new_tokens=summary["new_tokens"], target_passes=summary["target_passes"],
            drafted=summary["drafted"], accepted=summary["accepted"], seconds=summary["seconds"],
        )
        return new, stats
