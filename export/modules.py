"""Export-friendly Gemma 4 target and drafter steps: the transformers layers and weights,
our cache layout, masks and outputs. One set of modules for ONNX and ExecuTorch.

The cache layout (see `CacheLayout`):
- only layers that own KV have a cache; KV-shared layers attend to their source layer's
  K/V of the same step (the last owner of the same type);
- full layers: `max_context` slots, slot == absolute position;
- sliding layers, the .pte: a ring of `window + max_draft + 1` slots, slot == position %
  slots. Which position a slot holds is derived from the call's start position p alone: the
  most recent position < p congruent to the slot. Entries written by a rejected draft are
  never "rolled back": they either get overwritten by the next call or lie outside every
  mask (shown in `CacheLayout.ring_positions`). So committing a round is just choosing the
  next start position;
- sliding layers, the ONNX graphs (`call_tokens` set): a window cache of `window +
  max_draft + 64 + call_tokens` slots holding positions base.. (runtime/artifacts.py),
  base a function of p that the runtime and the graph compute alike; the runtime moves the
  entries when the base changes. Rejected drafts are as harmless as in the ring (read only
  below p).

Steps of `TargetStep.forward(inputs_embeds, per_layer_inputs, position_ids, logit_index, *caches)`
(N new tokens at positions p..p+N-1; N = prompt chunk, 1 for decode, k+1 for verify):
1. PLE: the context path (projection of the embeddings, RMSNorm) joins the token path
   (`per_layer_inputs`, looked up from the ids by `EmbedStep`);
2. per layer: Q (and K/V for owners) with RoPE at absolute positions; sliding owners attend
   to [ring before this call ; new entries] and write the new entries into the ring
   afterwards, so a chunk never evicts what its own queries need; full owners write first
   and attend to the whole cache. From the first KV-shared layer on, only the R rows that
   `logit_index` names are computed (the call's last R positions: R <= max_draft + 1, the
   last position of a prefill chunk, the k+1 of a verify pass): a KV-shared layer stores
   nothing, so its other rows would feed only layers no output reads. A prefill chunk skips
   the KV-shared layers' work for all but R rows (E4B: 18 of 42 layers);
3. final norm -> hidden states [1, R, H]; LM head with softcapping -> logits [1, R, V] of
   those rows. A prefill chunk never builds N x vocabulary logits (1024 x 262144 fp32 is
   1.1 GB at E4B's size, and its LM-head work).

`DrafterStep.forward(inputs_embeds, position_ids, full_k, full_v, sliding_k, sliding_v)`:
one MTP drafter step at position p reading the target's shared caches for positions < p
(full: all of them; sliding: the last window+1, as transformers' drafter does), returning
logits over the vocabulary (the centroid head with a constant fill, no data-dependent
scalar) and the projected state for the next step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from export.config import FULL, SLIDING, AttentionLayout
from runtime.artifacts import cache_names, eos_ids

NEG = -1e30  # finite fill: masked scores and centroid-head non-candidates


SLIDING_BLOCK = 64  # window caches: the base moves by multiples of this (runtime/artifacts.py)


@dataclass(frozen=True)
class CacheLayout:
    """Shapes of the target's caches, one entry per cache-owning layer.

    call_tokens None: sliding caches are rings (the .pte); an int: window caches (the ONNX
    graphs; runtime/artifacts.py describes both) for calls of at most that many tokens."""

    attention: AttentionLayout
    max_context: int
    max_draft: int
    call_tokens: int | None = None

    def __post_init__(self):
        if self.max_context <= self.attention.sliding_window:
            raise ValueError(
                f"max_context {self.max_context} must exceed the sliding window {self.attention.sliding_window}"
            )
        if self.max_draft < 1:
            raise ValueError("max_draft must be >= 1")
        if self.max_context >= 2**24:  # the .pte's masks compute on positions as float32 integers
            raise ValueError(f"max_context {self.max_context} must be below 2**24")
        if self.call_tokens is not None and self.call_tokens < self.max_draft + 1:
            raise ValueError(f"call_tokens {self.call_tokens} must hold a verify pass of max_draft + 1 tokens")

    @property
    def window(self) -> bool:
        return self.call_tokens is not None

    @property
    def sliding_block(self) -> int:
        """Window caches: the step of their base; max_context when a window cache would be
        as long as the context (then base is always 0: slot == position)."""
        if self.attention.sliding_window + self.max_draft + SLIDING_BLOCK + self.call_tokens >= self.max_context:
            return self.max_context
        return SLIDING_BLOCK

    @property
    def ring_slots(self) -> int:
        if self.window:  # a call at p writes up to p + call_tokens - 1; base > p - window - 1 - max_draft - block
            return min(self.max_context,
                       self.attention.sliding_window + self.max_draft + SLIDING_BLOCK + self.call_tokens)
        return self.attention.sliding_window + self.max_draft + 1

    @property
    def owners(self) -> list[int]:
        return list(range(self.attention.first_shared_layer))

    def slots(self, layer: int) -> int:
        return self.ring_slots if self.attention.layer_types[layer] == SLIDING else self.max_context

    def shape(self, layer: int) -> tuple[int, int, int, int]:
        lt = self.attention.layer_types[layer]
        return (1, self.attention.kv_heads(lt), self.slots(layer), self.attention.head_dim_of(lt))

    def cache_names(self) -> list[str]:
        return cache_names(self.owners)

    def shared_cache_indices(self) -> list[int]:
        """Where the caches the drafter reads sit in the flat cache list (key, value per
        owner), in `SHARED_KV_NAMES` order: the last full and the last sliding owner."""
        producers = self.attention.kv_producers()
        return [2 * self.owners.index(producers[t]) + kv for t in (FULL, SLIDING) for kv in (0, 1)]

    def sliding_base(self, start: torch.Tensor) -> torch.Tensor:
        """Window caches: the position at slot 0 during a call starting at `start` (the
        runtime's runtime.artifacts.sliding_base, in graph ops); rings: 0."""
        if not self.window:
            return torch.zeros_like(start)
        block = self.sliding_block
        return torch.div(torch.clamp(start - self.attention.sliding_window - 1 - self.max_draft, min=0), block,
                         rounding_mode="floor") * block

    def ring_positions(self, start: torch.Tensor) -> torch.Tensor:
        """Absolute position held by each sliding slot before a call starting at `start`
        (negative: empty, or not below `start`).

        Window caches: base + slot. Rings: the latest position < start with position %
        slots == slot. Safe with rejected drafts: a ring slot last written by a rejected
        position r >= start (r <= start + max_draft - 1) is reported as r - slots <= start -
        window - 2, below every window that reads the ring (target: >= start - window + 1;
        drafter: >= start - window - 1), so it is always masked out."""
        s = self.ring_slots
        slot = torch.arange(s, dtype=torch.long)
        if self.window:
            pos = self.sliding_base(start) + slot
            return torch.where(pos < start, pos, -1)
        # dividend kept non-negative: ExecuTorch's int remainder follows C sign rules
        return (start - 1) - torch.remainder(start - 1 - slot + s, s)


def layout_dict(target, drafter, layout: CacheLayout) -> dict:
    """layout.json (runtime/artifacts.py names it): what a runtime needs to drive an
    export of either format (cache shapes and owners, producers, ids, sizes)."""
    from export.config import TargetSpec

    spec = TargetSpec.from_hf(target.config)
    a = layout.attention
    producers = a.kv_producers()
    return {
        "format_version": 3,  # 2: target graphs take logit_index (at most logit_rows rows); 3: hidden of those rows only
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_layers": a.num_layers,
        "ple_dim": spec.ple_dim,
        "sliding_window": a.sliding_window,
        "max_context": layout.max_context,
        "max_draft": layout.max_draft,
        "logit_rows": layout.max_draft + 1,
        "ring_slots": layout.ring_slots,
        # window: the ONNX graphs' sliding caches (positions base.. at slots 0..; written in
        # place by their attention op); ring: the .pte's (runtime/artifacts.py)
        "sliding_cache": "window" if layout.window else "ring",
        **({"sliding_block": layout.sliding_block, "max_call_tokens": layout.call_tokens} if layout.window else {}),
        "cache_owners": layout.owners,
        "cache_shapes": {str(i): list(layout.shape(i)) for i in layout.owners},
        "layer_types": list(a.layer_types),
        "kv_producers": producers,
        "eos_token_ids": list(eos_ids(target.generation_config.eos_token_id)),
        "bos_token_id": spec.bos_token_id,
        "drafter": None
        if drafter is None
        else {
            "hidden_size": drafter.config.get_text_config().hidden_size,
            "backbone_hidden_size": drafter.config.backbone_hidden_size,
            "use_ordered_embeddings": drafter.config.use_ordered_embeddings,
        },
    }


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor, ops: "Ops") -> torch.Tensor:
    """x: [1, N, heads, d]; cos/sin: [N, 1, d]; rot from `_rotate_matrix(d)`."""
    return x * cos + ops.rotate(x, rot) * sin


