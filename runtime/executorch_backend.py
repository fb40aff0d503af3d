"""ExecuTorch backend for the shared loops (runtime/loop.py), on `executorch.runtime`.

The program (`pair.pte`, export/executorch_export.py) keeps the caches inside: mutable
buffers shared by its methods, so a step passes token ids and positions only:
- `target(ids, start)`: `target_step(tokens [1, N], input_pos [1])` -> logits, hidden, in
  chunks of at most `prefill_chunk` tokens;
- `draft(token, state, position)`: `draft_step(token [1, 1], state [1, 1, H], input_pos [1])`
  -> logits, projected state; it reads the caches the target method wrote;
- `draft_tokens(token, state, position, k)`: `draft_k{k}` (same inputs) -> the k greedy
  drafts of a round in one call;
- `reset()`: `reset_caches()` zero-fills the caches (positions alone already hide stale
  entries; this guards against a runtime handing out uninitialised buffer memory).

ExecuTorch's Python runtime takes torch tensors, so unlike the onnxruntime backend this one
imports torch (ExecuTorch itself depends on it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from runtime.loop import chained_drafts, prefill_chunks
from runtime.artifacts import LAYOUT_FILE, ArtifactError

PROGRAM_FILE = "pair.pte"


class ExecuTorchBackend:
    name = "executorch"

    def __init__(self, artifacts: str | Path, prefill_chunk: int = 256, program_file: str = PROGRAM_FILE):
        from executorch.runtime import Runtime

        self.dir = Path(artifacts)
        path = self.dir / program_file
        layout_file = self.dir / LAYOUT_FILE
        if not path.is_file() or not layout_file.is_file():
            raise ArtifactError(
                f"{self.dir} lacks {program_file} or {LAYOUT_FILE}: not an ExecuTorch export of this toolchain "
                "(make generate BACKEND=executorch exports one)"
            )
        self.layout = json.loads(layout_file.read_text())
        self.program = Runtime.get().load_program(str(path))
        names = set(self.program.method_names)
        missing = {"target_step", "reset_caches"} - names
        if missing:
            raise ArtifactError(f"{path} has no method(s) {sorted(missing)}; re-export it with this toolchain")
        self.target_method = self.program.load_method("target_step")
        if self.target_method.metadata.num_inputs() != 3:
            raise ArtifactError(
                f"{path}: target_step takes {self.target_method.metadata.num_inputs()} inputs, not (tokens, "
                "input_pos, logit_index): exported by an older version of this toolchain; re-export it"
            )
        self.reset_method = self.program.load_method("reset_caches")
        self.draft_method = self.program.load_method("draft_step") if "draft_step" in names else None
        self.method_names = names
        self.round_methods = {}
        self.max_context = int(self.program.load_method("get_max_context_len").execute([])[0])
        self.eos_token_ids = tuple(int(e) for e in self.program.load_method("get_eos_ids").execute([]))
        # tokens per target call: the program's bound (get_max_seq_len; the whole context in
        # programs from before it was bounded)
        bounded = "get_max_seq_len" in names
        self.max_chunk = int(self.program.load_method("get_max_seq_len").execute([])[0]) if bounded else self.max_context
        self.prefill_chunk = min(prefill_chunk, self.max_chunk, self.max_context)
        self.hidden_size = self.layout["hidden_size"]
        self.max_draft = self.layout["max_draft"]
        self.vocab_size = int(self.program.load_method("get_vocab_size").execute([])[0])
        self.reset()

    def reset(self) -> None:
        self.reset_method.execute([])
        self._sharing_checked = False

    def check_shared_caches(self, position: int) -> None:
        """Refuse drafting when the drafter methods cannot see the caches the target method
        wrote (methods loaded without shared memory arenas read empty caches: every draft
        is rejected, silently). At the first drafting call after a reset, the full producer
        cache as `shared_kv` sees it must hold position - 1 (written) and an empty last slot
        (reset, unless the context is full): an unshared arena fails one or the other, zeroed
        or not. The native runner checks the same."""
        if self._sharing_checked or "shared_kv" not in self.method_names:
            return
        key = self.program.load_method("shared_kv").execute([])[0].numpy()  # [1, kv_heads, slots, d]
        slots = key.shape[2]
        if not (np.any(key[:, :, position - 1]) and (position >= slots or not np.any(key[:, :, slots - 1]))):
            raise ArtifactError(
                "speculative decoding refused: the drafter methods do not see the caches the target method "
                "wrote (the program's methods do not share their memory arenas); every draft would be "
                "rejected. Load the program with shared arenas, or decode greedily (DRAFT_TOKENS=0)"
            )
        self._sharing_checked = True

    def target(self, ids: list[int], start: int) -> tuple[np.ndarray, np.ndarray]:
        if start + len(ids) > self.max_context:
            raise ValueError(
                f"context of {start + len(ids)} tokens exceeds the exported max_context {self.max_context}; "
                "re-export with a larger --max-context"
            )
        for a, b, rows in prefill_chunks(len(ids), self.prefill_chunk, self.max_draft):
            out = self.target_method.execute(
                [
                    torch.tensor([ids[a:b]], dtype=torch.long),
                    torch.tensor([start + a], dtype=torch.long),
                    torch.from_numpy(rows),
                ]
            )
        # the last chunk's R rows (a program before format 3 returns all of its rows); copied:
        # outputs may alias the method's memory
        return out[0][0].numpy().copy(), out[1][0][-len(rows):].numpy().copy()

    def draft(self, token: int, state: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
        if self.draft_method is None:
            raise ArtifactError(f"{self.dir / PROGRAM_FILE} has no draft_step; export it with a drafter")
        self.check_shared_caches(position)
        out = self.draft_method.execute(
            [
                torch.tensor([[token]], dtype=torch.long),
                torch.from_numpy(np.ascontiguousarray(state, dtype=np.float32)).reshape(1, 1, self.hidden_size),
                torch.tensor([position], dtype=torch.long),
            ]
        )
        return out[0][0, 0].numpy().copy(), out[1][0, 0].numpy().copy()

    def draft_tokens(self, token: int, state: np.ndarray, position: int, k: int) -> list[int]:
        """k greedy drafts in one call: equal to k `draft` steps with an argmax after each."""
        self.check_shared_caches(position)
        method = self.round_methods.get(k)
        if method is None:
            # the round method of this length, else the shortest longer one (its first k
            # drafts are the k-round's), else k single steps (a program without round methods)
            rounds = [n for n in range(k, self.max_draft + 1) if f"draft_k{n}" in self.method_names]
            if not rounds:
                return chained_drafts(self, token, state, position, k)
            method = self.round_methods[k] = self.program.load_method(f"draft_k{rounds[0]}")
        out = method.execute(
            [
                torch.tensor([[token]], dtype=torch.long),
                torch.from_numpy(np.ascontiguousarray(state, dtype=np.float32)).reshape(1, 1, self.hidden_size),
                torch.tensor([position], dtype=torch.long),
            ]
        )
        return out[0][0, :k].tolist()

    def shared_kv(self) -> dict[str, np.ndarray]:
        """The producer caches (last full and last sliding owner), read through the program's
        `shared_kv` method; for parity checks."""
        out = self.program.load_method("shared_kv").execute([])
        names = ("full.key", "full.value", "sliding.key", "sliding.value")
        return {n: t.numpy().copy() for n, t in zip(names, out)}
