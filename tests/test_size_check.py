"""make size-check: the E4B config at any depth, the stage measurement and its memory guard,
the extrapolation, and the sharded random checkpoint it writes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from export.config import FULL, SLIDING, preset
from export.size_check import E4B_LAYERS, e4b_config_at, extrapolate, measure


@pytest.mark.parametrize("layers", [4, 5, 6, 8, 12, 42])
def test_every_depth_has_both_layer_types_among_owners_and_sharers(layers):
    spec = e4b_config_at(layers)
    a = spec.attention
    owners, shared = a.layer_types[: a.first_shared_layer], a.layer_types[a.first_shared_layer :]
    assert {SLIDING, FULL} <= set(owners) and shared and a.layer_types[-1] == FULL
    assert set(a.kv_producers()) == {SLIDING, FULL}  # the drafter reads both
    assert (spec.hidden_size, spec.vocab_size, spec.ple_dim) == (2560, 262_144, 256)


def test_42_layers_is_e4b_itself():
    assert e4b_config_at(E4B_LAYERS) == preset("e4b").target


def test_fewer_than_4_layers_is_refused():
    with pytest.raises(ValueError, match="at least 4"):
        e4b_config_at(3)


def test_extrapolation_recovers_a_linear_law():
    depths = [
        {"layers": n, "checkpoint_bytes": 1000 + 70 * n, "fp32_pair_bytes": 5, "stages": {}, "artifact_bytes": {},
         "run": {}}
        for n in (4, 6, 8)
    ]
    fit = extrapolate(depths)["checkpoint_bytes"]
    assert fit["per_layer"] == 70.0 and fit["at_42_layers"] == 1000 + 70 * 42
    assert "fp32_pair_bytes" in extrapolate(depths)  # a constant is a flat line
    assert extrapolate(depths[:1]) == {}  # one depth gives no slope


def test_measure_reports_peak_memory_and_stops_a_stage_past_the_limit(tmp_path):
    grow = "import time; print('[grow] step 1', flush=True); x = bytearray(%d); x[::4096] = b'1' * len(x[::4096]); time.sleep(1)"
    ok = measure([sys.executable, "-c", grow % (200 << 20)], tmp_path / "ok.log", 2 << 30)
    assert ok["exit_status"] == 0 and ok["stopped"] is None and ok["peak_rss_bytes"] >= 200 << 20
    assert ok["progress"] == ["[grow] step 1"]
    big = measure([sys.executable, "-c", grow % (600 << 20)], tmp_path / "big.log", 300 << 20)
    assert big["exit_status"] != 0 and "limit" in big["stopped"]


def test_random_checkpoint_is_sharded_bf16_and_loads(tmp_path, monkeypatch):
    """The writer at a small width (same code path as E4B's): shards under the byte bound,
    an index, bf16 tensors, and the strict reader accepts the pair."""
    import export.size_check as sc
    from export.checkpoint import SafetensorsCheckpoint, load_pair
    from export.random_pair import shape

    small = shape("e4b")
    monkeypatch.setattr(sc, "e4b_config_at", lambda n: small.target)
    monkeypatch.setattr(sc, "SHARD_BYTES", 200_000)
    target_dir, drafter_dir = sc.write_checkpoint(12, tmp_path, drafter=small.drafter)
    ckpt = SafetensorsCheckpoint(target_dir)
    assert len(ckpt.files) > 2 and (target_dir / "model.safetensors.index.json").is_file()
    assert {ckpt.get(k).dtype for k in ckpt.keys()} == {torch.bfloat16}
    target, drafter = load_pair(target_dir, drafter_dir)
    assert target.config.num_hidden_layers == small.target.attention.num_layers


def test_fp32_weight_bytes_count_tied_tensors_once():
    from torch import nn

    from export.build import fp32_weight_bytes

    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert fp32_weight_bytes(nn.ModuleList([emb, head]), nn.Linear(4, 2, bias=False)) == 4 * (40 + 8)


def test_an_export_that_cannot_fit_is_refused_before_reading(monkeypatch):
    """The fp32 steps of `make export` need about 2 x 4 bytes per parameter; with less memory
    available the export stops at once, saying what it needs and what there is."""
    import export.build as build
    from tests.conftest import REPO

    demo = REPO / "export" / "demo" / "weights"
    build.check_memory(demo / "target", demo / "assistant")  # fits
    monkeypatch.setattr(build, "available_memory", lambda: 10 << 20)
    with pytest.raises(build.ExportError, match=r"about 0\.0\d GiB.*0\.01 GiB available"):
        build.check_memory(demo / "target", demo / "assistant")


def test_check_depth_runs_exports_skips_what_cannot_fit_and_compares_tokens(tmp_path, monkeypatch, random_pair_dir):
    """The orchestration of one depth, its stages faked: the quantized ExecuTorch program is
    exported and run, the fp32 one is skipped with its reason when it cannot fit the limit;
    quantized ONNX graphs (bounded memory) are always exported and run, fp32 ones skipped
    when the fp32 pair passes the limit; every run's tokens are compared with the reference's."""
    import json
    import shutil

    import export.size_check as sc

    pair = tmp_path / "layers-6" / "pair"
    shutil.copytree(random_pair_dir, pair)
    (pair / "complete").write_text("")

    def fake_measure(argv, log, limit):
        kind = argv[4]
        if kind in ("executorch", "onnx"):
            out = Path(argv[-1])
            out.mkdir(parents=True)
            (out / "pair.pte").write_bytes(b"x" * 10)
        if kind == "reference":
            Path(argv[-1]).write_text(json.dumps({"tokens": [5, 6]}))
        if kind == "onnx-run":  # the ONNX graphs' greedy run: one token off the reference
            Path(argv[-1]).write_text(json.dumps({"tokens": [5, 7], "rss_anon_bytes": 40, "rss_file_bytes": 30}))
        return {"seconds": 1.0, "peak_rss_bytes": 100, "exit_status": 0, "stopped": None, "progress": [], "log": ""}

    monkeypatch.setattr(sc, "measure", fake_measure)
    monkeypatch.setattr(sc, "fp32_pair_bytes", lambda t, a: 60)  # 3x and 2x pass the limit of 100, 1.3x not
    monkeypatch.setattr(sc, "run_native", lambda cli, pte, prompt, n: {"tokens": [5, 6], "peak_rss_bytes": 9,
                                                                        "rss_bytes": 9, "program_mapped_rss_bytes": 4})
    res = sc.check_depth(6, tmp_path, ["android", "linux-x86_64"], limit=100, cli=Path("cli"), new_tokens=2)
    assert set(res["stages"]) == {"executorch-android", "onnx-android", "onnx-linux-x86_64", "reference"}
    assert set(res["skipped"]) == {"executorch-linux-x86_64"}
    assert "fp32 program's lowering" in res["skipped"]["executorch-linux-x86_64"]
    assert res["artifact_bytes"]["executorch-android"] == {"pair.pte": 10}
    assert res["run"]["android"]["equal_to_transformers"] is True
    assert res["onnx_run"]["android"]["equal_to_transformers"] is False
    assert sc.figures(res)["run-android.rss_excluding_program_map_bytes"] == 5
    assert sc.figures(res)["onnx-run-android.rss_excluding_mapped_bytes"] == 40
    monkeypatch.setattr(sc, "fp32_pair_bytes", lambda t, a: 150)  # the fp32 pair alone passes the limit
    tight = sc.check_depth(6, tmp_path, ["android", "linux-x86_64"], limit=100, cli=None, new_tokens=2)
    assert "onnx-android" in tight["stages"]  # quantized graphs: bounded memory, never skipped
    assert "fp32 graphs hold the fp32 pair" in tight["skipped"]["onnx-linux-x86_64"]
    monkeypatch.setattr(sc, "fp32_pair_bytes", lambda t, a: 60)
    roomy = sc.check_depth(6, tmp_path, ["linux-x86_64"], limit=1000, cli=None, new_tokens=2)
    assert {"executorch-linux-x86_64", "onnx-linux-x86_64", "reference"} == set(roomy["stages"]) and not roomy["run"]
    onnx_run = roomy["onnx_run"]["linux-x86_64"]  # the ONNX export is run and its tokens compared
    assert onnx_run["tokens"] == [5, 7] and onnx_run["equal_to_transformers"] is False
    assert sc.figures(roomy)["onnx-run-linux-x86_64.peak_rss_bytes"] == 100
