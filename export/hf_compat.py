"""The one place where this project adjusts transformers 5.23.0.

transformers 5.23.0 cannot build `Gemma4AssistantForCausalLM` as released: the assistant
config forces `num_kv_shared_layers == num_hidden_layers`, and
`Gemma4TextConfig.kv_sharing_modes` then raises "The set of layer types producing a cache is
different than the set of layer types using them", because no layer is left to produce a
cache. For an all-shared stack every layer simply reuses the K/V it is handed (the target's
shared KV), so the right answer is `["reuse"] * num_hidden_layers`. Every other case keeps
the original behaviour.
"""

from __future__ import annotations

import transformers
from transformers import Gemma4TextConfig

TESTED_TRANSFORMERS = "5.23.0"

_original_kv_sharing_modes = Gemma4TextConfig.kv_sharing_modes


def _kv_sharing_modes(self) -> list[str | None]:
    if self.num_kv_shared_layers and self.num_kv_shared_layers == self.num_hidden_layers:
        return ["reuse"] * self.num_hidden_layers
    return _original_kv_sharing_modes.fget(self)


def patch_transformers() -> None:
    """Idempotent; call before building a Gemma 4 assistant."""
    if transformers.__version__ != TESTED_TRANSFORMERS:
        raise RuntimeError(
            f"transformers {transformers.__version__} is installed; this toolchain is pinned to "
            f"{TESTED_TRANSFORMERS}. Run `make` targets (they use the project venv) or "
            f"`pip install transformers=={TESTED_TRANSFORMERS}`."
        )
    if Gemma4TextConfig.kv_sharing_modes is _original_kv_sharing_modes:
        Gemma4TextConfig.kv_sharing_modes = property(_kv_sharing_modes)


def is_patched() -> bool:
    return Gemma4TextConfig.kv_sharing_modes is not _original_kv_sharing_modes
