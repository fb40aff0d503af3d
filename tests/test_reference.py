"""The PyTorch reference runtime on the shipped demo pair and on a random pair."""

from __future__ import annotations

import json
import keyword
import re
import subprocess
import sys

import pytest

from runtime.generate import UsageError, generate, load_tokenizer, parse_prompt_ids
from runtime.reference import ReferencePair
from tests.conftest import PROMPTS, REPO

WINDOW = 64  # the demo pair's sliding window


@pytest.fixture(scope="module")
def demo_pair(demo_dirs):
    return ReferencePair.from_dirs(*demo_dirs)


@pytest.fixture(scope="module")
def heldout_ids(demo_dirs):
    ids = load_tokenizer(demo_dirs[0]).encode((PROMPTS / "heldout_inventory.py").read_text()).ids
    assert len(ids) > 2 * WINDOW  # the prompt alone runs past two sliding windows
    return ids


@pytest.fixture(scope="module")
def greedy_256(demo_pair, heldout_ids):
    return demo_pair.generate(heldout_ids, 256, 0, stop_at_eos=False)


def test_greedy_stats_are_one_pass_per_token(greedy_256):
    new, stats = greedy_256
    assert len(new) == 256 == stats.new_tokens
    assert stats.target_passes == 256 and stats.drafted == 0 and stats.accepted == 0
    assert stats.mean_accepted_length == 1.0


@pytest.mark.parametrize("draft_tokens", [4])
def test_speculative_equals_greedy_and_accepts_enough(demo_pair, heldout_ids, greedy_256, draft_tokens):
    greedy, _ = greedy_256
    spec, stats = demo_pair.generate(heldout_ids, 256, draft_tokens, stop_at_eos=False)
    assert spec == greedy
    # Every verify pass yields its accepted drafts plus one target token; the prefill pass one.
    assert stats.new_tokens == 1 + stats.verify_passes + stats.accepted
    assert stats.accepted <= stats.drafted <= draft_tokens * stats.verify_passes
    # Issue 2's bar for the demo pair: at least 2 new tokens per verify pass with 4 drafts.
    assert stats.mean_accepted_length >= 2.0, stats.to_dict()


def test_speculative_equals_greedy_on_a_second_prompt(demo_pair, demo_dirs):
    ids = load_tokenizer(demo_dirs[0]).encode((PROMPTS / "heldout_config.py").read_text()).ids
    assert len(ids) > 2 * WINDOW
    greedy, _ = demo_pair.generate(ids, 160, 0, stop_at_eos=False)
    for k in (1, 3):
        spec, stats = demo_pair.generate(ids, 160, k, stop_at_eos=False)
        assert spec == greedy, k
        assert stats.accepted > 0


def test_greedy_continuation_reads_like_python(greedy_256, demo_dirs):
    """The demo target was trained on Python source: its continuation should be made of
    Python keywords and identifiers, in indented lines."""
    text = load_tokenizer(demo_dirs[0]).decode(greedy_256[0])
    words = re.findall(r"[A-Za-z_]+", text)
    assert len(words) >= 40
    assert sum(keyword.iskeyword(w) for w in words) >= 5
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert sum(ln.startswith("    ") for ln in lines) >= len(lines) // 2
    assert text.isascii()


def test_streaming_callback_sees_every_token(demo_pair, heldout_ids):
    seen = []
    new, _ = demo_pair.generate(heldout_ids[:40], 12, 2, stop_at_eos=False, on_token=seen.append)
    assert seen == new


def test_python_entry_point_text_prompt(demo_dirs):
    pieces = []
    result = generate(prompt="def area(width, height):\n", max_new_tokens=16, draft_tokens=2, on_text=pieces.append)
    assert result.prompt_ids[0] == 2  # <bos> added by the tokenizer
    assert len(result.new_token_ids) <= 16
    assert "".join(pieces) == result.text


def test_bad_inputs_are_refused(demo_pair):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        demo_pair.generate([2, 99999], 4)
    with pytest.raises(ValueError, match="empty prompt"):
        demo_pair.generate([], 4)
    with pytest.raises(UsageError, match="comma-separated integers"):
        parse_prompt_ids("1,two,3")
    with pytest.raises(UsageError, match="unknown backend 'tflite'; known: executorch, native, onnx, torch"):
        generate(prompt_ids=[2, 5], backend="tflite")
    target_only = ReferencePair(demo_pair.target)
    with pytest.raises(ValueError, match="needs a drafter"):
        target_only.generate([2, 5], 4, 2)


def test_make_generate_json(heldout_ids):
    """`make generate ... JSON=1` prints one JSON object with the ids and the stats."""
    proc = subprocess.run(
        ["make", "-s", "generate", "PROMPT_IDS=" + ",".join(map(str, heldout_ids[:30])), "MAX_NEW_TOKENS=20",
         "DRAFT_TOKENS=3", "JSON=1", "IGNORE_EOS=1"],
        capture_output=True, text=True, cwd=REPO, check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["new_token_ids"]) == 20
    for key in ("target_passes", "drafted", "accepted", "mean_accepted_length"):
        assert key in out["stats"]


def test_cli_reports_missing_prompt_file():
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.generate", "--prompt-file", "/nonexistent/prompt.txt"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_export_command_refuses_bad_input_and_writes_nothing(tmp_path):
    """`make export` on bad input: exit 2 with a message, nothing under OUT (the full export
    is exercised in tests/test_export_target.py)."""
    out = tmp_path / "artifacts"
    proc = subprocess.run(
        [sys.executable, "-m", "export", "--target", "symbian", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2 and "known targets: android, ios, linux-x86_64" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "export", "--target", "android", "--out", str(out), "--checkpoint", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2 and "error:" in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_ignoring_eos_runs_past_an_eos_token(random_pair_dir):
    """stop_at_eos=False generates max_new_tokens even when the greedy text holds an EOS id
    (transformers fills an unset eos_token_id from the model's generation config, so "no
    EOS" must be said explicitly)."""
    pair = ReferencePair.from_dirs(random_pair_dir / "target", random_pair_dir / "assistant")
    prompt = [2] + list(range(10, 90))
    free, _ = pair.generate(prompt, 24, 0, stop_at_eos=False)
    pair.target.generation_config.eos_token_id = [free[5]]  # an id that the text does hold
    try:
        assert pair.generate(prompt, 24, 0, stop_at_eos=False)[0] == free
        assert pair.generate(prompt, 24, 2, stop_at_eos=False)[0] == free
        stopped, _ = pair.generate(prompt, 24, 0, stop_at_eos=True)
        assert stopped == free[: free.index(free[5]) + 1]
    finally:
        pair.target.generation_config.eos_token_id = [1]
