"""Imports run one way: the runtime core (the loops, stats, the artifact schema, the
onnxruntime backend) imports neither torch nor the exporter; the ExecuTorch backend
needs no onnxruntime; and no package imports another at module level in a cycle."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

CORE = ["runtime.artifacts", "runtime.stats", "runtime.loop", "runtime.onnx_backend", "runtime.native_runner"]


def _imported_after(module: str, blocked: list[str]) -> subprocess.CompletedProcess:
    """Import `module` in a fresh interpreter where the `blocked` packages cannot be imported."""
    code = "import sys\n" + "".join(f"sys.modules[{b!r}] = None\n" for b in blocked) + f"import {module}\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("module", CORE)
def test_runtime_core_imports_neither_torch_nor_the_exporter(module):
    proc = _imported_after(module, ["torch", "export", "calibration"])
    assert proc.returncode == 0, proc.stderr


def test_executorch_backend_needs_no_onnxruntime_and_no_exporter():
    proc = _imported_after("runtime.executorch_backend", ["onnxruntime", "export", "calibration"])
    assert proc.returncode == 0, proc.stderr


def test_a_blocked_import_is_detected():
    """The check above can fail: a module that needs torch does not import without it."""
    proc = _imported_after("runtime.eager_backend", ["torch"])
    assert proc.returncode != 0 and "torch" in proc.stderr
