"""The quantization recipe's building blocks."""

from __future__ import annotations

import torch
from torch import nn

from export.quantize import Int8Table, quantize_for_executorch, quantize_tables


def test_int8_table_error_is_within_half_a_step_per_row():
    torch.manual_seed(0)
    table = nn.Embedding(64, 16)
    table.weight.data[3] *= 50  # rows of very different scale each get their own step
    q = Int8Table(table)
    ids = torch.arange(64)
    err = (q(ids) - table(ids)).abs()
    step = table.weight.abs().amax(dim=1, keepdim=True) / 127
    assert bool((err <= step / 2 + 1e-7).all())
    assert q.q.dtype == torch.int8


def test_shared_tables_are_quantized_once_and_tied_heads_untied():
    emb = nn.Embedding(32, 32)
    head = nn.Linear(32, 32, bias=False)
    head.weight = emb.weight  # tied, as Gemma's LM head
    a, b = nn.ModuleDict({"emb": emb, "head": head}), nn.ModuleDict({"same": emb})
    report = quantize_for_executorch([a, b], "8da4w", 32, "int8", keep_8bit=["head"])
    assert report["embeddings"] == 1 and isinstance(a["emb"], Int8Table) and a["emb"] is b["same"]
    assert report["linears_int8"] == 1 and report["linears_int4"] == 0  # the head kept at 8 bits


def test_quantize_tables_keeps_the_gemma_embedding_scale():
    from export.config import preset

    from export.hf_compat import patch_transformers

    patch_transformers()
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(0)
    model = Gemma4ForCausalLM(preset("demo").target.to_hf()).eval()
    ids = torch.randint(0, 2048, (1, 9))
    ref = model.model.embed_tokens(ids)
    assert quantize_tables([model]) == 2  # token table and PLE table
    out = model.model.embed_tokens(ids)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-2  # int8: ~0.4% of the row max


def test_keep_8bit_pattern_that_matches_nothing_is_refused():
    import pytest

    model = nn.ModuleDict({"head": nn.Linear(32, 32, bias=False)})
    with pytest.raises(ValueError, match=r"keep_8bit pattern\(s\) \['lm_haed'\] match no linear"):
        quantize_for_executorch([model], "8da4w", 32, "fp32", keep_8bit=["head", "lm_haed"])