def _dyn(shape) -> list[int]:
    """`shape` with its symbolic (exported dynamic) dim as -1: XNNPACK delegates reshapes
    only with static sizes and at most one inferred dim, so reshapes are written this way."""
    return [d if isinstance(d, int) else -1 for d in shape]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[1, N, heads * d] -> [1, N, heads, d] with the token count as the inferred dim."""
    return x.reshape(1, -1, x.shape[-1] // head_dim, head_dim)


def _rotate_matrix(d: int) -> torch.Tensor:
    """R with x @ R == cat(-x[d/2:], x[:d/2]): rotate-half as one matmul instead of a
    slice/negate/concat chain (fewer graph nodes for a single-token step)."""
    half = d // 2
    r = torch.zeros(d, d)
    r[half:, :half] = -torch.eye(half)
    r[:half, half:] = torch.eye(half)
    return r


def _cos_sin(rotary, layer_type: str, positions: torch.Tensor):
    """positions: [N] -> cos, sin [N, 1, head_dim] (as transformers' Gemma4TextRotaryEmbedding)."""
    inv_freq = getattr(rotary, f"{layer_type}_inv_freq")
    scale = getattr(rotary, f"{layer_type}_attention_scaling")
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, d]: broadcasts over heads
    return emb.cos() * scale, emb.sin() * scale


