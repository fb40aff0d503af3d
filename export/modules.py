"""Export-friendly Gemma 4 target and drafter steps: the transformers layers and weights,
our cache layout, masks and outputs. One set of modules for ONNX and ExecuTorch.

The cache layout (see `CacheLayout`):
- only layers that own KV have a cache; KV-shared layers attend to their source layer's
  K/V of the same step (the last owner of the same type);
- full layers: `max_context` slots, slot == absolute position;
- sliding layers: a ring of `window + max_draft + 1` slots, slot == position % slots.
  Which position a slot holds is derived from the call's start position p alone: the most
  recent position < p congruent to the slot. Entries written by a rejected draft are never
  "rolled back": they either get overwritten by the next call or lie outside every mask
  (shown in `CacheLayout.ring_positions`). So committing a round is just choosing the next
  start position.

Steps of `TargetStep.forward(inputs_embeds, per_layer_inputs, position_ids, *caches)`
(N new tokens at positions p..p+N-1; N = prompt chunk, 1 for decode, k+1 for verify):
1. PLE: the context path (projection of the embeddings, RMSNorm) joins the token path
   (`per_layer_inputs`, looked up from the ids by `EmbedStep`);
2. per layer: Q (and K/V for owners) with RoPE at absolute positions; sliding owners attend
   to [ring before this call ; new entries] and write the new entries into the ring
   afterwards, so a chunk never evicts what its own queries need; full owners write first
   and attend to the whole cache;
3. final norm -> hidden states; LM head with softcapping -> logits.

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

NEG = -1e30  # finite fill: masked scores and centroid-head non-candidates


@dataclass(frozen=True)
class CacheLayout:
    """Shapes of the target's caches, one entry per cache-owning layer."""

    attention: AttentionLayout
    max_context: int
    max_draft: int

    def __post_init__(self):
        if self.max_context <= self.attention.sliding_window:
            raise ValueError(
                f"max_context {self.max_context} must exceed the sliding window {self.attention.sliding_window}"
            )
        if self.max_draft < 1:
            raise ValueError("max_draft must be >= 1")

    @property
    def ring_slots(self) -> int:
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
        return [f"past_key_values.{i}.{kv}" for i in self.owners for kv in ("key", "value")]

    def ring_positions(self, start: torch.Tensor) -> torch.Tensor:
        """Absolute position held by each ring slot before a call starting at `start`:
        the latest position < start with position % slots == slot (negative: empty).

        Safe with rejected drafts: a slot last written by a rejected position r >= start
        (r <= start + max_draft - 1) is reported as r - slots <= start - window - 2, below
        every window that reads the ring (target: >= start - window + 1; drafter:
        >= start - window - 1), so it is always masked out."""
        s = self.ring_slots
        slot = torch.arange(s, dtype=torch.long)
        # dividend kept non-negative: ExecuTorch's int remainder follows C sign rules
        return (start - 1) - torch.remainder(start - 1 - slot + s, s)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [1, heads, N, d]; cos/sin: [N, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _cos_sin(rotary, layer_type: str, positions: torch.Tensor):
    """positions: [N] -> cos, sin [N, head_dim], as transformers' Gemma4TextRotaryEmbedding."""
    inv_freq = getattr(rotary, f"{layer_type}_inv_freq")
    scale = getattr(rotary, f"{layer_type}_attention_scaling")
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def _rms(norm, x):
    """Gemma4RMSNorm written as x / sqrt(mean(x^2) + eps) * w: the pattern onnxruntime fuses
    into one SimplifiedLayerNormalization (transformers writes pow(., -0.5))."""
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return y * norm.weight if norm.with_scale else y


def gelu_tanh(x, elementary: bool):
    """gelu_pytorch_tanh. elementary=True spells out the tanh formula, for delegates that
    would otherwise run the erf GELU (ExecuTorch 1.5.1's XNNPACK)."""
    if not elementary:
        return torch.nn.functional.gelu(x, approximate="tanh")
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def _mlp(mlp, x, elementary_gelu: bool):
    return mlp.down_proj(gelu_tanh(mlp.gate_proj(x), elementary_gelu) * mlp.up_proj(x))


def _attend(q, k, v, allowed):
    """q: [1, H, N, d]; k/v: [1, kvh, T, d]; allowed: [N, T] bool. Grouped heads broadcast
    over the shared K/V (no copies); scaling 1.0 (Gemma 4 normalises q and k instead)."""
    heads, n, d = q.shape[1], q.shape[2], q.shape[3]
    kvh = k.shape[1]
    q = q.reshape(1, kvh, heads // kvh, n, d)
    scores = torch.matmul(q, k.unsqueeze(2).transpose(3, 4))  # [1, kvh, group, N, T]
    scores = scores.masked_fill(~allowed, NEG)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.unsqueeze(2))  # [1, kvh, group, N, d]
    return out.reshape(1, heads, n, d).transpose(1, 2).reshape(1, n, heads * d)


def _layer_tail(layer, residual, attn_out, per_layer_input, elementary_gelu: bool):
    """Everything in a Gemma 4 decoder layer after the attention core."""
    h = residual + _rms(layer.post_attention_layernorm, layer.self_attn.o_proj(attn_out))
    residual = h
    h = _rms(layer.pre_feedforward_layernorm, h)
    h = residual + _rms(layer.post_feedforward_layernorm, _mlp(layer.mlp, h, elementary_gelu))
    if per_layer_input is not None:
        residual = h
        g = gelu_tanh(layer.per_layer_input_gate(h), elementary_gelu) * per_layer_input
        h = residual + _rms(layer.post_per_layer_input_norm, layer.per_layer_projection(g))
    return h * layer.layer_scalar


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
        return embeds, ple.reshape(input_ids.shape[0], input_ids.shape[1], *self.ple_shape)


class TargetStep(nn.Module):
    """Functional target step: caches in, updated caches out (ONNX form). Caches are given
    as key, value per owner layer in `layout.owners` order."""

    def __init__(self, target, layout: CacheLayout, elementary_gelu: bool = False):
        super().__init__()
        self.elementary_gelu = elementary_gelu
        self.model = target.model
        self.lm_head = target.lm_head
        self.layout = layout
        self.softcap = target.config.final_logit_softcapping
        self.window = layout.attention.sliding_window
        self.producers = layout.attention.kv_producers()

    def forward(self, inputs_embeds, per_layer_inputs, position_ids, *caches):
        a = self.layout.attention
        m = self.model
        positions = position_ids[0]  # [N]
        start = positions[0]
        n = positions.shape[0]

        # PLE, context path: projection of the embeddings, normalised, joined to the token path.
        proj = m.per_layer_model_projection(inputs_embeds) * m.per_layer_model_projection_scale
        proj = _rms(m.per_layer_projection_norm, proj.reshape(per_layer_inputs.shape))
        ple = (proj + per_layer_inputs) * m.per_layer_input_scale

        rope = {t: _cos_sin(m.rotary_emb, t, positions) for t in (SLIDING, FULL)}
        q_pos = positions[:, None]
        # full caches: slot == position; valid up to each query's own position
        full_allowed = torch.arange(self.layout.max_context)[None, :] <= q_pos
        ring_pos = self.layout.ring_positions(start)
        ring_ok = (ring_pos >= 0)[None, :] & (q_pos - ring_pos[None, :] < self.window)
        new_ok = (positions[None, :] <= q_pos) & (q_pos - positions[None, :] < self.window)
        sliding_allowed = torch.cat([ring_ok.expand(n, -1), new_ok], dim=1)
        allowed = {FULL: full_allowed, SLIDING: sliding_allowed}

        # Ring update after attending: each slot takes the newest new entry with its residue,
        # if any (shape-static in the slot count, no branch on N, no duplicate writes).
        slots = self.layout.ring_slots
        last = start + n - 1
        newest = last - torch.remainder(last - torch.arange(slots) + slots, slots)
        take = newest >= start  # [slots]
        src = torch.clamp(newest - start, min=0)  # index into the N new entries

        def ring_write(past, new):
            return torch.where(take[None, None, :, None], new.index_select(2, src), past)

        present = []
        shared_kv = {}
        h = inputs_embeds
        for i, layer in enumerate(m.layers):
            lt = a.layer_types[i]
            attn = layer.self_attn
            cos, sin = rope[lt]
            x = _rms(layer.input_layernorm, h)
            q = _rms(attn.q_norm, attn.q_proj(x).view(1, n, -1, attn.head_dim)).transpose(1, 2)
            q = _rope(q, cos, sin)
            if i < a.first_shared_layer:
                k = _rms(attn.k_norm, attn.k_proj(x).view(1, n, -1, attn.head_dim)).transpose(1, 2)
                k = _rope(k, cos, sin)
                v = _rms(attn.v_norm, attn.v_proj(x).view(1, n, -1, attn.head_dim)).transpose(1, 2)
                past_k, past_v = caches[2 * i], caches[2 * i + 1]
                if lt == FULL:
                    k_all = past_k.index_copy(2, positions, k)
                    v_all = past_v.index_copy(2, positions, v)
                    present += [k_all, v_all]
                else:
                    k_all = torch.cat([past_k, k], dim=2)
                    v_all = torch.cat([past_v, v], dim=2)
                    present += [ring_write(past_k, k), ring_write(past_v, v)]
                if self.producers.get(lt) == i:
                    shared_kv[lt] = (k_all, v_all)
            else:
                k_all, v_all = shared_kv[lt]
            out = _attend(q, k_all, v_all, allowed[lt])
            h = _layer_tail(layer, h, out, ple[:, :, i, :], self.elementary_gelu)

        hidden = _rms(m.norm, h)
        logits = self.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return (logits, hidden, *present)


class DrafterStep(nn.Module):
    """One MTP drafter step. inputs_embeds = concat(target_embed(token), state): [1, 1, 2B];
    position_ids [1, 1] = p; shared caches of the target's last full and last sliding owner."""

    def __init__(self, drafter, layout: CacheLayout, elementary_gelu: bool = False):
        super().__init__()
        self.elementary_gelu = elementary_gelu
        self.drafter = drafter
        self.layout = layout
        tc = drafter.config.get_text_config()
        self.layer_types = list(tc.layer_types)
        self.window = tc.sliding_window
        me = drafter.masked_embedding
        if me is not None:
            self.register_buffer(
                "clusters", me.token_ordering.long().view(me.num_centroids, me.vocab_size_per_centroid), persistent=False
            )
            self.top_k = me.centroid_intermediate_top_k

    def forward(self, inputs_embeds, position_ids, full_k, full_v, sliding_k, sliding_v):
        d = self.drafter
        m = d.model
        positions = position_ids[0]  # [1]
        start = positions[0]
        kv = {FULL: (full_k, full_v), SLIDING: (sliding_k, sliding_v)}
        # The drafter reads positions < p: full: every slot below p; sliding: the last
        # window + 1 of them (|p - position| <= window + 1 as transformers' drafter reads them).
        full_allowed = (torch.arange(self.layout.max_context) < start)[None, :]
        ring_pos = self.layout.ring_positions(start)
        sliding_allowed = ((ring_pos >= 0) & (ring_pos >= start - 1 - self.window))[None, :]
        allowed = {FULL: full_allowed, SLIDING: sliding_allowed}
        rope = {t: _cos_sin(m.rotary_emb, t, positions) for t in set(self.layer_types)}

        h = d.pre_projection(inputs_embeds)
        for i, layer in enumerate(m.layers):
            lt = self.layer_types[i]
            attn = layer.self_attn
            x = _rms(layer.input_layernorm, h)
            q = _rms(attn.q_norm, attn.q_proj(x).view(1, 1, -1, attn.head_dim)).transpose(1, 2)
            q = _rope(q, *rope[lt])
            out = _attend(q, kv[lt][0], kv[lt][1], allowed[lt])
            h = _layer_tail(layer, h, out, None, self.elementary_gelu)
        h = _rms(m.norm, h)
        state = d.post_projection(h)
        if d.masked_embedding is None:
            return d.lm_head(h), state
        return self.centroid_logits(h), state

    def centroid_logits(self, h):
        """The ordered-embedding head: score the tokens of the top-k centroids, fill the rest
        with a constant below any candidate (argmax-equivalent to transformers' min - 1)."""
        me = self.drafter.masked_embedding
        _, top = torch.topk(me.centroids(h), k=self.top_k, dim=-1)  # [1, 1, top_k]
        candidates = self.clusters[top[0, 0]].reshape(-1)  # [top_k * per_centroid]
        weights = self.drafter.lm_head.weight[candidates]  # [C, D]
        scores = torch.matmul(h[0], weights.T)  # [1, C]
        full = torch.full((1, me.vocab_size), NEG, dtype=h.dtype)
        full = full.index_copy(1, candidates, scores)
        return full[None]
