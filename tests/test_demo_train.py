"""`make demo-model`'s script, end to end at toy size, and its token ordering."""

from __future__ import annotations

import torch

from export.checkpoint import load_pair
from export.demo.train import balanced_token_ordering, corpus_files, drafter_masks, main
from runtime.reference import ReferencePair


def test_balanced_ordering_is_a_permutation_that_groups_similar_tokens():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=gen) * 5
    labels = torch.arange(64) % 4
    emb = centers[labels] + 0.1 * torch.randn(64, 16, generator=gen)
    order = balanced_token_ordering(emb, num_centroids=4, seed=0)
    assert torch.equal(torch.sort(order).values, torch.arange(64))
    for c in range(4):
        group = labels[order[16 * c : 16 * (c + 1)]]
        assert (group == group[0]).all(), group  # each equal-size group is one true cluster


def test_drafter_reads_window_plus_one_entries():
    masks = drafter_masks(num_queries=100, kv_len=100, window=64)
    sliding = masks["sliding_attention"][0, 0]
    assert sliding[99].sum() == 65 and sliding[99, 35] and not sliding[99, 34]
    assert masks["full_attention"][0, 0, 99].sum() == 100
    assert not masks["full_attention"][0, 0, 10, 11]


def test_corpus_skips_tests_and_bundled_data():
    files = corpus_files()
    assert len(files) > 300
    assert not any("test" in p.parts or p.name.startswith("test_") for p in files)


def test_training_script_end_to_end_at_toy_size(tmp_path):
    out = tmp_path / "weights"
    code = main(
        ["--out", str(out), "--target-steps", "2", "--drafter-steps", "2", "--seq-len", "96", "--batch", "2"]
    )
    assert code == 0
    target, drafter = load_pair(out / "target", out / "assistant")  # strict loader, pair check
    new, stats = ReferencePair(target, drafter).generate([2, 100, 200, 300], 6, 2, stop_at_eos=False)
    assert len(new) == 6 and stats.drafted > 0