class Ops:
    """The few places where the best graph differs between backends.

    onnxruntime (`xnnpack=False`): RMSNorm as x / sqrt(mean(x^2) + eps) * w, the pattern it
    fuses into one SimplifiedLayerNormalization (a norm without a scale multiplies by ones so
    that it fuses too: 1 node instead of 5); GELU as the opset-20 tanh Gelu; rotate-half as a
    linear map on the 4-D heads tensor (one MatMul; `mm` would add a reshape either side).
    ExecuTorch/XNNPACK (`xnnpack=True`): the mean of squares over rows viewed as a 4-D
    [1, rows, 1, d] (XNNPACK 1.5.1 takes `mean` only over the two inner dims of a 4-D tensor,
    so any other norm would split the delegate); tanh-GELU spelled out in elementary ops (its GELU is the
    erf form, ~1e-2 off on the logits)."""

    def __init__(self, xnnpack: bool = False):
        self.xnnpack = xnnpack

    def rms(self, norm, x):
        if self.xnnpack:  # rows as a 4-D [1, rows, 1, d]: the one mean XNNPACK takes
            shape, d = x.shape, x.shape[-1]
            x4 = x.reshape(1, -1, 1, d)
            y = (x4 / torch.sqrt(x4.mul(x4).mean(dim=(2, 3), keepdim=True) + norm.eps)).reshape(_dyn(shape))
        else:
            y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
        if norm.with_scale:
            return y * norm.weight
        return y if self.xnnpack else y * torch.ones(y.shape[-1], dtype=y.dtype)

    def rotate(self, x, rot):
        """x @ rot over the last dim of x [1, N, heads, d]."""
        if self.xnnpack:  # mm over 2-D rows: the form the XNNPACK lowering is tested with
            d = x.shape[-1]
            return torch.mm(x.reshape(-1, d), rot).reshape(_dyn(x.shape))
        return torch.nn.functional.linear(x, rot.t())

    def gelu(self, x):
        return gelu_tanh(x, elementary=self.xnnpack)

    def mlp(self, mlp, x):
        return mlp.down_proj(self.gelu(mlp.gate_proj(x)) * mlp.up_proj(x))

    def layer_tail(self, layer, residual, attn_out, per_layer_input):
        """Everything in a Gemma 4 decoder layer after the attention core."""
        h = residual + self.rms(layer.post_attention_layernorm, layer.self_attn.o_proj(attn_out))
        residual = h
        h = self.rms(layer.pre_feedforward_layernorm, h)
        h = residual + self.rms(layer.post_feedforward_layernorm, self.mlp(layer.mlp, h))
        if per_layer_input is not None:
            residual = h
            g = self.gelu(layer.per_layer_input_gate(h)) * per_layer_input
            h = residual + self.rms(layer.post_per_layer_input_norm, layer.per_layer_projection(g))
        return h * layer.layer_scalar


def gelu_tanh(x, elementary: bool):
    """gelu_pytorch_tanh. elementary=True spells out the tanh formula, for delegates that
    would otherwise run the erf GELU (ExecuTorch 1.5.1's XNNPACK)."""
    if not elementary:
        return torch.nn.functional.gelu(x, approximate="tanh")
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def mask_bias(allowed: torch.Tensor) -> torch.Tensor:
    """bool [N, T] -> additive float bias (0 or NEG), built once per call and cache type
    (the ONNX drafter's form: a compare and a Where are its fewest nodes; the .pte builds
    its biases in float arithmetic instead, see `_at_least_one`)."""
    return torch.where(allowed, 0.0, NEG)


def _at_least_one(x: torch.Tensor) -> torch.Tensor:
    """For integer-valued float x: 1.0 where x >= 1, else 0.0 (exact). Masks built from
    these in float arithmetic (sub, clamp, add, mul) run inside the XNNPACK delegate, where a
    bool compare and a `where` over [rows, slots] run on ExecuTorch's portable kernels: on
    the demo pair those two took 2.3 ms of an 8.5 ms 80-token call. A masked entry's bias is NEG
    or 2 * NEG; both make its softmax weight exactly 0, and allowed entries add exactly 0."""
    return torch.clamp(x, 0.0, 1.0)


