"""The transformers 5.23 assistant construction bug, and our one fix for it."""

import subprocess
import sys

import pytest

from export.config import preset
from export.hf_compat import _original_kv_sharing_modes, patch_transformers


def test_unpatched_transformers_cannot_build_the_assistant():
    """The bug is real in the pinned version: if this starts passing, the patch can go."""
    cfg = preset("demo").drafter.to_hf(preset("demo").target).get_text_config()
    with pytest.raises(ValueError, match="producing a cache is different"):
        _original_kv_sharing_modes.fget(cfg)


def test_patched_modes_all_reuse_for_an_all_shared_stack():
    patch_transformers()
    cfg = preset("demo").drafter.to_hf(preset("demo").target).get_text_config()
    assert cfg.kv_sharing_modes == ["reuse"] * 4


def test_patch_leaves_targets_unchanged():
    patch_transformers()
    cfg = preset("e4b").target.to_hf()
    modes = cfg.kv_sharing_modes
    assert modes == _original_kv_sharing_modes.fget(cfg)
    assert modes[:24].count("store") == 2 and modes[22] == "store" and modes[23] == "store"
    assert modes[24:] == ["reuse"] * 18


def test_assistant_builds_in_a_fresh_interpreter():
    code = (
        "from export.config import preset\n"
        "from transformers import Gemma4AssistantForCausalLM\n"
        "p = preset('demo')\n"
        "m = Gemma4AssistantForCausalLM(p.drafter.to_hf(p.target))\n"
        "print(sum(x.numel() for x in m.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) > 0
