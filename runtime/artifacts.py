"""What an export directory holds, as every runtime reads it: the one place for the names
and conventions that the exporters (export/) write and the runtimes (runtime/) read.
Imports nothing beyond the standard library.

- `LAYOUT_FILE`: layout.json, the cache layout and ids of an export (written by
  `export.modules.layout_dict`);
- `ArtifactError`: a directory that is missing files or does not fit this runtime;
- `eos_ids`: a config's EOS field (an id, a list, or None) as a tuple;
- `cache_names`, `SHARED_KV_NAMES`, `shared_kv_sources`: the cache tensors of the target
  graph and which of them the drafter reads (the last full and last sliding cache owner);
- `sliding_base`, `window_held`, `shift_window`, `sliding_held`: the window caches of the
  ONNX graphs (layout.json `sliding_cache: "window"`) and where a sliding cache of either
  kind holds which position.

Sliding caches come in two kinds:
- "ring" (the .pte): `ring_slots` slots, position p at slot p % ring_slots;
- "window" (the ONNX graphs): `ring_slots` slots holding the positions base..base +
  ring_slots - 1 at slots 0.., where base = `sliding_base(p)` is a function of the start
  position p of the call about to run, a multiple of `sliding_block`, at most p - window - 1
  - max_draft (every position a call at p reads stays held, also for a call that starts up
  to max_draft positions earlier). When a call's base differs from the buffers', the
  runtime first moves the held entries by the difference (`shift_window`; every
  `sliding_block` positions, a copy of about a window). The graphs compute the same base
  from their position input. Slots stay position - base, so the graph's attention op
  (GroupQueryAttention, causal over slot order) reads a window's worth of slots instead of
  every position since the start: a long prompt's sliding layers attend over at most
  ring_slots = window + max_draft + block + call tokens keys.
"""

from __future__ import annotations

LAYOUT_FILE = "layout.json"
SLIDING = "sliding_attention"
FULL = "full_attention"
SHARED_KV_NAMES = [f"shared_kv.{t}.{kv}" for t in (FULL, SLIDING) for kv in ("key", "value")]


class ArtifactError(ValueError):
    """An artifacts directory that is missing files or does not fit this runtime."""


def eos_ids(value) -> tuple[int, ...]:
    """EOS as configs write it (one id, a list of ids, or None) -> a tuple of ids."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def cache_names(owners, prefix: str = "past_key_values") -> list[str]:
    """Key and value tensor names of the cache-owning layers, in the target graph's order."""
    return [f"{prefix}.{i}.{kv}" for i in owners for kv in ("key", "value")]


def shared_kv_sources(kv_producers: dict) -> dict[str, str]:
    """Drafter input name -> the target cache it reads (`kv_producers`: layer type -> the
    last layer of that type that owns a cache, as layout.json records it)."""
    return {
        f"shared_kv.{t}.{kv}": f"past_key_values.{kv_producers[t]}.{kv}" for t in (FULL, SLIDING) for kv in ("key", "value")
    }


def sliding_base(position: int, layout: dict) -> int:
    """The position held by slot 0 of a window cache during a call starting at `position`
    (0 for ring caches): a multiple of `sliding_block` at most position - window - 1 -
    max_draft, so that a call may also start up to max_draft positions before an earlier
    one (a verify pass after single steps) and still find its window held. The graphs' own
    copy: export.modules.CacheLayout.sliding_base."""
    if layout.get("sliding_cache") != "window":
        return 0
    block = layout["sliding_block"]
    return max(0, position - layout["sliding_window"] - 1 - layout["max_draft"]) // block * block


def window_held(old_base: int, start: int, layout: dict) -> bool:
    """Whether window caches at `old_base` still hold every position a call at `start` reads
    (from start - window - 1 on, the drafter's reach)."""
    return old_base <= max(0, start - layout["sliding_window"] - 1)


def shift_window(buffers, old: int, new: int) -> None:
    """Move window caches ([1, heads, slots, d] arrays, in place) from base `old` to `new`:
    slot s takes what slot s + (new - old) held (new < old: the entries move up, the slots
    left below hold nothing a call reads; see `window_held`). numpy copies overlapping
    ranges correctly."""
    shift = new - old
    for buf in buffers:
        slots = buf.shape[2]
        if 0 < shift < slots:
            buf[:, :, : slots - shift] = buf[:, :, shift:]
        elif 0 < -shift < slots:
            buf[:, :, -shift:] = buf[:, :, : slots + shift]


def sliding_held(layout: dict, end: int, base: int = 0):
    """(positions, slots): the positions below `end` that a sliding cache holds and their
    slots: a ring holds the last ring_slots positions, a window those from its base."""
    import numpy as np

    slots = layout["ring_slots"]
    if layout.get("sliding_cache") == "window":
        positions = np.arange(base, end)
        return positions, positions - base
    positions = np.arange(max(0, end - slots), end)
    return positions, positions % slots
