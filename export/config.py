"""Typed model configuration for the target/drafter pairs this toolchain handles.

Steps:
1. `TargetSpec` / `DrafterSpec` describe what the export path depends on, split by concern
   (attention layout, PLE, drafter head), with cross-field checks in `__post_init__`.
2. `from_hf` reads them from a transformers config (any checkpoint), `to_hf` builds one
   (presets and the demo pair).
3. `PRESETS` names the pairs we know: `e4b`, `e2b` (the published shapes) and `demo`
   (the small pair that ships in `export/demo/weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.artifacts import FULL, SLIDING, eos_ids


class UnsupportedModelError(ValueError):
    """A checkpoint uses a Gemma 4 variant this toolchain does not export."""


@dataclass(frozen=True)
class AttentionLayout:
    """Per-layer attention types, head shapes and KV sharing of a Gemma 4 decoder."""

    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # sliding layers
    global_head_dim: int  # full layers
    sliding_window: int
    num_kv_shared_layers: int
    num_global_key_value_heads: int | None = None  # None: same as num_key_value_heads

    def __post_init__(self):
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        if bad:
            raise UnsupportedModelError(f"unknown layer types {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.layer_types[-1] != FULL:
            raise UnsupportedModelError("the last layer must be full attention (Gemma 4 forces it)")
        if not 0 <= self.num_kv_shared_layers <= len(self.layer_types):
            raise UnsupportedModelError(
                f"num_kv_shared_layers={self.num_kv_shared_layers} outside 0..{len(self.layer_types)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def first_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    def kv_heads(self, layer_type: str) -> int:
        if layer_type == FULL and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def head_dim_of(self, layer_type: str) -> int:
        return self.global_head_dim if layer_type == FULL else self.head_dim

    def kv_producers(self) -> dict[str, int]:
        """Last layer of each type that owns a cache: the source of every shared layer of that
        type, and the K/V the drafter reads."""
        owners = self.layer_types[: self.first_shared_layer]
        return {t: max(i for i, lt in enumerate(owners) if lt == t) for t in sorted(set(owners))}

    def kv_source(self, layer: int) -> int:
        """Layer whose K/V `layer` attends to (itself unless it is KV-shared)."""
        if layer < self.first_shared_layer:
            return layer
        return self.kv_producers()[self.layer_types[layer]]


@dataclass(frozen=True)
class TargetSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    attention: AttentionLayout
    ple_dim: int  # hidden_size_per_layer_input
    ple_vocab_size: int
    final_logit_softcapping: float | None
    rope_theta_sliding: float = 10_000.0
    rope_theta_full: float = 1_000_000.0
    partial_rotary_factor_full: float = 0.25
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    eos_token_ids: tuple[int, ...] = (1, 106)
    bos_token_id: int = 2
    pad_token_id: int = 0
    # E2B: the MLPs of the KV-shared layers are twice as wide (2 * intermediate_size)
    use_double_wide_mlp: bool = False

    def __post_init__(self):
        if self.ple_dim <= 0 or self.ple_vocab_size <= 0:
            raise UnsupportedModelError(
                "the target has no Per-Layer Embeddings (hidden_size_per_layer_input=0): this toolchain "
                "exports the Gemma 4 E-series (E2B/E4B) layout; PLE-free variants are not supported"
            )
        if self.attention.num_kv_shared_layers == 0:
            raise UnsupportedModelError(
                "the target has no KV-shared layers (num_kv_shared_layers=0), so it produces no shared KV "
                "for an MTP drafter; use an E-series target (E2B/E4B)"
            )
        missing = set(self.attention.layer_types) - set(self.attention.kv_producers())
        if missing:
            raise UnsupportedModelError(f"no cache-owning layer of type(s) {sorted(missing)} before the shared layers")

    @classmethod
    def from_hf(cls, cfg) -> "TargetSpec":
        """Read a `Gemma4TextConfig` (or a config with a `text_config`)."""
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if getattr(cfg, "enable_moe_block", False):
            raise UnsupportedModelError("MoE Gemma 4 (enable_moe_block=True, e.g. 26B-A4B) is not supported")
        if getattr(cfg, "attention_k_eq_v", False):
            raise UnsupportedModelError("attention_k_eq_v=True (shared K/V projection) is not supported")
        rope = cfg.rope_parameters
        full_rope = rope[FULL]
        if full_rope.get("rope_type") not in ("proportional", "default"):
            raise UnsupportedModelError(f"full-attention rope_type {full_rope.get('rope_type')!r} is not supported")
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            attention=_layout_from_hf(cfg),
            ple_dim=cfg.hidden_size_per_layer_input,
            ple_vocab_size=cfg.vocab_size_per_layer_input,
            final_logit_softcapping=cfg.final_logit_softcapping,
            rope_theta_sliding=rope[SLIDING]["rope_theta"],
            rope_theta_full=full_rope["rope_theta"],
            partial_rotary_factor_full=full_rope.get("partial_rotary_factor", 1.0),
            max_position_embeddings=cfg.max_position_embeddings,
            rms_norm_eps=cfg.rms_norm_eps,
            eos_token_ids=eos_ids(cfg.eos_token_id),
            bos_token_id=cfg.bos_token_id,
            pad_token_id=cfg.pad_token_id,
            use_double_wide_mlp=bool(getattr(cfg, "use_double_wide_mlp", False)),
        )

    def to_hf(self):
        from transformers import Gemma4TextConfig

        a = self.attention
        extra = {}
        if a.num_global_key_value_heads:
            extra["num_global_key_value_heads"] = a.num_global_key_value_heads
        return Gemma4TextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=a.num_layers,
            num_attention_heads=a.num_attention_heads,
            num_key_value_heads=a.num_key_value_heads,
            head_dim=a.head_dim,
            global_head_dim=a.global_head_dim,
            layer_types=list(a.layer_types),
            sliding_window=a.sliding_window,
            num_kv_shared_layers=a.num_kv_shared_layers,
            vocab_size_per_layer_input=self.ple_vocab_size,
            hidden_size_per_layer_input=self.ple_dim,
            final_logit_softcapping=self.final_logit_softcapping,
            rope_parameters={
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_theta_sliding},
                FULL: {
                    "rope_type": "proportional",
                    "partial_rotary_factor": self.partial_rotary_factor_full,
                    "rope_theta": self.rope_theta_full,
                },
            },
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            eos_token_id=list(self.eos_token_ids),
            bos_token_id=self.bos_token_id,
            pad_token_id=self.pad_token_id,
            use_double_wide_mlp=self.use_double_wide_mlp,
            **extra,
        )


@dataclass(frozen=True)
class DrafterSpec:
    backbone_hidden_size: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    attention: AttentionLayout
    use_ordered_embeddings: bool
    num_centroids: int
    centroid_intermediate_top_k: int

    def __post_init__(self):
        if self.attention.num_kv_shared_layers != self.attention.num_layers:
            raise UnsupportedModelError("every drafter layer must read the target's shared KV")
        if self.use_ordered_embeddings:
            if self.vocab_size % self.num_centroids:
                raise UnsupportedModelError(
                    f"vocab_size {self.vocab_size} is not divisible by num_centroids {self.num_centroids}"
                )
            if not 0 < self.centroid_intermediate_top_k <= self.num_centroids:
                raise UnsupportedModelError("centroid_intermediate_top_k must be in 1..num_centroids")

    @property
    def tokens_per_centroid(self) -> int:
        return self.vocab_size // self.num_centroids

    @classmethod
    def from_hf(cls, cfg) -> "DrafterSpec":
        tc = cfg.get_text_config()
        return cls(
            backbone_hidden_size=cfg.backbone_hidden_size,
            vocab_size=tc.vocab_size,
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            attention=_layout_from_hf(tc),
            use_ordered_embeddings=cfg.use_ordered_embeddings,
            num_centroids=cfg.num_centroids,
            centroid_intermediate_top_k=cfg.centroid_intermediate_top_k,
        )

    def to_hf(self, target: TargetSpec):
        from export.hf_compat import patch_transformers

        patch_transformers()
        from transformers import Gemma4AssistantConfig

        a = self.attention
        text = target.to_hf().to_dict()
        text.update(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=a.num_layers,
            num_attention_heads=a.num_attention_heads,
            num_key_value_heads=a.num_key_value_heads,
            head_dim=a.head_dim,
            global_head_dim=a.global_head_dim,
            layer_types=list(a.layer_types),
            sliding_window=a.sliding_window,
            num_kv_shared_layers=a.num_layers,
            vocab_size_per_layer_input=0,
            hidden_size_per_layer_input=0,
            final_logit_softcapping=None,
            use_double_wide_mlp=False,  # the drafter's MLP width is its own intermediate_size
        )
        for k in ("per_layer_config", "architectures", "transformers_version", "dtype"):
            text.pop(k, None)
        return Gemma4AssistantConfig(
            text_config=text,
            backbone_hidden_size=self.backbone_hidden_size,
            use_ordered_embeddings=self.use_ordered_embeddings,
            num_centroids=self.num_centroids,
            centroid_intermediate_top_k=self.centroid_intermediate_top_k,
        )


def _layout_from_hf(cfg) -> AttentionLayout:
    # Gemma 4 configs are heterogeneous: head_dim and num_key_value_heads are per-layer
    # attributes (full layers override them), read from the resolved per-layer configs.
    types = list(cfg.layer_types)
    if SLIDING not in types:
        raise UnsupportedModelError("no sliding-attention layers: not a Gemma 4 hybrid-attention decoder")
    sliding = cfg.per_layer_config[types.index(SLIDING)]
    full = cfg.per_layer_config[types.index(FULL)]
    global_kv = full.num_key_value_heads if full.num_key_value_heads != sliding.num_key_value_heads else None
    return AttentionLayout(
        layer_types=tuple(types),
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=sliding.num_key_value_heads,
        head_dim=sliding.head_dim,
        global_head_dim=full.head_dim,
        sliding_window=cfg.sliding_window,
        num_kv_shared_layers=cfg.num_kv_shared_layers,
        num_global_key_value_heads=global_kv,
    )


def _pattern(sliding_per_full: int, repeats: int) -> tuple[str, ...]:
    return ((SLIDING,) * sliding_per_full + (FULL,)) * repeats


@dataclass(frozen=True)
class PairPreset:
    target: TargetSpec
    drafter: DrafterSpec
    notes: str = ""


_DRAFTER_LAYERS = (SLIDING, SLIDING, SLIDING, FULL)

PRESETS: dict[str, PairPreset] = {
    "e4b": PairPreset(
        target=TargetSpec(
            vocab_size=262_144,
            hidden_size=2560,
            intermediate_size=10_240,
            attention=AttentionLayout(_pattern(5, 7), 8, 2, 256, 512, 512, 18),
            ple_dim=256,
            ple_vocab_size=262_144,
            final_logit_softcapping=30.0,
        ),
        drafter=DrafterSpec(
            backbone_hidden_size=2560,
            vocab_size=262_144,
            hidden_size=256,
            intermediate_size=2048,
            attention=AttentionLayout(_DRAFTER_LAYERS, 4, 2, 256, 512, 512, 4),
            use_ordered_embeddings=True,
            num_centroids=2048,
            centroid_intermediate_top_k=32,
        ),
        notes="google/gemma-4-E4B-it and its assistant (shapes from the published configs)",
    ),
    # E2B: hidden 1536, ([sliding]*4 + [full]) * 7, one KV head, the last 20 layers KV-shared
    # with double-wide MLPs; its assistant reads a 1536-wide backbone.
    "e2b": PairPreset(
        target=TargetSpec(
            vocab_size=262_144,
            hidden_size=1536,
            intermediate_size=6144,
            attention=AttentionLayout(_pattern(4, 7), 8, 1, 256, 512, 512, 20),
            ple_dim=256,
            ple_vocab_size=262_144,
            final_logit_softcapping=30.0,
            use_double_wide_mlp=True,
        ),
        drafter=DrafterSpec(
            backbone_hidden_size=1536,
            vocab_size=262_144,
            hidden_size=256,
            intermediate_size=2048,
            attention=AttentionLayout(_DRAFTER_LAYERS, 4, 1, 256, 512, 512, 4),
            use_ordered_embeddings=True,
            num_centroids=2048,
            centroid_intermediate_top_k=32,
        ),
        notes="google/gemma-4-E2B-it and its assistant (target from the published config; the "
        "assistant's widths other than its backbone are taken as E4B's, inferred)",
    ),
    # Small Gemma-4-shaped pair: 12 layers ([sliding]*2 + [full]) * 4, the last 6 KV-shared
    # (two full and four sliding consumers), head_dim 32 / 64, window 64, PLE width 32.
    "demo": PairPreset(
        target=TargetSpec(
            vocab_size=2048,
            hidden_size=128,
            intermediate_size=512,
            attention=AttentionLayout(_pattern(2, 4), 4, 1, 32, 64, 64, 6),
            ple_dim=32,
            ple_vocab_size=2048,
            final_logit_softcapping=30.0,
            max_position_embeddings=4096,
            eos_token_ids=(1,),
        ),
        drafter=DrafterSpec(
            backbone_hidden_size=128,
            vocab_size=2048,
            hidden_size=64,
            intermediate_size=256,
            attention=AttentionLayout(_DRAFTER_LAYERS, 2, 1, 32, 64, 64, 4),
            use_ordered_embeddings=True,
            num_centroids=64,
            centroid_intermediate_top_k=8,
        ),
        notes="the demo pair trained by `make demo-model` (export/demo/train.py)",
    ),
}


def preset(name: str) -> PairPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
