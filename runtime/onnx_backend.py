"""onnxruntime backend for the shared loops (runtime/loop.py). Imports no torch: numpy,
onnxruntime and the artifacts' layout.json only, so it runs where torch is absent.

Steps per call:
- `target(ids, start)`: embed graph (ids -> embeddings, PLE rows), then the target graph in
  chunks of at most `prefill_chunk` tokens, its present caches becoming the next past;
- `draft(token, state, position)`: embed graph for the token, concat with the state, the
  drafter graph over the target's producer caches (last full and last sliding owner).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

LAYOUT_FILE = "layout.json"


class ArtifactError(ValueError):
    """An artifacts directory that is missing files or does not fit this runtime."""


def _session(path: Path, threads: int | None) -> ort.InferenceSession:
    if not path.is_file():
        raise ArtifactError(f"{path} not found; export the ONNX graphs first (make generate BACKEND=onnx ...)")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxBackend:
    name = "onnx"

    def __init__(self, artifacts: str | Path, threads: int | None = None, prefill_chunk: int = 256):
        self.dir = Path(artifacts)
        layout_file = self.dir / LAYOUT_FILE
        if not layout_file.is_file():
            raise ArtifactError(f"{layout_file} not found: {self.dir} is not an ONNX export of this toolchain")
        self.layout = json.loads(layout_file.read_text())
        # The target gets the intra-op pool; the embedding lookup and the drafter step are too
        # small to gain from threads and run on the calling thread, so they never contend
        # with the target pool's spinning workers.
        self.embed_sess = _session(self.dir / "embed.onnx", 1)
        self.target_sess = _session(self.dir / "target.onnx", threads)
        drafter = self.dir / "drafter.onnx"
        self.drafter_sess = _session(drafter, 1) if drafter.is_file() else None
        self.owners = self.layout["cache_owners"]
        self.past_names = [f"past_key_values.{i}.{kv}" for i in self.owners for kv in ("key", "value")]
        self.prefill_chunk = min(prefill_chunk, self.layout["max_context"])
        producers = self.layout["kv_producers"]
        self.shared_names = {
            "shared_kv.full_attention.key": f"past_key_values.{producers['full_attention']}.key",
            "shared_kv.full_attention.value": f"past_key_values.{producers['full_attention']}.value",
            "shared_kv.sliding_attention.key": f"past_key_values.{producers['sliding_attention']}.key",
            "shared_kv.sliding_attention.value": f"past_key_values.{producers['sliding_attention']}.value",
        }
        self.eos_token_ids = tuple(self.layout["eos_token_ids"])
        self.caches: dict[str, np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        shapes = self.layout["cache_shapes"]
        self.caches = {
            f"past_key_values.{i}.{kv}": np.zeros(shapes[str(i)], dtype=np.float32)
            for i in self.owners
            for kv in ("key", "value")
        }

    def embed(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        embeds, ple = self.embed_sess.run(None, {"input_ids": np.asarray([ids], dtype=np.int64)})
        return embeds, ple

    def target(self, ids: list[int], start: int) -> tuple[np.ndarray, np.ndarray]:
        if start + len(ids) > self.layout["max_context"]:
            raise ValueError(
                f"context of {start + len(ids)} tokens exceeds the exported max_context {self.layout['max_context']}; "
                "re-export with a larger --max-context"
            )
        logits, hidden = [], []
        for c in range(0, len(ids), self.prefill_chunk):
            chunk = ids[c : c + self.prefill_chunk]
            embeds, ple = self.embed(chunk)
            pos = start + c
            feed = {
                "inputs_embeds": embeds,
                "per_layer_inputs": ple,
                "position_ids": np.arange(pos, pos + len(chunk), dtype=np.int64)[None],
                **self.caches,
            }
            out = self.target_sess.run(None, feed)
            logits.append(out[0][0])
            hidden.append(out[1][0])
            self.caches = dict(zip(self.past_names, out[2:]))
        return np.concatenate(logits), np.concatenate(hidden)

    def draft(self, token: int, state: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
        if self.drafter_sess is None:
            raise ArtifactError(f"{self.dir} has no drafter.onnx; export with a drafter for speculative decoding")
        embeds, _ = self.embed([token])
        feed = {
            "inputs_embeds": np.concatenate([embeds[0, 0], state])[None, None],
            "position_ids": np.asarray([[position]], dtype=np.int64),
        }
        for name, cache in self.shared_names.items():
            feed[name] = self.caches[cache]
        logits, projected = self.drafter_sess.run(None, feed)
        return logits[0, 0], projected[0, 0]
