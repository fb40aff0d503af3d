"""Shared fixtures: the shipped demo pair, and a randomly initialised pair of the same shape
that tests may corrupt freely."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "export" / "demo" / "weights"
PROMPTS = REPO / "calibration" / "prompts"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """`make test` runs on two xdist workers (--dist loadgroup): every test module is one
    group, so that its module-scoped exports are built once, on one worker. This hook must run
    before xdist's own, which turns the marks into node-id suffixes (hence tryfirst); pytest
    is pinned to 8.4, since xdist 3.8's suffix is ignored by pytest 9 (it reads `_id`)."""
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    # the groups that lower ExecuTorch programs (minutes each) first, so that xdist hands them
    # out before the short ones, which then fill the other worker's gaps
    items.sort(key=lambda item: _heaviest_first(item.get_closest_marker("xdist_group").args[0]))


# longest first (measured minutes per group), so that the two workers end together
HEAVY_GROUPS = ["tests.test_executorch", "tests.test_export_target", "q8-e4b", "shape-e4b", "shape-e2b",
                "shape-e4b-multimodal"]


def pytest_configure(config):
    """Under xdist (`make test`: two workers on two cores) each worker computes on one
    thread: torch, ExecuTorch's threadpool and the onnxruntime target session (through
    $GEMMA4_ORT_THREADS, which the CLI subprocesses inherit) would otherwise each start a
    thread per core, and the two workers' spinning pools slowed each other down ~2x.
    Results do not depend on it: tolerances and exact-token checks hold at any count."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("GEMMA4_ORT_THREADS", "1")
        torch.set_num_threads(1)
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(1)


def _heaviest_first(group: str) -> int:
    return HEAVY_GROUPS.index(group) if group in HEAVY_GROUPS else len(HEAVY_GROUPS)


@pytest.fixture(scope="session")
def demo_dirs() -> tuple[Path, Path]:
    target, assistant = DEMO / "target", DEMO / "assistant"
    assert (target / "model.safetensors").is_file(), "demo weights missing: run `make demo-model`"
    return target, assistant


@pytest.fixture(scope="session")
def random_pair_dir(tmp_path_factory) -> Path:
    """demo-shaped target + drafter with seeded random weights, saved as HF directories."""
    from export.config import preset
    from export.hf_compat import patch_transformers

    patch_transformers()
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    root = tmp_path_factory.mktemp("random_pair")
    pair = preset("demo")
    torch.manual_seed(0)
    Gemma4ForCausalLM(pair.target.to_hf()).save_pretrained(root / "target")
    drafter = Gemma4AssistantForCausalLM(pair.drafter.to_hf(pair.target))
    drafter.masked_embedding.token_ordering.copy_(torch.randperm(pair.drafter.vocab_size))
    drafter.save_pretrained(root / "assistant")
    return root


@pytest.fixture
def pair_copy(random_pair_dir, tmp_path) -> Path:
    """A private copy of the random pair, to corrupt."""
    dst = tmp_path / "pair"
    shutil.copytree(random_pair_dir, dst)
    return dst


@pytest.fixture(scope="session")
def native_cli(tmp_path_factory) -> Path:
    """The C++ runner, built by `make native` into this worker's temp folder."""
    import subprocess

    build = tmp_path_factory.mktemp("native")
    proc = subprocess.run(["make", "-C", str(REPO), "native", f"NATIVE_BUILD={build}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return build / "gemma4-spec"


@pytest.fixture(scope="session")
def node_client() -> Path:
    """tests/clients/generate.mjs with its npm dependencies (transformers.js), installed by
    `make test` (`npm ci` from tests/clients/package-lock.json) or here if missing."""
    import subprocess

    clients = REPO / "tests" / "clients"
    if not (clients / "node_modules" / "@huggingface" / "transformers").is_dir():
        proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=clients, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return clients / "generate.mjs"
