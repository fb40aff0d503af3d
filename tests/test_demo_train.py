"""`make demo-model`'s script, end to end at toy size, and its token ordering."""

from __future__ import annotations

import torch

from export.checkpoint import load_pair
from export.demo.train import balanced_token_ordering, corpus_files, drafter_masks, greedy_pool, main, mixed_batches
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
        ["--out", str(out), "--target-steps", "2", "--drafter-steps", "2", "--seq-len", "96", "--batch", "2",
         "--pool-size", "3", "--pool-prompt-len", "40"]
    )
    assert code == 0
    target, drafter = load_pair(out / "target", out / "assistant")  # strict loader, pair check
    new, stats = ReferencePair(target, drafter).generate([2, 100, 200, 300], 6, 2, stop_at_eos=False)
    assert len(new) == 6 and stats.drafted > 0


def test_greedy_pool_is_the_targets_own_greedy_text(demo_dirs):
    target, _ = load_pair(demo_dirs[0], None)
    stream = torch.randint(4, target.config.vocab_size, (500,), generator=torch.Generator().manual_seed(0))
    window = target.config.sliding_window
    pool = greedy_pool(target, stream, size=3, prompt_len=8, seq_len=window + 16, seed=0, batch=2)
    assert pool.shape == (3, window + 16)  # past the sliding window: the cached decode must still agree
    with torch.no_grad():
        greedy = target(input_ids=pool).logits.argmax(-1)
    # every token after the prompt is the target's argmax given everything before it
    assert torch.equal(greedy[:, 7:-1], pool[:, 8:])
    prompts = [stream[i : i + 8] for i in range(len(stream) - 8)]
    assert all(any(torch.equal(row[:8], p) for p in prompts) for row in pool)  # prompts are corpus windows


def test_mixed_batches_take_half_from_the_pool():
    stream = torch.arange(1000)
    pool = torch.full((5, 20), -1)
    for x in mixed_batches(stream, pool, seq_len=16, batch=4, steps=3, seed=0):
        assert x.shape == (4, 16)
        assert (x[:2] >= 0).all() and (x[2:] == -1).all()
    assert all((x >= 0).all() for x in mixed_batches(stream, None, 16, 4, 3, 0))
