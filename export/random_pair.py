"""Random-weight Gemma 4 pairs of named shapes, written as Hugging Face checkpoint folders.

The demo pair has one KV head and a tiny vocabulary; the real models do not. These pairs
carry the real models' proportions at a size that exports in seconds, so every format is
tested on the shapes it must handle (tests/test_shapes.py) and `make export` / `make parity`
can be tried on them (`python -m export.random_pair --shape e4b --out DIR`).

Steps of `write_pair(shape, out)`:
1. `SHAPES[shape]` gives the target and drafter specs (export/config.py) and how the target
   is saved (`Gemma4ForCausalLM`, or `Gemma4ForConditionalGeneration` with small vision and
   audio towers present);
2. the modules are built with a fixed seed; the target's token table (`embed_std`) and the
   drafter's output table and centroids (`drafter_head_std`) are drawn with a larger spread
   than transformers' init, so the tied LM heads give logits with clear top-2 margins (fp32
   kernels differ by ~1e-6 relative; random init at std 0.02 gives near-ties that flip
   argmaxes, and centroid choices, between correct implementations);
3. target/ and assistant/ are saved with safetensors, with the demo pair's tokenizer.json
   (vocabulary 2048, the size of every shape here) so text prompts work.

A new shape is one entry in `SHAPES`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from export.config import FULL, SLIDING, AttentionLayout, DrafterSpec, TargetSpec, _pattern

DEMO_TOKENIZER = Path(__file__).resolve().parent / "demo" / "weights" / "target" / "tokenizer.json"
VOCAB = 2048  # the demo tokenizer's vocabulary


@dataclass(frozen=True)
class RandomShape:
    target: TargetSpec
    drafter: DrafterSpec
    multimodal: bool = False  # save the target as Gemma4ForConditionalGeneration with vision + audio
    embed_std: float = 0.05  # spread of the token table (see module docstring)
    drafter_head_std: float = 0.3  # spread of the drafter's output table and centroids, likewise
    description: str = ""


def _target(layers, heads, kv_heads, head_dims, shared, hidden=128, window=32, double_wide=False) -> TargetSpec:
    return TargetSpec(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        attention=AttentionLayout(layers, heads, kv_heads, head_dims[0], head_dims[1], window, shared),
        ple_dim=16,
        ple_vocab_size=VOCAB,
        final_logit_softcapping=30.0,
        max_position_embeddings=4096,
        eos_token_ids=(1,),
        use_double_wide_mlp=double_wide,
    )


def _drafter(target: TargetSpec, heads, ordered=True, centroids=64, top_k=8, hidden=64) -> DrafterSpec:
    a = target.attention
    return DrafterSpec(
        backbone_hidden_size=target.hidden_size,
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        attention=AttentionLayout((SLIDING, SLIDING, SLIDING, FULL), heads, a.num_key_value_heads, a.head_dim,
                                  a.global_head_dim, a.sliding_window, 4),
        use_ordered_embeddings=ordered,
        num_centroids=centroids,
        centroid_intermediate_top_k=top_k,
    )


# E4B: 8 query / 2 KV heads, head dims 1:2, ([sliding]*5 + full) layers, the last 3/7 shared
_E4B = _target(_pattern(5, 2), 8, 2, (32, 64), 4)
# E2B: 1 KV head, ([sliding]*4 + full) layers, double-wide MLPs in the shared layers
_E2B = _target(_pattern(4, 2), 8, 1, (32, 64), 4, hidden=96, double_wide=True)

SHAPES: dict[str, RandomShape] = {
    "e4b": RandomShape(
        _E4B, _drafter(_E4B, 4, centroids=32, top_k=4),
        description="E4B proportions: 8/2 heads, head dims 32/64, 5:1 layers, 4 of 12 KV-shared; "
        "centroid head with 32 centroids, top 4 (the demo: 64, top 8)",
    ),
    "e2b": RandomShape(
        _E2B, _drafter(_E2B, 4, ordered=False),
        description="E2B proportions: 8/1 heads, 4:1 layers, double-wide MLPs in the 4 KV-shared layers; dense drafter head",
    ),
    "e4b-multimodal": RandomShape(
        _E4B, _drafter(_E4B, 4),
        multimodal=True,
        description="the e4b target saved as Gemma4ForConditionalGeneration with vision and audio towers",
    ),
}


def shape(name: str) -> RandomShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise KeyError(f"unknown shape {name!r}; known: {', '.join(sorted(SHAPES))}") from None


def multimodal_config(text_config):
    """A `Gemma4Config` around `text_config` with one-layer vision and audio towers."""
    from transformers import Gemma4Config

    return Gemma4Config(
        text_config=text_config.to_dict(),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            head_dim=16,
        ),
        audio_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=32,
            subsampling_conv_channels=[8, 4],
        ),
    )


def write_pair(name: str, out: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `out/target` and `out/assistant`; returns the two folders."""
    from export.hf_compat import patch_transformers

    patch_transformers()
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    s = shape(name)
    out = Path(out)
    torch.manual_seed(seed)
    text = s.target.to_hf()
    if s.multimodal:
        target = Gemma4ForConditionalGeneration(multimodal_config(text))
        table = target.model.language_model.embed_tokens
    else:
        target = Gemma4ForCausalLM(text)
        table = target.model.embed_tokens
    with torch.no_grad():
        table.weight.normal_(0.0, s.embed_std)
    target.save_pretrained(out / "target")
    drafter = Gemma4AssistantForCausalLM(s.drafter.to_hf(s.target))
    with torch.no_grad():
        drafter.model.embed_tokens.weight.normal_(0.0, s.drafter_head_std)  # tied to its LM head
    if drafter.masked_embedding is not None:
        drafter.masked_embedding.token_ordering.copy_(torch.randperm(s.drafter.vocab_size))
        with torch.no_grad():
            drafter.masked_embedding.centroids.weight.normal_(0.0, s.drafter_head_std)
    drafter.save_pretrained(out / "assistant")
    for d in ("target", "assistant"):
        shutil.copyfile(DEMO_TOKENIZER, out / d / "tokenizer.json")
    return out / "target", out / "assistant"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.random_pair", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", required=True, help=f"one of: {', '.join(sorted(SHAPES))}")
    ap.add_argument("--out", type=Path, required=True, help="folder for target/ and assistant/")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.shape not in SHAPES:
        print(f"error: unknown shape {args.shape!r}; known: {', '.join(sorted(SHAPES))}", file=sys.stderr)
        return 2
    t, a = write_pair(args.shape, args.out, args.seed)
    print(f"{args.shape}: {SHAPES[args.shape].description}\n  CHECKPOINT={t} ASSISTANT={a}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