def _grouped(k, v):
    """K/V [1, kvh, T, d] -> K^T [kvh, d, T] and V [kvh, T, d]: the form `_attend` takes,
    built once per cache and reused by every layer that reads it (the KV-shared layers)."""
    k = k.reshape(k.shape[1:])
    return k.transpose(1, 2), v.reshape(v.shape[1:])


def _attend(q, kt, v, bias):
    """q: [1, N, H, d]; kt/v from `_grouped`; bias: [N*group, T] from `_Biases` (each query's
    mask row repeated for the query heads of its KV group). The query heads of a group
    become rows of one 3-D matmul (no broadcast copies of K/V); scaling 1.0 (Gemma 4
    normalises q and k instead).

    Rows are ordered (token, head in group): splitting a merged (head, token) row dim with a
    symbolic token count makes torch.export emit a stride guard it cannot prove whenever
    there is more than one KV head (E4B's 2); this order also needs no head transpose when
    there is a single KV head."""
    n, heads, d = q.shape[1], q.shape[2], q.shape[3]
    kvh = kt.shape[0]
    if kvh == 1:  # one group: the (token, head) rows are q's own order, no transposes
        rows = q.reshape(1, -1, d)
    else:
        rows = q.reshape(-1, kvh, heads // kvh, d).transpose(0, 1).reshape(kvh, -1, d)  # [kvh, N*group, d]
    scores = torch.bmm(rows, kt) + bias  # [kvh, N*group, T]
    out = torch.bmm(torch.softmax(scores, dim=-1), v)  # [kvh, N*group, d]
    if kvh == 1:
        return out.reshape(1, -1, heads * d)
    return out.reshape(kvh, -1, heads // kvh * d).transpose(0, 1).reshape(1, -1, heads * d)


class _Biases:
    """Per (cache type, group size): the additive mask of `_attend`'s rows, [N*group, T], each
    query's row repeated for the query heads of its KV group. Built on first use in a call
    from the row positions (float [N]; a broadcast, no expand-and-reshape of a mask whose
    width is symbolic) and shared by every layer of that shape. biases: cache type ->
    function of the rows' positions [R, 1] -> bias [R, T]."""

    def __init__(self, positions: torch.Tensor, biases: dict):
        self.positions, self.biases, self.done = positions, biases, {}

    def get(self, layer_type: str, q: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
        group = q.shape[2] // kt.shape[0]
        key = (layer_type, group)
        if key not in self.done:
            rows = self.positions
            if group > 1:  # [N] -> [N*group]: each position once per head of the group
                rows = (rows[:, None] + torch.zeros(1, group, dtype=rows.dtype)).reshape(-1)
            self.done[key] = self.biases[layer_type](rows[:, None])
        return self.done[key]


class _UnitNorm:
    """An RMSNorm without a scale (`Ops.rms` multiplies by ones: one fused norm node)."""

    with_scale = False

    def __init__(self, eps: float):
        self.eps = eps


class EmbedStep(nn.Module):
    """input_ids [1, N] -> inputs_embeds [1, N, H] (scaled), per_layer_inputs [1, N, L, P]."""

    def __init__(self, target):
        super().__init__()
        self.embed_tokens = target.model.embed_tokens
        self.embed_tokens_per_layer = target.model.embed_tokens_per_layer
        cfg = target.config
        self.ple_shape = (cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)

    def forward(self, input_ids):
        embeds = self.embed_tokens(input_ids)
        ple = self.embed_tokens_per_layer(input_ids)
        return embeds, ple.reshape(1, -1, *self.ple_shape)


class TargetStep(nn.Module):
    """Functional target step: caches in, updated caches out (ONNX form). Caches are given
    as key, value per owner layer in `layout.owners` order."""

    def __init__(self, target, layout: CacheLayout, xnnpack: bool = False, fused: bool = False):
        super().__init__()
        if fused and (xnnpack or not layout.window):
            raise ValueError("fused attention (onnxruntime's GroupQueryAttention) needs window caches and the ONNX ops")
        self.ops = Ops(xnnpack)
        self.fused = fused
        self.model = target.model
        self.lm_head = target.lm_head
        self.layout = layout
        self.softcap = target.config.final_logit_softcapping
        self.window = layout.attention.sliding_window
        self.producers = layout.attention.kv_producers()
        for lt in (SLIDING, FULL):
            self.register_buffer(f"rot_{lt}", _rotate_matrix(layout.attention.head_dim_of(lt)), persistent=False)
            if fused:
                from export.gqa import rope_tables

                rotary = target.model.rotary_emb
                # sliding: the op reads rows base.. of the table (slot == position - base)
                rows = layout.max_context + (layout.ring_slots if lt == SLIDING else 0)
                cos, sin = rope_tables(getattr(rotary, f"{lt}_inv_freq"), getattr(rotary, f"{lt}_attention_scaling"),
                                       rows)
                self.register_buffer(f"cos_{lt}", cos, persistent=False)
                self.register_buffer(f"sin_{lt}", sin, persistent=False)
        if fused:  # per cache owner: the scales of its packed q/k/v head rows (see _fused_layers)
            for i in layout.owners:
                attn = target.model.layers[i].self_attn
                heads, kvh = attn.config.num_attention_heads, layout.shape(i)[1]
                norms = (attn.q_norm, attn.k_norm, attn.v_norm)
                if len({n.eps for n in norms}) != 1:
                    raise ValueError(f"layer {i}: q/k/v norms with different eps cannot be packed")
                scale = [(n.weight.detach().float() if n.with_scale else torch.ones(attn.head_dim)).expand(c, -1)
                         for n, c in zip(norms, (heads, kvh, kvh))]
                self.register_buffer(f"qkv_scale_{i}", torch.cat(scale), persistent=False)

    def forward(self, inputs_embeds, per_layer_inputs, position_ids, logit_index, *caches):
        m = self.model
        # PLE, context path: projection of the embeddings, normalised, joined to the token path.
        proj = m.per_layer_model_projection(inputs_embeds) * m.per_layer_model_projection_scale
        proj = self.ops.rms(m.per_layer_projection_norm, proj.reshape(_dyn(per_layer_inputs.shape)))
        ple = (proj + per_layer_inputs) * m.per_layer_input_scale
        if self.fused:
            h, present = self._fused_layers(inputs_embeds, ple, position_ids[0], logit_index, caches)
        else:
            h, present = self._layers(inputs_embeds, ple, position_ids[0], logit_index, caches)
        hidden = self.ops.rms(m.norm, h)  # [1, R, H]: the KV-shared layers ran on the R rows only
        logits = self.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return (logits, hidden, *present)

    def _fused_layers(self, h, ple, positions, rows, caches):
        """Every layer's attention as one `gemma4::gqa` (export/gqa.py): RoPE, cache write
        and attention over the valid range inside onnxruntime. A KV-shared layer calls it with
        its producer's present caches and the K/V of its rows (below): it writes the same
        entries to the same slots, into outputs (`shared.{i}.key/value`) that the runtime
        binds to the producer's buffers, so that no layer copies a cache
        (export/onnx_export.py `shared_output_names`).

        A cache owner's Q, K and V are one packed tensor: the three projections concatenated
        (one MatMul in the written graph: export/onnx_weights.py merges them), the q/k/v norms
        as one RMSNorm over every head row followed by one multiply with the heads' scales
        (the v norm has none: ones), passed packed to the op (a producer of KV-shared layers
        splits it: they need its K and V).

        The KV-shared layers run on the `rows` (logit_index) only, which must be the call's
        last R positions: the op places a call's queries at the last slots of its total
        length. They read their producer's present cache (the call's N entries already
        written) and write their R rows' entries again (the same values)."""
        from export.gqa import gqa

        a = self.layout.attention
        end = positions[-1:] + 1  # [1]
        # sliding caches hold positions base.. at slots 0..: the op's lengths and RoPE rows
        # are taken relative to base (a Gather of ring_slots rows of each table, once per call)
        base = self.layout.sliding_base(positions[:1])
        table_rows = base + torch.arange(self.layout.ring_slots)
        lengths, rope = {}, {}
        for lt, offset in ((FULL, None), (SLIDING, base)):
            total = (end if offset is None else end - offset).to(torch.int32)
            lengths[lt] = (total - 1, total.reshape(()))
            cos, sin = getattr(self, f"cos_{lt}"), getattr(self, f"sin_{lt}")
            rope[lt] = (cos, sin) if offset is None else (cos.index_select(0, table_rows), sin.index_select(0, table_rows))
        present, aliases, kv = [], [], {}
        producers = set(self.producers.values())
        for i, layer in enumerate(self.model.layers):
            if i == a.first_shared_layer:  # from here on only the R returned rows
                h, ple = h.index_select(1, rows), ple.index_select(1, rows)
                kv = {j: (k.index_select(1, rows), v.index_select(1, rows), pk, pv) for j, (k, v, pk, pv) in kv.items()}
            lt = a.layer_types[i]
            attn = layer.self_attn
            d = attn.head_dim
            heads = attn.config.num_attention_heads
            x = self.ops.rms(layer.input_layernorm, h)
            window = self.window if lt == SLIDING else 0
            seqlens, total = lengths[lt]
            rope_lt = rope[lt]
            if i < a.first_shared_layer:
                past = caches[2 * i], caches[2 * i + 1]
                kvh = past[0].shape[1]  # the cache's KV heads
                qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
                normed = self.ops.rms(_UnitNorm(attn.q_norm.eps), qkv.reshape(1, -1, heads + 2 * kvh, d))
                qkv = (normed * getattr(self, f"qkv_scale_{i}")).flatten(2)
                if i in producers:
                    q, k, v = qkv.split([heads * d, kvh * d, kvh * d], dim=-1)
                    out, pk, pv = gqa(q, k, v, *past, seqlens, total, *rope_lt, heads, kvh, window)
                    kv[i] = (k, v, pk, pv)
                else:
                    out, pk, pv = gqa(qkv, None, None, *past, seqlens, total, *rope_lt, heads, kvh, window)
                present.extend([pk, pv])
            else:
                q = self.ops.rms(attn.q_norm, _heads(attn.q_proj(x), d)).flatten(2)
                src = kv[self.producers[lt]]
                out, pk, pv = gqa(q, *src, seqlens, total, *rope_lt, heads, src[2].shape[1], window)
                aliases.extend([pk, pv])
            h = self.ops.layer_tail(layer, h, out, ple[:, :, i, :])
        if a.first_shared_layer >= len(self.model.layers):
            h = h.index_select(1, rows)
        return h, present + aliases

    def _layers(self, inputs_embeds, ple, positions, rows, caches):
        """The plain-op layers (the .pte, eager). The KV-shared layers run on the `rows`
        (logit_index) only, at their own positions: nothing of theirs is stored, so the other
        rows of a prefill chunk would only feed layers that no output reads."""
        a = self.layout.attention
        m = self.model
        start = positions[0]
        n = positions.shape[0]

        rope = {t: _cos_sin(m.rotary_emb, t, positions) for t in (SLIDING, FULL)}
        # masks as biases of the query rows' positions q_pos [R, 1] (R = N * group), in float
        # arithmetic on positions (exact: integers far below 2**24; see _at_least_one)
        new_pos = positions.to(torch.float32)
        # full caches: slot == position; valid up to each query's own position
        slot_pos = torch.arange(self.layout.max_context, dtype=torch.float32)[None, :]
        ring_pos = self.layout.ring_positions(start).to(torch.float32)[None, :]
        ring_empty = _at_least_one(-ring_pos)  # negative: no entry
        far = self.window - 1  # q - p > far: outside the window

        def full_bias(q_pos):
            return _at_least_one(slot_pos - q_pos) * NEG

        def sliding_bias(q_pos):  # [ring before this call ; the N new entries]
            ring = ring_empty + _at_least_one(q_pos - ring_pos - far)
            new = _at_least_one(new_pos[None, :] - q_pos) + _at_least_one(q_pos - new_pos[None, :] - far)
            return torch.cat([ring, new], dim=1) * NEG

        bias = _Biases(new_pos, {FULL: full_bias, SLIDING: sliding_bias})

        # Ring update after attending: each slot takes the newest new entry with its residue,
        # if any (shape-static in the slot count, no branch on N, no duplicate writes).
        slots = self.layout.ring_slots
        last = start + n - 1
        newest = last - torch.remainder(last - torch.arange(slots) + slots, slots)
        # built once per call, not per cache: torch.export does not merge repeated
        # subexpressions, and outside the delegate each is a kernel call per step
        # as float 0/1 factors: past * keep + new * take is exact (one term is x * 0) and runs
        # in the delegate, where a `where` per cache ran on a portable kernel
        take = (newest >= start).to(torch.float32)[None, None, :, None]  # [1, 1, slots, 1]
        keep = 1.0 - take
        src = torch.clamp(newest - start, min=0)  # index into the N new entries
        # full caches: the scatter index of the new entries along the slot axis (one for all)
        full_index = positions[None, None, :, None].expand(1, a.kv_heads(FULL), n, a.head_dim_of(FULL))

        def ring_write(past, new):
            return past * keep + new.index_select(2, src) * take

        present = []
        shared_kv = {}
        h = inputs_embeds
        for i, layer in enumerate(m.layers):
            if i == a.first_shared_layer:  # from here on only the R returned rows
                h, ple = h.index_select(1, rows), ple.index_select(1, rows)
                kept = positions.index_select(0, rows)
                rope = {t: _cos_sin(m.rotary_emb, t, kept) for t in (SLIDING, FULL)}
                bias = _Biases(kept.to(torch.float32), bias.biases)
            lt = a.layer_types[i]
            attn = layer.self_attn
            cos, sin = rope[lt]
            rot = getattr(self, f"rot_{lt}")
            x = self.ops.rms(layer.input_layernorm, h)
            # RoPE on [1, N, heads, d] (cos/sin [N, 1, d]); q stays token-major for _attend
            q = _rope(self.ops.rms(attn.q_norm, _heads(attn.q_proj(x), attn.head_dim)), cos, sin, rot, self.ops)
            if i < a.first_shared_layer:
                k = self.ops.rms(attn.k_norm, _heads(attn.k_proj(x), attn.head_dim))
                k = _rope(k, cos, sin, rot, self.ops).transpose(1, 2)
                v = self.ops.rms(attn.v_norm, _heads(attn.v_proj(x), attn.head_dim)).transpose(1, 2)
                past_k, past_v = caches[2 * i], caches[2 * i + 1]
                if lt == FULL:
                    # scatter along the slot axis (ScatterElements; index_copy exports as
                    # transpose + ScatterND + transpose, copying the cache three times)
                    k_all = past_k.scatter(2, full_index, k)
                    v_all = past_v.scatter(2, full_index, v)
                    present += [k_all, v_all]
                else:
                    k_all = torch.cat([past_k, k], dim=2)
                    v_all = torch.cat([past_v, v], dim=2)
                    present += [ring_write(past_k, k), ring_write(past_v, v)]
                kv = _grouped(k_all, v_all)
                if self.producers.get(lt) == i:
                    shared_kv[lt] = kv
            else:
                kv = shared_kv[lt]
            out = _attend(q, *kv, bias.get(lt, q, kv[0]))
            h = self.ops.layer_tail(layer, h, out, ple[:, :, i, :])
        if a.first_shared_layer >= len(m.layers):
            h = h.index_select(1, rows)
        return h, present


class DrafterStep(nn.Module):
    """One MTP drafter step. inputs_embeds = concat(target_embed(token), state): [1, 1, 2B];
    position_ids [1, 1] = p; shared caches of the target's last full and last sliding owner."""

    def __init__(self, drafter, layout: CacheLayout, xnnpack: bool = False):
        super().__init__()
        self.ops = Ops(xnnpack)
        self.drafter = drafter
        self.layout = layout
        tc = drafter.config.get_text_config()
        self.layer_types = list(tc.layer_types)
        self.window = tc.sliding_window
        for lt in set(self.layer_types):
            dim = next(l.self_attn.head_dim for l, t in zip(drafter.model.layers, self.layer_types) if t == lt)
            self.register_buffer(f"rot_{lt}", _rotate_matrix(dim), persistent=False)
            self.register_buffer(f"eye_{lt}", torch.eye(dim), persistent=False)
        me = drafter.masked_embedding
        if me is not None:
            self.register_buffer(
                "clusters", me.token_ordering.long().view(me.num_centroids, me.vocab_size_per_centroid), persistent=False
            )
            self.top_k = me.centroid_intermediate_top_k
            if not self.ops.xnnpack:
                # onnxruntime: the head's rows as a table, gathered per step (quantizable like
                # an embedding); the `.pte` scores with the dense head instead (_candidate_scores)
                self.candidate_rows = nn.Embedding.from_pretrained(drafter.lm_head.weight.detach(), freeze=True)

    def context(self, position_ids, full_k, full_v, sliding_k, sliding_v) -> dict:
        """What every step at this position shares: masks, RoPE, the grouped shared K/V.

        A drafter step is one query at one position, so RoPE is a fixed linear map of q:
        x * cos + rotate_half(x) * sin == x @ (I * cos + R * sin), built here once as a
        [d, d] matrix per layer type and applied with one matmul per layer and step."""
        m = self.drafter.model
        positions = position_ids[0]  # [1]
        start = positions[0]
        kv = {FULL: (full_k, full_v), SLIDING: (sliding_k, sliding_v)}
        # The drafter reads positions < p: full: every slot below p; sliding: the last
        # window + 1 of them (|p - position| <= window + 1 as transformers' drafter reads them).
        ring_pos = self.layout.ring_positions(start)
        if self.ops.xnnpack:  # in float arithmetic, inside the delegate (see _at_least_one)
            p, ring = start.to(torch.float32), ring_pos.to(torch.float32)
            slot = torch.arange(self.layout.max_context, dtype=torch.float32)
            bias = {FULL: _at_least_one(slot - p + 1) * NEG,
                    SLIDING: (_at_least_one(-ring) + _at_least_one(p - 1 - self.window - ring)) * NEG}
        else:  # onnxruntime: a compare and a Where are the fewest nodes
            bias = {FULL: mask_bias(torch.arange(self.layout.max_context) < start),
                    SLIDING: mask_bias((ring_pos >= 0) & (ring_pos >= start - 1 - self.window))}
        types = set(self.layer_types)
        rope = {}
        for t in types:
            cos, sin = _cos_sin(m.rotary_emb, t, positions)  # [1, 1, d]
            rope[t] = getattr(self, f"eye_{t}") * cos[0] + getattr(self, f"rot_{t}") * sin[0]  # [d, d]
        return {
            "bias": {t: b[None, :] for t, b in bias.items()},  # [1, T]
            "rope": rope,
            "kv": {t: _grouped(*kv[t]) for t in types},  # once per cache, for all layers
        }

    def body(self, inputs_embeds, ctx: dict):
        """-> final-normed hidden (input of the head), projected state. One query: the
        query heads of a KV group are the rows of one [kvh, group, d] matmul with K^T."""
        d = self.drafter
        m = d.model
        h = d.pre_projection(inputs_embeds)
        for i, layer in enumerate(m.layers):
            lt = self.layer_types[i]
            attn = layer.self_attn
            kt, v = ctx["kv"][lt]
            kvh, dim = kt.shape[0], attn.head_dim
            x = self.ops.rms(layer.input_layernorm, h)
            q = self.ops.rms(attn.q_norm, attn.q_proj(x).reshape(kvh, -1, dim))  # [kvh, group, d]
            q = torch.bmm(q, ctx["rope"][lt].expand(kvh, dim, dim))
            scores = torch.bmm(q, kt) + ctx["bias"][lt]  # [kvh, group, T]
            out = torch.bmm(torch.softmax(scores, dim=-1), v).reshape(1, 1, -1)
            h = self.ops.layer_tail(layer, h, out, None)
        h = self.ops.rms(m.norm, h)
        return h, d.post_projection(h)

    def forward(self, inputs_embeds, position_ids, full_k, full_v, sliding_k, sliding_v):
        h, state = self.body(inputs_embeds, self.context(position_ids, full_k, full_v, sliding_k, sliding_v))
        if self.drafter.masked_embedding is None:
            return self.drafter.lm_head(h), state
        return self.centroid_logits(h), state

    def choose(self, h) -> torch.Tensor:
        """The greedy draft token [1, 1] (int64) without building vocabulary-wide logits: the
        argmax over the centroid head's candidates (or over the dense head)."""
        if self.drafter.masked_embedding is None:
            return torch.argmax(self.drafter.lm_head(h)[0], dim=-1, keepdim=True)
        candidates, scores = self._candidate_scores(h)
        return candidates[torch.argmax(scores, dim=-1)].reshape(1, 1)

    def _candidate_scores(self, h):
        """-> candidate token ids [C], their logits [1, C]."""
        me = self.drafter.masked_embedding
        _, top = torch.topk(me.centroids(h), k=self.top_k, dim=-1)  # [1, 1, top_k]
        candidates = self.clusters[top[0, 0]].reshape(-1)  # [top_k * per_centroid]
        if self.ops.xnnpack:
            # every token's score from the dense head (one linear: quantized by the linear
            # recipe, run in the delegate), then the candidates': the candidates' rows of a
            # quantized table (4096 of E4B's 262144) are decoded by element-wise kernels
            # outside the delegate: a drafting round 3.3-4x as long at real widths
            scores = torch.index_select(self.drafter.lm_head(h).reshape(-1), 0, candidates)  # [C]
            return candidates, scores.reshape(1, -1)
        # onnxruntime: gather the candidates' rows (its Gather + decode beat the dense
        # MatMulNBits over the whole vocabulary: 0.90-0.93x the round's time at real widths);
        # rows times the column h: no transpose of the gathered rows
        weights = self.candidate_rows(candidates)  # [C, D]
        scores = torch.bmm(weights[None], h.reshape(1, -1, 1))  # [1, C, 1]
        return candidates, scores.reshape(1, -1)

    def centroid_logits(self, h):
        """The ordered-embedding head: score the tokens of the top-k centroids, fill the rest
        with a constant below any candidate (argmax-equivalent to transformers' min - 1)."""
        candidates, scores = self._candidate_scores(h)
        full = torch.full((1, self.drafter.masked_embedding.vocab_size), NEG, dtype=h.dtype)
        full = full.index_copy(1, candidates, scores)
        return full[None]


class DraftTokens(nn.Module):
    """`steps` greedy drafter steps in one call: token [1, 1] (int64), state [1, 1, H] (the
    target's hidden state), position_ids [1, 1], the shared caches -> draft tokens [1, steps].

    Step i embeds the previous token with the target's table (`embed_tokens`, the same
    weights the target's embedding lookup uses: exporters store it once), runs the drafter
    body and picks the argmax inside the graph; masks, RoPE and the grouped K/V are built
    once for all steps (every step of a round sits at the same position). Token for token
    the chain `DrafterStep` + argmax gives, in one call instead of `steps`."""

    def __init__(self, step: DrafterStep, embed_tokens: nn.Module, steps: int):
        super().__init__()
        if steps < 1:
            raise ValueError("steps must be >= 1")
        self.step = step
        self.embed_tokens = embed_tokens
        self.steps = steps

    def forward(self, token, state, position_ids, full_k, full_v, sliding_k, sliding_v):
        ctx = self.step.context(position_ids, full_k, full_v, sliding_k, sliding_v)
        tokens = []
        for _ in range(self.steps):
            h, state = self.step.body(torch.cat([self.embed_tokens(token), state], dim=-1), ctx)
            token = self.step.choose(h)
            tokens.append(token)
        return torch.cat(tokens, dim=1)
