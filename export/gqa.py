"""Fused attention for the ONNX target graph: onnxruntime's GroupQueryAttention
(com.microsoft) as a torch custom op, `gemma4::gqa`.

What the op does, per layer and call (N new tokens at slots p..p+N-1, p = total - N):
RoPE on q and k (non-interleaved rotate-half over the whole head, angles from the cos/sin
tables [slots, d/2] at the slots), the new K/V written into the cache at slots p..p+N-1,
and attention of each new query over slots 0..its own (the window's last `window` of them
on sliding layers), scale 1.0 (Gemma 4 normalises q and k instead). Only the valid range
of the cache is read: a 80-token prompt attends over 80 slots, not `max_context`. Full
caches: slot == position. Sliding (window) caches: slot == position - base (see
runtime/artifacts.py), so the caller passes lengths minus base and the table rows from
base on: the op then reads at most a window cache's slots, however long the sequence.
q may be packed (q, k and v heads in one tensor, k and v None): one input for a cache
owner's three projections.

When the runtime binds a layer's past and present cache to one buffer (I/O binding),
onnxruntime writes the N new entries in place: no cache is copied per call. Unbound (plain
`run`, other clients), the op returns a fresh cache holding the past entries below p and
the new ones, the same values.

Here: the op's definition, an eager reference (the module's own forward: tests compare it
with transformers), its shape function for torch.export, and its translation into the one
GroupQueryAttention node for torch.onnx.export (`ONNX_TRANSLATIONS`).
"""

from __future__ import annotations

import torch

from export.modules import NEG


@torch.library.custom_op("gemma4::gqa", mutates_args=())
def gqa(
    q: torch.Tensor,  # [1, N, heads * d], or packed [1, N, (heads + 2 * kv_heads) * d] with k and v None
    k: torch.Tensor | None,  # [1, N, kv_heads * d] (before RoPE)
    v: torch.Tensor | None,  # [1, N, kv_heads * d]
    past_k: torch.Tensor,  # [1, kv_heads, slots, d]
    past_v: torch.Tensor,
    seqlens_k: torch.Tensor,  # int32 [1]: p + N - 1
    total: torch.Tensor,  # int32 scalar: p + N
    cos: torch.Tensor,  # [slots, d / 2]
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    window: int,  # a query sees keys within `window` positions of its own, itself included; 0: all
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reference of onnxruntime's GroupQueryAttention as this project calls it."""
    n = q.shape[1]
    d = past_k.shape[-1]
    if k is None:  # packed: the query heads, then the key heads, then the value heads
        q, k, v = q.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    end = int(total)
    start = end - n
    pos = torch.arange(start, end)

    def rope(x, h):  # [1, N, h*d] -> [1, h, N, d]
        x = x.reshape(1, n, h, d).transpose(1, 2)
        c, s = cos[pos][None, None], sin[pos][None, None]  # [1, 1, N, d/2]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    qh = rope(q, heads)
    present_k, present_v = past_k.clone(), past_v.clone()
    present_k[:, :, start:end] = rope(k, kv_heads)
    present_v[:, :, start:end] = v.reshape(1, n, kv_heads, d).transpose(1, 2)
    group = heads // kv_heads
    keys = present_k[:, :, :end].repeat_interleave(group, dim=1)  # [1, heads, end, d]
    values = present_v[:, :, :end].repeat_interleave(group, dim=1)
    j = torch.arange(end)[None, :]
    allowed = j <= pos[:, None]
    if window > 0:
        allowed &= pos[:, None] - j < window
    scores = qh @ keys.transpose(-1, -2) + torch.where(allowed, 0.0, NEG)
    out = torch.softmax(scores, dim=-1) @ values  # [1, heads, N, d]
    return out.transpose(1, 2).reshape(1, n, heads * d), present_k, present_v


@gqa.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, heads, kv_heads, window):
    out = q.new_empty(q.shape[0], q.shape[1], heads * past_k.shape[-1])
    return out, past_k.new_empty(past_k.shape), past_v.new_empty(past_v.shape)


def _register_schema() -> None:
    """onnxscript's tracer builds a node from its onnx schema; onnx has none for onnxruntime's
    contrib ops, so the part of GroupQueryAttention's signature used here is registered (once)."""
    import onnx.defs as defs
    from onnx.defs import OpSchema

    if defs.has("GroupQueryAttention", "com.microsoft"):
        return
    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    opt = OpSchema.FormalParameterOption.Optional
    inputs = [P("query", "T"), P("key", "T", param_option=opt), P("value", "T", param_option=opt),
              P("past_key", "T", param_option=opt), P("past_value", "T", param_option=opt), P("seqlens_k", "M"),
              P("total_sequence_length", "M"), P("cos_cache", "T", param_option=opt),
              P("sin_cache", "T", param_option=opt)]
    outputs = [P("output", "T"), P("present_key", "T"), P("present_value", "T")]
    # only num_heads and kv_num_heads are required
    ints = [A(name, OpSchema.AttrType.INT, "", required=name.endswith("num_heads")) for name in
            ("num_heads", "kv_num_heads", "local_window_size", "do_rotary", "rotary_interleaved")]
    defs.register_schema(OpSchema(
        "GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[*ints, A("scale", OpSchema.AttrType.FLOAT, "", required=False)],
    ))


def _onnx_gqa(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, heads: int, kv_heads: int, window: int):
    from onnxscript.values import Opset

    _register_schema()
    ms = Opset("com.microsoft", 1)
    return ms.GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total, cos, sin,
                                  **node_attributes(heads, kv_heads, window))


def node_attributes(heads: int, kv_heads: int, window: int) -> dict:
    """The GroupQueryAttention node's attributes for `gqa`'s arguments."""
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": 1.0, "do_rotary": 1, "rotary_interleaved": 0}
    if window > 0:
        # onnxruntime 1.32's CPU kernel: a query sees the last local_window_size keys, its own
        # included (measured: window - 1 drops one key from every prompt row past the window)
        attrs["local_window_size"] = window
    return attrs


ONNX_TRANSLATIONS = {torch.ops.gemma4.gqa.default: _onnx_gqa}


def rope_tables(inv_freq: torch.Tensor, scaling: float, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [slots, d/2] of every position (the op's RoPE tables), as transformers'
    rotary embedding computes the angles (attention scaling folded in)."""
    freqs = torch.arange(slots, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    return freqs.cos() * scaling, freqs.sin() * scaling
