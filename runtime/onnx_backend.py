"""onnxruntime backend for the shared loops (runtime/loop.py). Imports no torch: numpy,
onnxruntime and the artifacts' layout.json only, so it runs where torch is absent.

Steps per call:
- `target(ids, start)`: embed graph (ids -> embeddings, PLE rows), then the target graph in
  chunks of at most `prefill_chunk` tokens (at most the export's `max_call_tokens`), its
  present caches becoming the next past. Full caches are linear (max_context slots, slot
  == position), sliding caches are window caches (runtime/artifacts.py: positions base..
  at slots 0..; before a call whose base differs, the held entries are moved, every 64
  positions), and the target session is bound to one preallocated buffer per cache
  (I/O binding) as both its past input and its present output: the graph's attention op
  (onnxruntime's GroupQueryAttention) writes a call's new entries in place, and a KV-shared
  layer's `shared.{i}.*` outputs are bound to its producer's buffers (the same entries
  written again), so no cache is allocated, copied in or copied out per call; the calls'
  own inputs and outputs are bound buffers too, kept per call shape (the embed graph writes
  the target's inputs_embeds and per_layer_inputs in place), so a call of a shape met
  before binds, allocates and converts nothing but its results' copies
  (`io_binding=False`: plain `run` with the caches as numpy feeds and fresh outputs, kept
  as the baseline `make bench-peers` measures the binding against);
- `draft(token, state, position)`: embed graph for the token, concat with the state, the
  drafter graph over the target's producer caches (last full and last sliding owner);
- `draft_tokens(token, state, position, k)`: a whole drafting round in one call of
  `drafter_k{k}.onnx` (embedding, k steps and the argmax inside the graph; bound like the
  target's calls: token, state, position and drafts in buffers, the caches in place).

Tensors several graphs hold (the token embedding table, the drafter weights; listed in
layout.json by the exporter) are read once and given to every session that uses them
(`SessionOptions.add_initializer`), so they exist once in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.artifacts import (
    LAYOUT_FILE,
    ArtifactError,
    cache_names,
    shared_kv_sources,
    shift_window,
    sliding_base,
    window_held,
)
from runtime.loop import chained_drafts, prefill_chunks

__all__ = ["ArtifactError", "LAYOUT_FILE", "OnnxBackend"]


THREADS_ENV = "GEMMA4_ORT_THREADS"  # the target session's intra-op threads when not given


def _session(path: Path, threads: int | None, shared: dict | None = None) -> ort.InferenceSession:
    """shared: initializer name -> OrtValue, used instead of the graph's own copy. threads:
    the intra-op pool (None: $GEMMA4_ORT_THREADS, else onnxruntime's default, one per core)."""
    if not path.is_file():
        raise ArtifactError(f"{path} not found; export the ONNX graphs first (make generate BACKEND=onnx ...)")
    opts = ort.SessionOptions()
    for name, value in (shared or {}).items():
        opts.add_initializer(name, value)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get(THREADS_ENV) or 0)
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxBackend:
    name = "onnx"

    def __init__(self, artifacts: str | Path, threads: int | None = None, prefill_chunk: int = 256,
                 io_binding: bool = True):
        self.dir = Path(artifacts)
        self.io_binding = io_binding
        layout_file = self.dir / LAYOUT_FILE
        if not layout_file.is_file():
            raise ArtifactError(f"{layout_file} not found: {self.dir} is not an ONNX export of this toolchain")
        self.layout = json.loads(layout_file.read_text())
        # The target gets the intra-op pool; the embedding lookup and the drafter step are too
        # small to gain from threads and run on the calling thread, so they never contend
        # with the target pool's spinning workers.
        self.shared = self._load_shared()
        self.embed_sess = self._open("embed.onnx", 1)
        self.target_sess = self._open("target.onnx", threads)
        if "logit_index" not in {i.name for i in self.target_sess.get_inputs()}:
            raise ArtifactError(
                f"{self.dir / 'target.onnx'} has no logit_index input: exported by an older version of this "
                "toolchain; re-export it"
            )
        self.has_drafter = (self.dir / "drafter.onnx").is_file()
        self.drafter_sess = None  # opened on first use, as the drafting-round graphs
        self.round_sess: dict[int, ort.InferenceSession] = {}
        self.owners = self.layout["cache_owners"]
        self.past_names = cache_names(self.owners)
        self.prefill_chunk = min(prefill_chunk, self.layout.get("max_call_tokens", self.layout["max_context"]))
        self.shared_names = shared_kv_sources(self.layout["kv_producers"])
        self.eos_token_ids = tuple(self.layout["eos_token_ids"])
        self.max_draft = self.layout["max_draft"]
        self.vocab_size = self.layout["vocab_size"]
        outputs = [o.name for o in self.target_sess.get_outputs()]
        self.result_names = outputs[:2]  # logits, last_hidden_state
        self.present_names = [o for o in outputs if o.startswith("present.")]
        if self.layout.get("sliding_cache") not in ("window", "linear"):  # linear: stop 18's, slot == position
            raise ArtifactError(
                f"{self.dir} holds ring-cache ONNX graphs from an older version of this toolchain; re-export them"
            )
        types = self.layout["layer_types"]
        self.window_names = [n for n in self.past_names if types[int(n.split(".")[1])] == "sliding_attention"]
        # shared.{i}.key/value (KV-shared layer i) -> the cache of its producer
        producers = self.layout["kv_producers"]
        self.alias_of = {o: f"past_key_values.{producers[types[int(o.split('.')[1])]]}.{o.split('.')[2]}"
                         for o in outputs if o.startswith("shared.")}
        self.caches: dict[str, np.ndarray] = {}  # the past of the next call (and, bound, its present)
        self.reset()

    def _load_shared(self) -> list[tuple[dict, ort.OrtValue, np.ndarray]]:
        """One OrtValue per tensor listed in layout.json's shared_initializers, over a read-only
        memory map of its data file: one copy for all sessions, and of a table only the pages
        of rows read become resident (the arrays stay referenced by this backend as long as
        its sessions live)."""
        out = []
        for entry in self.layout.get("shared_initializers", []):
            path = self.dir / entry["file"]
            dtype = np.dtype(entry["dtype"])
            end = entry["offset"] + int(np.prod(entry["shape"])) * dtype.itemsize
            if not path.is_file() or path.stat().st_size < end:
                raise ArtifactError(f"{path} is missing or ends inside a shared tensor; re-export the ONNX graphs")
            array = np.memmap(path, dtype=dtype, mode="r", offset=entry["offset"], shape=tuple(entry["shape"]))
            out.append((entry["users"], ort.OrtValue.ortvalue_from_numpy(array), array))
        return out

    def _open(self, graph: str, threads: int | None) -> ort.InferenceSession:
        shared = {users[graph]: value for users, value, _ in self.shared if graph in users}
        return _session(self.dir / graph, threads, shared)

    def reset(self) -> None:
        """Empty caches. Bound: nothing to do after the first time. A call reads slots below
        its own positions only (GroupQueryAttention: the valid range; the drafter: masked
        below its position), all written by this run's earlier calls, so old entries need no
        clearing, and the buffers (resident, bound) are kept: fresh ones would fault their
        pages in during the next prefill."""
        self.sliding_base = 0  # the position at slot 0 of the sliding (window) caches
        if self.io_binding and self.caches:
            return
        shapes = self.layout["cache_shapes"]
        self.caches = {name: np.zeros(shapes[name.split(".")[1]], dtype=np.float32) for name in self.past_names}
        self._calls: dict[tuple[int, int], _BoundCall] = {}  # (tokens, rows) -> bound buffers
        self._rounds: dict[int, _BoundRound] = {}  # drafts -> the round graph's bound buffers

    def embed(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        embeds, ple = self.embed_sess.run(None, {"input_ids": np.asarray([ids], dtype=np.int64)})
        return embeds, ple

    def target(self, ids: list[int], start: int) -> tuple[np.ndarray, np.ndarray]:
        if start + len(ids) > self.layout["max_context"]:
            raise ValueError(
                f"context of {start + len(ids)} tokens exceeds the exported max_context {self.layout['max_context']}; "
                "re-export with a larger --max-context"
            )
        for a, b, rows in prefill_chunks(len(ids), self.prefill_chunk, self.max_draft):
            pos = start + a
            if self.io_binding:
                call = self._call(b - a, len(rows))
                call.ids[0] = ids[a:b]
                call.positions[0] = np.arange(pos, start + b)
                call.rows[:] = rows
                self.embed_sess.run_with_iobinding(call.embed_io)  # straight into the target's inputs
                self._move_window(pos)
                self.target_sess.run_with_iobinding(call.target_io)
                # copies: the buffers are the next call's
                logits, h = call.logits[0].copy(), call.hidden[0].copy()
                continue
            embeds, ple = self.embed(ids[a:b])
            self._move_window(pos)
            feed = {
                "inputs_embeds": embeds,
                "per_layer_inputs": ple,
                "position_ids": np.arange(pos, start + b, dtype=np.int64)[None],
                "logit_index": rows,
            }
            names = [o.name for o in self.target_sess.get_outputs()]
            out = dict(zip(names, self.target_sess.run(None, {**feed, **self.caches})))
            logits, h = out[self.result_names[0]][0], out[self.result_names[1]][0]
            self.caches = {p: out[q] for p, q in zip(self.past_names, self.present_names)}
        # the last chunk's R rows (an export before format 3 returns all of its rows)
        return logits, h[-len(rows):]

    def _call(self, n: int, r: int) -> "_BoundCall":
        """The bound buffers of a target call over n tokens returning r rows, made once per
        shape (binding the caches cost ~0.15 ms on the demo pair, a third of its decode step)
        and kept for the max_draft + 4 shapes used last: a loop's decode steps and verify
        passes, and its prefill chunks (at E4B's widths a 256-token chunk's buffers are 14 MB)."""
        call = self._calls.pop((n, r), None) or _BoundCall(self, n, r)
        self._calls[n, r] = call  # the most recently used last
        if len(self._calls) > self.max_draft + 4:
            del self._calls[next(iter(self._calls))]
        return call

    def _bind_caches(self, io) -> None:
        """Each cache buffer as the target's past input and present output (written in place),
        and as the `shared.*` outputs of the KV-shared layers that read it."""
        for p, q in zip(self.past_names, self.present_names):
            _bind(io, "input", p, self.caches[p])
            _bind(io, "output", q, self.caches[p])
        for name, cache in self.alias_of.items():
            _bind(io, "output", name, self.caches[cache])

    def _move_window(self, start: int) -> None:
        """Bring the sliding caches to the base of a call starting at `start`."""
        base = sliding_base(start, self.layout)
        if base == self.sliding_base:  # every call but one in 64 positions
            return
        if base < self.sliding_base and not window_held(self.sliding_base, start, self.layout):
            raise ValueError(
                f"a call at position {start} reads positions the sliding caches no longer hold (they start at "
                f"{self.sliding_base}; a call may start at most max_draft = {self.max_draft} positions before an "
                "earlier one): reset the backend and run the sequence from its start"
            )
        shift_window([self.caches[n] for n in self.window_names], self.sliding_base, base)
        self.sliding_base = base

    def _shared_kv_feed(self, feed: dict) -> dict:
        for name, cache in self.shared_names.items():
            feed[name] = self.caches[cache]
        return feed

    def draft(self, token: int, state: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.has_drafter:
            raise ArtifactError(f"{self.dir} has no drafter.onnx; export with a drafter for speculative decoding")
        if self.drafter_sess is None:
            self.drafter_sess = self._open("drafter.onnx", 1)
        embeds, _ = self.embed([token])
        self._move_window(position)
        feed = {
            "inputs_embeds": np.concatenate([embeds[0, 0], state])[None, None],
            "position_ids": np.asarray([[position]], dtype=np.int64),
        }
        logits, projected = self.drafter_sess.run(None, self._shared_kv_feed(feed))
        return logits[0, 0], projected[0, 0]

    def draft_tokens(self, token: int, state: np.ndarray, position: int, k: int) -> list[int]:
        """k greedy drafts in one call: equal to k `draft` steps with an argmax after each."""
        sess = self.round_sess.get(k)
        if sess is None:
            graph = f"drafter_k{k}.onnx"
            if not (self.dir / graph).is_file():  # an export from before the round graphs
                return chained_drafts(self, token, state, position, k)
            sess = self.round_sess[k] = self._open(graph, 1)
        self._move_window(position)
        if self.io_binding:
            call = self._rounds.get(k)
            if call is None:
                call = self._rounds[k] = _BoundRound(self, sess, k)
            call.ids[0, 0], call.positions[0, 0] = token, position
            call.state[0, 0] = state
            sess.run_with_iobinding(call.io)
            return call.tokens[0].tolist()
        feed = {
            "input_ids": np.asarray([[token]], dtype=np.int64),
            "state": np.ascontiguousarray(state, dtype=np.float32).reshape(1, 1, -1),
            "position_ids": np.asarray([[position]], dtype=np.int64),
        }
        (tokens,) = sess.run(None, self._shared_kv_feed(feed))
        return tokens[0].tolist()


class _BoundCall:
    """A target call shape's buffers, each bound once: the token ids (the embed graph's input),
    the embeddings and PLE rows (its outputs and the target graph's inputs: no copy between
    the two graphs), positions, logit rows, and the logits and hidden-state outputs, beside
    the caches. A call writes its ids, positions and rows into the buffers and runs both
    graphs; nothing is bound, allocated or converted per call but the results' copies."""

    def __init__(self, backend: OnnxBackend, n: int, r: int):
        layout = backend.layout
        self.ids = np.zeros((1, n), np.int64)
        self.positions = np.zeros((1, n), np.int64)
        self.rows = np.zeros(r, np.int64)
        self.embeds = np.zeros((1, n, layout["hidden_size"]), np.float32)
        self.ple = np.zeros((1, n, layout["num_layers"], layout["ple_dim"]), np.float32)
        logits_name, hidden_name = backend.result_names
        # format 3: the hidden state of the R returned rows; before, of all the call's rows
        hidden_rows = r if layout.get("format_version", 0) >= 3 else n
        self.logits = np.zeros((1, r, layout["vocab_size"]), np.float32)
        self.hidden = np.zeros((1, hidden_rows, layout["hidden_size"]), np.float32)

        self.embed_io = backend.embed_sess.io_binding()
        _bind(self.embed_io, "input", "input_ids", self.ids)
        _bind(self.embed_io, "output", "inputs_embeds", self.embeds)
        _bind(self.embed_io, "output", "per_layer_inputs", self.ple)
        self.target_io = io = backend.target_sess.io_binding()
        for name, buf in (("inputs_embeds", self.embeds), ("per_layer_inputs", self.ple),
                          ("position_ids", self.positions), ("logit_index", self.rows)):
            _bind(io, "input", name, buf)
        _bind(io, "output", logits_name, self.logits)
        _bind(io, "output", hidden_name, self.hidden)
        backend._bind_caches(io)


class _BoundRound:
    """A drafting-round graph's buffers (token, target state, position, the k drafts), bound
    once beside the producer caches it reads: a round writes three values and runs."""

    def __init__(self, backend: OnnxBackend, sess: ort.InferenceSession, k: int):
        self.ids = np.zeros((1, 1), np.int64)
        self.positions = np.zeros((1, 1), np.int64)
        self.state = np.zeros((1, 1, backend.layout["hidden_size"]), np.float32)
        self.tokens = np.zeros((1, k), np.int64)
        self.io = sess.io_binding()
        for name, buf in (("input_ids", self.ids), ("state", self.state), ("position_ids", self.positions)):
            _bind(self.io, "input", name, buf)
        _bind(self.io, "output", "draft_tokens", self.tokens)
        for name, cache in backend.shared_names.items():
            _bind(self.io, "input", name, backend.caches[cache])


def _bind(io, kind: str, name: str, buf: np.ndarray) -> None:
    """Bind a C-contiguous numpy buffer as an input or output (read or written in place)."""
    getattr(io, f"bind_{kind}")(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
