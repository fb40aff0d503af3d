"""Train the demo pair that ships with the project (`make demo-model`).

Steps:
1. corpus: the Python standard library's own source (every machine with this Python has it),
   files in sorted order, tests and bundled data left out.
2. tokenizer: byte-level BPE with 2048 entries, built with the tokenizers library;
   ids 0..3 are <pad>, <eos>, <bos>, <unk> as in Gemma.
3. target: `Gemma4ForCausalLM` with the `demo` preset (PLE, sliding and full layers with
   head_dim 32/64, proportional RoPE, 6 KV-shared layers, logit softcapping), trained on
   512-token windows so that every batch runs past the 64-token sliding window.
4. token ordering: balanced k-means of the target's (tied) output embeddings into
   `num_centroids` equal clusters; the drafter's centroid head picks among them.
5. greedy pool: corpus windows of `prompt_len` tokens continued greedily by the frozen target
   to the drafter's training length: the kind of text the drafter meets at inference, where
   every context is the target's own greedy output.
6. drafter: `Gemma4AssistantForCausalLM`, distilled from the frozen target exactly the way it
   is used, on batches of half corpus windows and half greedy-pool sequences: from the
   target's final hidden state at p and the token at p+1, at position id p+1, attending to
   the target's shared K/V of positions <= p (full layers: all of them; sliding layers: the
   last window+1, as transformers' drafter does), unrolled for `draft_steps` steps on its
   own projected state, each step trained to predict the target's greedy token (plus a
   cross-entropy on the cluster of that token for the centroid head).
7. save both as Hugging Face directories (safetensors) with tokenizer.json.

Everything is seeded; the same Python version and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from export.config import FULL, SLIDING, preset

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "ensurepip", "pydoc_data", "site-packages", "turtledemo"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- corpus, tokenizer


def corpus_files(root: Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_"):
            continue
        files.append(path)
    return files


def read_corpus(root: Path | None = None) -> list[str]:
    texts = []
    for path in corpus_files(root):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != [0, 1, 2, 3]:
        raise RuntimeError("special tokens did not get ids 0..3")
    return tok


def encode_corpus(tok, texts: list[str]) -> torch.Tensor:
    """All documents as one stream: <bos> doc <eos> <bos> doc <eos> ..."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(1)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, seq_len: int, batch: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        yield stream[starts[:, None] + offsets]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------- target


