"""What an export directory holds, as every runtime reads it: the one place for the names
and conventions that the exporters (export/) write and the runtimes (runtime/) read.
Imports nothing beyond the standard library.

- `LAYOUT_FILE`: layout.json, the cache layout and ids of an export (written by
  `export.modules.layout_dict`);
- `ArtifactError`: a directory that is missing files or does not fit this runtime;
- `eos_ids`: a config's EOS field (an id, a list, or None) as a tuple;
- `cache_names`, `SHARED_KV_NAMES`, `shared_kv_sources`: the cache tensors of the target
  graph and which of them the drafter reads (the last full and last sliding cache owner).
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
