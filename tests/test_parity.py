"""`make parity` on the demo pair, and proof that its checks can fail."""

from __future__ import annotations

import json

import numpy as np
import pytest

import export.cache
from runtime import parity
from tests.conftest import DEMO, PROMPTS


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    old, export.cache.CACHE_ROOT = export.cache.CACHE_ROOT, root
    try:
        yield export.cache.cached_onnx_export(DEMO / "target", DEMO / "assistant")
    finally:
        export.cache.CACHE_ROOT = old


def test_make_parity_passes_on_the_demo_pair(demo_onnx, tmp_path):
    out = tmp_path / "parity.json"
    # 96 new tokens after prompts of 430+: decode runs past a 64-token window (`make parity`: 256)
    code = parity.main(["--artifacts", str(demo_onnx), "--out", str(out), "--new-tokens", "96"])
    report = json.loads(out.read_text())
    failed = [c for c in report["checks"] if not c["ok"]]
    assert code == 0 and report["ok"] and not failed, failed
    names = [c["name"] for c in report["checks"]]
    for k in (1, 2, 3, 4):
        assert sum(f"speculative k={k} tokens" in n for n in names) == len(parity.PROMPTS)
        assert sum(f"drafts k={k} == transformers drafter" in n for n in names) == len(parity.PROMPTS)
    rollback = [c for c in report["checks"] if "rollback" in c["name"]]
    assert rollback and all(c["ok"] for c in rollback)


class Skewed:
    """A backend whose logits are off by 1e-3 relative: parity must notice."""

    def __init__(self, backend):
        self.backend, self.name, self.eos_token_ids = backend, backend.name, backend.eos_token_ids
        self.max_draft, self.caches = backend.max_draft, None

    def reset(self):
        self.backend.reset()

    def target(self, ids, start):
        logits, hidden = self.backend.target(ids, start)
        return logits * np.float32(1.001), hidden

    def draft(self, token, state, position):
        return self.backend.draft(token, state, position)


def test_parity_fails_on_a_slightly_wrong_backend(demo_onnx):
    from export.checkpoint import load_pair
    from runtime.generate import load_tokenizer
    from runtime.onnx_backend import OnnxBackend

    target, drafter = load_pair(DEMO / "target", DEMO / "assistant")
    backend = OnnxBackend(demo_onnx)
    ids = load_tokenizer(DEMO / "target").encode((PROMPTS / "heldout_config.py").read_text()).ids
    report = parity.Report()
    parity.check_prompt(
        report, parity.Reference(target, drafter), Skewed(backend), backend.layout, ids, 24, "skewed",
        transformers_speculative=False,
    )
    by_name = {c.name: c for c in report.checks}
    assert not by_name["skewed: logits, 457 positions"].ok
    assert by_name["skewed: final hidden states"].ok