def train_target(model, stream, steps: int, seq_len: int, batch: int, lr: float, seed: int):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    t0, seen = time.time(), 0
    for step, x in enumerate(batches(stream, seq_len, batch, steps, seed)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(200, steps // 10 + 1))
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += x.numel()
        if step % 50 == 0 or step == steps - 1:
            rate = seen / (time.time() - t0)
            log(f"target step {step}/{steps} loss {loss.item():.3f} ({rate:.0f} tok/s)")
    model.eval()
    return model


# ---------------------------------------------------------------------------- token ordering


def balanced_token_ordering(embeddings: torch.Tensor, num_centroids: int, seed: int, iters: int = 15):
    """Permutation of token ids, `num_centroids` consecutive groups of equal size, grouping
    tokens whose output embeddings point the same way."""
    vocab = embeddings.shape[0]
    size = vocab // num_centroids
    x = F.normalize(embeddings.float(), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(vocab, generator=gen)[:num_centroids]].clone()
    for _ in range(iters):
        assign = (x @ centers.T).argmax(-1)
        for c in range(num_centroids):
            members = x[assign == c]
            if len(members):
                centers[c] = F.normalize(members.mean(0), dim=-1)
    # Balanced assignment: most confident (token, centroid) pairs first, each centroid
    # taking at most `size` tokens.
    score = x @ centers.T
    order = torch.argsort(score.flatten(), descending=True, stable=True)
    owner = torch.full((vocab,), -1, dtype=torch.long)
    fill = [0] * num_centroids
    placed = 0
    for flat in order.tolist():
        tok, c = divmod(flat, num_centroids)
        if owner[tok] >= 0 or fill[c] >= size:
            continue
        owner[tok] = c
        fill[c] += 1
        placed += 1
        if placed == vocab:
            break
    return torch.cat([torch.nonzero(owner == c).flatten() for c in range(num_centroids)])


# ---------------------------------------------------------------------------- drafter


def drafter_masks(num_queries: int, kv_len: int, window: int):
    """Boolean masks [1, 1, P, T] for queries at p = 0..P-1 (position id p+1) over target K/V."""
    p = torch.arange(num_queries)[:, None]
    k = torch.arange(kv_len)[None, :]
    full = k <= p
    sliding = full & (k >= p - window)  # window + 1 entries, as transformers' drafter reads them
    return {FULL: full[None, None], SLIDING: sliding[None, None]}


def target_teacher(target, x: torch.Tensor):
    """Frozen target over x: final hidden states, greedy tokens, shared K/V, scaled input embeddings."""
    with torch.no_grad():
        out = target.model(input_ids=x, return_shared_kv_states=True)
        hidden = out.last_hidden_state
        logits = target.lm_head(hidden)
        greedy = logits.argmax(-1)  # softcapping is monotonic: argmax unchanged
        shared = {k: (v[0].detach(), v[1].detach()) for k, v in out.shared_kv_states.items()}
        embeds = target.model.embed_tokens(x)
    return hidden, greedy, shared, embeds


@torch.no_grad()
def greedy_pool(target, stream: torch.Tensor, size: int, prompt_len: int, seq_len: int, seed: int, batch: int = 32):
    """`size` sequences of `seq_len` tokens: a corpus window of `prompt_len` tokens, then the
    target's greedy continuation (KV cache, no EOS stop)."""
    seqs = []
    for x in batches(stream, prompt_len, batch, math.ceil(size / batch), seed):
        out = target(input_ids=x, use_cache=True)
        cache, ids = out.past_key_values, [x, out.logits[:, -1:].argmax(-1)]
        for _ in range(seq_len - prompt_len - 1):
            ids.append(target(input_ids=ids[-1], past_key_values=cache, use_cache=True).logits.argmax(-1))
        seqs.append(torch.cat(ids, dim=1))
        log(f"greedy pool {min(len(seqs) * batch, size)}/{size}")
    return torch.cat(seqs)[:size]


def mixed_batches(stream, pool, seq_len: int, batch: int, steps: int, seed: int):
    """Half corpus windows, half greedy-pool sequences (all of the batch when `pool` is None)."""
    from_pool = 0 if pool is None else batch // 2
    gen = torch.Generator().manual_seed(seed + 1)
    for x in batches(stream, seq_len, batch - from_pool, steps, seed):
        if from_pool:
            x = torch.cat([x, pool[torch.randint(0, len(pool), (from_pool,), generator=gen), :seq_len]])
        yield x


def drafter_unrolled_loss(drafter, target, x, draft_steps: int, cluster_of: torch.Tensor | None):
    hidden, greedy, shared, embeds = target_teacher(target, x)
    batch, seq = x.shape
    queries = seq - draft_steps  # p = 0..queries-1, every step has its token and label
    masks = drafter_masks(queries, seq, drafter.config.get_text_config().sliding_window)
    masks = {k: v.expand(batch, 1, queries, seq) for k, v in masks.items()}
    position_ids = (torch.arange(queries) + 1).expand(batch, queries)
    state = hidden[:, :queries]
    losses, accs = [], []
    for i in range(1, draft_steps + 1):
        token_embeds = embeds[:, i : i + queries]  # token at p+i (teacher-forced)
        labels = greedy[:, i : i + queries]  # target's greedy choice at p+i
        h = drafter.pre_projection(torch.cat([token_embeds, state], dim=-1))
        # logits_to_keep as a tensor keeps transformers from slicing inputs for KV-shared
        # layers (its slicing assumes PLE inputs, which the drafter does not have).
        h = drafter.model(
            inputs_embeds=h,
            attention_mask=masks,
            position_ids=position_ids,
            shared_kv_states=shared,
            use_cache=False,
            logits_to_keep=torch.tensor(0),
        ).last_hidden_state
        logits = drafter.lm_head(h)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        if cluster_of is not None:
            centroid_logits = drafter.masked_embedding.centroids(h)
            loss = loss + F.cross_entropy(centroid_logits.flatten(0, 1), cluster_of[labels].flatten())
        losses.append(loss)
        accs.append((logits.argmax(-1) == labels).float().mean().item())
        state = drafter.post_projection(h)
    return torch.stack(losses).mean(), accs


def train_drafter(drafter, target, stream, steps, seq_len, batch, lr, seed, draft_steps, pool=None):
    for p in target.parameters():
        p.requires_grad_(False)
    cluster_of = None
    if drafter.masked_embedding is not None:
        ordering = drafter.masked_embedding.token_ordering
        cluster_of = torch.empty_like(ordering)
        cluster_of[ordering] = torch.arange(len(ordering)) // (len(ordering) // drafter.config.num_centroids)
    drafter.train()
    opt = torch.optim.AdamW(drafter.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    t0 = time.time()
    for step, x in enumerate(mixed_batches(stream, pool, seq_len, batch, steps, seed)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        loss, accs = drafter_unrolled_loss(drafter, target, x, draft_steps, cluster_of)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            acc = " ".join(f"{a:.2f}" for a in accs)
            log(f"drafter step {step}/{steps} loss {loss.item():.3f} top1 per step [{acc}] ({time.time() - t0:.0f}s)")
    drafter.eval()
    return drafter


# ---------------------------------------------------------------------------- main


def write_pair(out: Path, tok, target, drafter) -> None:
    for name, model in (("target", target), ("assistant", drafter)):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        tok.save(str(d / "tokenizer.json"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("export/demo/weights"))
    ap.add_argument("--target-steps", type=int, default=1100)
    ap.add_argument("--drafter-steps", type=int, default=3500)
    ap.add_argument("--pool-size", type=int, default=2048, help="greedy-pool sequences (0: corpus only)")
    ap.add_argument("--pool-prompt-len", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--draft-steps", type=int, default=4, help="unrolled drafter steps in training")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drafter-only", action="store_true", help="reuse <out>/target, retrain the drafter")
    args = ap.parse_args(argv)
    drafter_len = args.seq_len // 2  # the drafter trains on half-length windows
    if args.pool_size < 0 or not 0 < args.pool_prompt_len < drafter_len:
        ap.error(f"need --pool-size >= 0 and --pool-prompt-len in 1..{drafter_len - 1} (drafter windows: {drafter_len})")

    from export.hf_compat import patch_transformers

    patch_transformers()
    from tokenizers import Tokenizer
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pair = preset("demo")

    texts = read_corpus()
    log(f"corpus: {len(texts)} files, {sum(map(len, texts)) / 1e6:.1f} MB from {sysconfig.get_paths()['stdlib']}")
    if args.drafter_only:
        tok = Tokenizer.from_file(str(args.out / "target" / "tokenizer.json"))
        target = Gemma4ForCausalLM.from_pretrained(args.out / "target").eval()
    else:
        tok = build_tokenizer(texts, pair.target.vocab_size)
    stream = encode_corpus(tok, texts)
    log(f"corpus: {len(stream) / 1e6:.2f}M tokens")

    if not args.drafter_only:
        torch.manual_seed(args.seed)
        target = Gemma4ForCausalLM(pair.target.to_hf())
        log(f"target: {sum(p.numel() for p in target.parameters()) / 1e6:.2f}M parameters")
        train_target(target, stream, args.target_steps, args.seq_len, args.batch, 3e-3, args.seed)

    torch.manual_seed(args.seed + 1)
    drafter = Gemma4AssistantForCausalLM(pair.drafter.to_hf(pair.target))
    ordering = balanced_token_ordering(target.lm_head.weight.detach(), pair.drafter.num_centroids, args.seed)
    drafter.masked_embedding.token_ordering.copy_(ordering)
    log(f"drafter: {sum(p.numel() for p in drafter.parameters()) / 1e6:.2f}M parameters")
    pool = None
    if args.pool_size:
        pool = greedy_pool(target, stream, args.pool_size, args.pool_prompt_len, drafter_len, args.seed + 3)
    train_drafter(
        drafter, target, stream, args.drafter_steps, drafter_len, args.batch, 3e-3, args.seed + 2, args.draft_steps, pool
    )

    target.generation_config.eos_token_id = list(pair.target.eos_token_ids)
    drafter.generation_config.num_assistant_tokens = 4
    drafter.generation_config.num_assistant_tokens_schedule = "constant"
    write_pair(args.out, tok, target, drafter)
    (args.out / "TRAINING.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "python": sys.version.split()[0]}, indent=1)
        + "\n"
    )
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
