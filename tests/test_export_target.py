"""`make export TARGET=...` end to end on an ONNX-only 4-bit target with int8 tables (the fast format to
build; the ExecuTorch programs are covered in test_executorch.py and by `make export`):
manifest and hashes, byte-identical re-export, tamper refusal in `make parity`, atomic
output under a kill or a failed step, the gates recorded in the manifest, and the layouts
two other clients load (onnxruntime-genai in Python, transformers.js in Node) generating
our runtime's greedy tokens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import onnx
import pytest

from tests.conftest import REPO

TARGET = """
description = "test: ONNX only, 4-bit MatMulNBits"
max_context = 640
prefill_chunk = 128
max_draft = 4
draft_tokens = "auto"

[onnx]
linear = "int4"
block_size = 32
keep_8bit = ["lm_head", "self_attn", "per_layer"]
embedding = "int8"                                   # tables decoded after the gather
clients = ["onnxruntime-genai", "transformers.js"]   # android's and web's

[gates]
min_top1_agreement = 0.90
max_mean_kl = 0.5
max_accepted_length_drop = 0.25
"""
# Pinned step costs (ms): the one measured input, so that two exports can be compared byte for byte.
STEP_COSTS = {"decode_ms": 1.0, "verify2_ms": 1.2, "verify3_ms": 1.3, "verify4_ms": 1.4, "verify5_ms": 1.6, "draft_ms": 0.15}


@pytest.fixture(scope="module")
def targets_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("targets")
    (d / "onnx4.toml").write_text(TARGET)
    return d


def _export(demo_dirs, targets_dir, out, name="onnx4"):
    from export.build import build_target

    return build_target(name, *demo_dirs, out, step_costs=STEP_COSTS, check_tokens=16, targets_dir=targets_dir)


@pytest.fixture(scope="module")
def exported(demo_dirs, targets_dir, tmp_path_factory):
    return _export(demo_dirs, targets_dir, tmp_path_factory.mktemp("out"))


def test_manifest_describes_every_file(exported):
    from export.build import verify_manifest

    manifest = verify_manifest(exported)
    files = manifest["files"]
    assert {"onnx/target.onnx", "onnx/drafter.onnx", "onnx/embed.onnx", "onnx/tokenizer.json", "quality.json"} <= set(files)
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in files.values())
    counts = manifest["quantization"]["onnx"]["matmuls"]["target.onnx"]
    assert counts["int4"] > 0 and counts["int8"] > 0  # MLP linears 4-bit, the keep_8bit ones 8-bit
    assert manifest["quantization"]["onnx"]["matmuls"]["embed.onnx"]["tables"] == 2  # token and PLE tables
    io = manifest["methods"]["onnx"]["target"]
    assert io["inputs"][0]["name"] == "inputs_embeds" and isinstance(io["inputs"][0]["shape"][1], str)  # dynamic
    assert {"logits", "last_hidden_state"} <= {o["name"] for o in io["outputs"]}
    onnx_caches = manifest["cache_layout"]["onnx"]  # window caches: 64 + 4 + 64 + 256 slots of 1024
    assert onnx_caches["sliding_cache"] == "window" and onnx_caches["ring_slots"] == 388
    assert onnx_caches["sliding_block"] == 64 and onnx_caches["max_call_tokens"] == 256
    assert {shape[2] for shape in onnx_caches["cache_shapes"].values()} == {388, onnx_caches["max_context"]}
    if "executorch" in manifest["cache_layout"]:  # the .pte's sliding caches: rings of window + max_draft + 1
        assert manifest["cache_layout"]["executorch"]["ring_slots"] == 64 + 4 + 1
    assert manifest["eos_token_ids"] == [1]
    cal = manifest["draft_calibration"]
    assert 1 <= manifest["draft_tokens"] <= 4 and cal["step_costs_source"] == "given"
    assert len(cal["p_at_least_i_accepted"]) == 4
    assert manifest["quality"]["onnx"]["speculative_equals_own_greedy"]
    assert set(manifest["toolchain"]) >= {"torch", "transformers", "executorch", "onnxruntime"}


def test_same_inputs_give_the_same_bytes(exported, demo_dirs, targets_dir, tmp_path):
    again = _export(demo_dirs, targets_dir, tmp_path)
    first = sorted(p.relative_to(exported) for p in exported.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    differing = [str(p) for p in first if (exported / p).read_bytes() != (again / p).read_bytes()]
    assert differing == []


def test_parity_refuses_a_tampered_export(exported, tmp_path, capsys):
    import shutil

    from runtime.parity import main as parity_main

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    data = copy / "onnx" / "decoder_model_merged_q4.onnx_data"  # target.onnx's weights (the web layout's name)
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x55
    data.write_bytes(bytes(blob))
    assert parity_main(["--artifacts", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "onnx/decoder_model_merged_q4.onnx_data: sha256 differs" in err and "refusing" in err


def test_parity_judges_by_the_gates_the_export_was_built_with(exported, targets_dir, tmp_path):
    """`make parity ARTIFACTS=` reads the gates from the manifest: a targets file edited
    after the export (here to a gate nothing meets) does not change the verdict."""
    import json

    from runtime.parity import main as parity_main

    path = targets_dir / "onnx4.toml"
    path.write_text(TARGET.replace("max_mean_kl = 0.5", "max_mean_kl = 0.0"))
    try:
        out = tmp_path / "parity.json"
        assert parity_main(["--artifacts", str(exported), "--new-tokens", "32", "--out", str(out)]) == 0
    finally:
        path.write_text(TARGET)
    kl = next(c for c in json.loads(out.read_text())["checks"] if "mean KL" in c["name"])
    assert kl["ok"] and "(gate <= 0.5)" in kl["detail"]
    assert json.loads((exported / "manifest.json").read_text())["gates"]["max_mean_kl"] == 0.5


def test_a_failed_step_writes_nothing_and_keeps_the_earlier_export(tmp_path):
    """What a missed gate (tests/test_quality.py: every gate's message) or any other failing
    step leaves behind: nothing new, and an earlier complete export untouched."""
    from calibration.quality import GateError
    from export.build import _staging

    with _staging(tmp_path, "t") as tmp:
        (tmp / "file").write_text("first")
    with pytest.raises(GateError):
        with _staging(tmp_path, "t") as tmp:
            (tmp / "file").write_text("second")
            raise GateError("quality gates of target 't' missed")
    assert [p.name for p in tmp_path.iterdir()] == ["t"] and (tmp_path / "t" / "file").read_text() == "first"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_export_leaves_no_target_directory(demo_dirs, targets_dir, tmp_path, sig):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "export", "--target", "onnx4", "--targets-dir", str(targets_dir), "--out", str(out),
           "--checkpoint", str(demo_dirs[0]), "--assistant", str(demo_dirs[1]), "--check-tokens", "8"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(out.glob(".onnx4.partial-*/onnx/*.onnx")):  # midway: graphs being written
            assert proc.poll() is None, "export ended before it was killed"
            assert time.time() < deadline
            time.sleep(0.2)
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "onnx4").exists()
    if sig == signal.SIGTERM:  # unwound: the partial folder is removed too
        assert list(out.iterdir()) == []
        return
    # killed outright: the partial folder stays until the next export of the target clears it
    (stale,) = list(out.glob(".onnx4.partial-*"))
    again = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not [p for p in out.glob(".onnx4.partial-*") if p != stale]:  # the new export's own folder
            assert again.poll() is None, "the second export ended before it started writing"
            assert time.time() < deadline
            time.sleep(0.2)
        assert not stale.exists()
    finally:
        again.kill()
        again.wait(timeout=60)


CLIENT_NEW_TOKENS = 128


@pytest.fixture(scope="module")
def client_prompt(demo_dirs):
    from runtime.generate import load_tokenizer

    ids = load_tokenizer(demo_dirs[0]).encode((REPO / "calibration" / "prompts" / "heldout_config.py").read_text()).ids
    return ids[:300]  # past four 64-token windows; + 128 new tokens inside max_context 640


@pytest.fixture(scope="module")
def our_greedy(exported, client_prompt):
    """Our onnxruntime backend's greedy tokens on the same export, EOS not stopping the run."""
    from runtime.generate import LoopRunner
    from runtime.onnx_backend import OnnxBackend

    tokens, _ = LoopRunner(OnnxBackend(exported / "onnx")).generate(client_prompt, CLIENT_NEW_TOKENS, stop_at_eos=False)
    assert len(tokens) == CLIENT_NEW_TOKENS
    return tokens


def test_manifest_lists_the_client_layouts(exported):
    import json

    manifest = json.loads((exported / "manifest.json").read_text())
    clients = manifest["clients"]
    assert set(clients) == {"onnxruntime-genai", "transformers.js"}
    genai = clients["onnxruntime-genai"]["files"]
    web = clients["transformers.js"]["files"]
    assert {"onnx/genai_config.json", "onnx/genai_decoder.onnx"} <= set(genai)
    assert {"config.json", "onnx/embed_tokens_q4.onnx", "onnx/decoder_model_merged_q4.onnx",
            "onnx/embed_tokens_q4.onnx_data", "onnx/decoder_model_merged_q4.onnx_data"} <= set(web)
    assert set(genai) | set(web) <= set(manifest["files"])  # every file a client reads is hashed
    # the folded decoder reads the export's data files: no second copy of any weight
    assert {"onnx/embed_tokens_q4.onnx_data", "onnx/decoder_model_merged_q4.onnx_data"} <= set(genai)
    assert not list((exported / "onnx").glob("*.data.*")) and not (exported / "onnx" / "target.onnx.data").exists()
    config = json.loads((exported / "onnx" / "genai_config.json").read_text())
    # linear caches: genai allocates max_length slots for every cache, as the decoder's inputs
    # say (the export's window caches made linear)
    assert "sliding_window" not in config["model"]["decoder"]
    max_context = manifest["cache_layout"]["onnx"]["max_context"]
    assert config["search"]["max_length"] == max_context
    decoder = onnx.load(str(exported / "onnx" / "genai_decoder.onnx"), load_external_data=False)
    caches = [v for v in decoder.graph.input if v.name.startswith("past_key_values.")]
    assert caches and all(v.type.tensor_type.shape.dim[2].dim_value == max_context for v in caches)


def test_onnxruntime_genai_generates_our_greedy_tokens(exported, client_prompt, our_greedy):
    """onnxruntime-genai (PyPI) opens the export's ONNX folder by its genai_config.json and
    decodes greedily: the same 128 tokens as our runtime after a prompt past the window."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(exported / "onnx"))
    generator = og.Generator(model, og.GeneratorParams(model))
    generator.append_tokens(np.array([client_prompt], dtype=np.int32))
    tokens = []
    while len(tokens) < CLIENT_NEW_TOKENS:
        assert not generator.is_done(), f"genai stopped after {len(tokens)} tokens"
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == our_greedy


def test_transformers_js_generates_our_greedy_tokens(exported, client_prompt, our_greedy, node_client):
    """transformers.js (npm, in Node) loads the export's transformers.js layout by its
    config.json (dtype q4) and decodes greedily: the same 128 tokens as our runtime."""
    import json

    cmd = ["node", str(node_client), str(exported), ",".join(map(str, client_prompt)), str(CLIENT_NEW_TOKENS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "q4"
    assert result["tokens"] == our_greedy
