import pytest

from export.config import FULL, SLIDING, PRESETS, AttentionLayout, TargetSpec, UnsupportedModelError, preset


def test_e4b_layout_matches_published_facts():
    t = preset("e4b").target
    a = t.attention
    assert a.num_layers == 42
    assert [i for i, lt in enumerate(a.layer_types) if lt == FULL] == [5, 11, 17, 23, 29, 35, 41]
    assert a.first_shared_layer == 24
    # Layers 24..41 reuse the KV of the last owner of their type: 22 (sliding) and 23 (full).
    assert a.kv_producers() == {SLIDING: 22, FULL: 23}
    assert a.kv_source(24) == 22 and a.kv_source(29) == 23 and a.kv_source(41) == 23 and a.kv_source(10) == 10
    assert (a.head_dim_of(SLIDING), a.head_dim_of(FULL)) == (256, 512)
    # The PLE table is 262144 x (42 * 256).
    assert t.ple_vocab_size * a.num_layers * t.ple_dim == 262_144 * 10_752


def test_demo_preset_exercises_every_feature():
    p = preset("demo")
    a = p.target.attention
    shared = a.layer_types[a.first_shared_layer :]
    assert shared.count(FULL) >= 2 and shared.count(SLIDING) >= 2
    assert a.head_dim != a.global_head_dim
    assert p.target.ple_dim > 0 and p.target.final_logit_softcapping
    assert p.drafter.use_ordered_embeddings and p.drafter.vocab_size % p.drafter.num_centroids == 0


def test_demo_drafter_compute_is_at_most_a_tenth_of_the_target():
    """Multiply-accumulates per token of the weight matrices (attention over the context is
    the same order for both: the drafter reads the target's KV with fewer heads)."""
    p = preset("demo")
    t, d = p.target, p.drafter

    def layer_macs(hidden, inter, layout, layer_type, owns_kv):
        hd, heads = layout.head_dim_of(layer_type), layout.num_attention_heads
        kv = 2 * hidden * layout.kv_heads(layer_type) * hd if owns_kv else 0
        return 2 * hidden * heads * hd + kv + 3 * hidden * inter

    ta = t.attention
    target = sum(
        layer_macs(t.hidden_size, t.intermediate_size, ta, lt, i < ta.first_shared_layer)
        + 2 * t.hidden_size * t.ple_dim
        for i, lt in enumerate(ta.layer_types)
    )
    target += t.hidden_size * ta.num_layers * t.ple_dim + t.vocab_size * t.hidden_size
    da = d.attention
    drafter = sum(layer_macs(d.hidden_size, d.intermediate_size, da, lt, False) for lt in da.layer_types)
    drafter += 2 * d.backbone_hidden_size * d.hidden_size + d.hidden_size * d.backbone_hidden_size
    drafter += d.num_centroids * d.hidden_size + d.centroid_intermediate_top_k * d.tokens_per_centroid * d.hidden_size
    assert drafter <= target / 10, (drafter, target)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError) as e:
        preset("e9b")
    for name in PRESETS:
        assert name in str(e.value)


def test_unsupported_variants_fail_clearly():
    base = preset("demo").target
    with pytest.raises(UnsupportedModelError, match="Per-Layer Embeddings"):
        TargetSpec(**{**base.__dict__, "ple_dim": 0})
    no_sharing = AttentionLayout(base.attention.layer_types, 4, 1, 32, 64, 64, 0)
    with pytest.raises(UnsupportedModelError, match="no KV-shared layers"):
        TargetSpec(**{**base.__dict__, "attention": no_sharing})
    with pytest.raises(UnsupportedModelError, match="last layer must be full"):
        AttentionLayout((SLIDING, FULL, SLIDING), 4, 1, 32, 64, 64, 1)
    hf = base.to_hf()
    hf.enable_moe_block = True
    with pytest.raises(UnsupportedModelError, match="MoE"):
        TargetSpec.from_hf(hf)


def test_spec_round_trips_through_transformers_config():
    for name in PRESETS:
        t = preset(name).target
        assert TargetSpec.from_hf(t.to_hf()) == t
