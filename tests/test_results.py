"""The README's results table is rendered from results/*.json (runtime/results.py)."""

from __future__ import annotations

import json

from runtime import results


def _parity(ok_last: bool) -> dict:
    checks = [
        {"name": "onnx/p: logits, 10 positions", "ok": True, "detail": "rel err 2.50e-06", "value": 2.5e-6},
        {"name": "onnx/p: final hidden states", "ok": True, "detail": "rel err 7.00e-06", "value": 7e-6},
        {"name": "onnx/p: greedy tokens", "ok": True, "detail": "8 tokens identical", "value": None},
        {"name": "onnx/p: drafts k=2 == transformers drafter", "ok": ok_last,
         "detail": "7 rounds, 0 differ" if ok_last else "7 rounds, 2 differ (first at 9)", "value": 0},
    ]
    return {"ok": ok_last, "rtol": 1e-4, "subject": "onnx x", "command": "python -m runtime.parity", "checks": checks}


def test_the_readme_table_is_the_rendering_of_results():
    text = results.README.read_text()
    assert results.replace_block(text, results.render()) == text, "README.md results table is stale: run `make results`"
    assert list(results.RESULTS.glob("*.json")), "results/ holds no measurements"


def test_a_parity_row_carries_the_numbers_of_its_file():
    (row,) = results.rows_for("p", _parity(True))
    assert "4/4 checks pass" in row and "max relative error 7.0e-06" in row and "0 of 7 rounds differ" in row
    assert "`python -m runtime.parity`" in row and "FAILED" not in row
    (row,) = results.rows_for("p", _parity(False))
    assert "3/4 checks pass" in row and "2 of 7 rounds differ" in row and "FAILED: onnx/p: drafts k=2" in row


def test_a_bench_row_per_backend():
    entry = {"draft_tokens": 4, "greedy_tok_s": 500.0, "speculative_tok_s": 1000.0, "speedup": 2.0,
             "predicted_speedup": 2.1, "mean_accepted_length": 3.9}
    data = {"subject": "s", "command": "c", "step_costs_ms": {"onnx": {"decode_ms": 1.25}}, "onnx": entry}
    (row,) = results.rows_for("b", data)
    assert "decode step 1.25 ms" in row and "2.00x at k = 4 (predicted 2.10x)" in row


def test_bad_input_is_refused_and_changes_nothing(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    before = sorted(p.name for p in results.RESULTS.glob("*.json"))
    assert results.main(["--add", str(bad), "--name", "x"]) == 2
    assert "cannot render it" in capsys.readouterr().err
    assert results.main(["--add", str(tmp_path / "missing.json"), "--name", "x"]) == 2
    assert results.main(["--add", str(bad), "--name", "Bad Name"]) == 2
    assert sorted(p.name for p in results.RESULTS.glob("*.json")) == before
