"""ExecuTorch export: one .pte whose methods share the KV caches and the embedding table.

Steps:
1. `EtPair`: the export modules of export/modules.py (the same ones ONNX uses) with the
   target's caches as mutable buffers (same ring layout), tanh-GELU spelled out (XNNPACK in
   ExecuTorch 1.5.1 would otherwise run the erf GELU, ~1e-2 off on the logits);
2. methods, each exported with torch.export (dynamic token count where it applies):
   - `forward(tokens [1, N], input_pos [1])` -> logits [1, N, V]: the contract of ExecuTorch's
     LLM runners (`TextLLMRunner`);
   - `target_step(tokens, input_pos)` -> logits, hidden: prefill chunk, decode, verify;
   - `draft_step(token [1, 1], state [1, 1, H], input_pos [1])` -> logits, projected state:
     the drafter reads the caches the target methods wrote and embeds its token with the
     program's one embedding table;
3. lowered to XNNPACK (portable kernels as fallback) with mutable buffers shared between the
   methods, metadata as constant methods; the delegated share per method is printed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from export.config import FULL, SLIDING, TargetSpec
from export.modules import CacheLayout, DrafterStep, EmbedStep, TargetStep


class EtPair(torch.nn.Module):
    def __init__(self, target, drafter, layout: CacheLayout):
        super().__init__()
        self.layout = layout
        self.embed = EmbedStep(target)
        self.step = TargetStep(target, layout, elementary_gelu=True)
        self.draft = DrafterStep(drafter, layout, elementary_gelu=True) if drafter is not None else None
        for i in layout.owners:
            self.register_buffer(f"k_cache_{i}", torch.zeros(layout.shape(i)), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(layout.shape(i)), persistent=False)

    def caches(self) -> list[torch.Tensor]:
        out = []
        for i in self.layout.owners:
            out += [getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")]
        return out

    def run_target(self, tokens, input_pos):
        embeds, ple = self.embed(tokens)
        positions = (input_pos[0] + torch.arange(tokens.shape[1]))[None]
        caches = self.caches()
        logits, hidden, *present = self.step(embeds, ple, positions, *caches)
        for buf, new in zip(caches, present):
            buf.copy_(new)
        return logits, hidden

    def run_draft(self, token, state, input_pos):
        producers = self.layout.attention.kv_producers()
        full, sliding = producers[FULL], producers[SLIDING]
        embeds, _ = self.embed(token)
        return self.draft(
            torch.cat([embeds, state], dim=-1),
            input_pos[None],
            getattr(self, f"k_cache_{full}"),
            getattr(self, f"v_cache_{full}"),
            getattr(self, f"k_cache_{sliding}"),
            getattr(self, f"v_cache_{sliding}"),
        )


class _Forward(torch.nn.Module):
    """forward(tokens, input_pos) -> logits: the LLM-runner contract."""

    def __init__(self, pair: EtPair):
        super().__init__()
        self.pair = pair

    def forward(self, tokens, input_pos):
        return self.pair.run_target(tokens, input_pos)[0]


class _TargetStep(_Forward):
    def forward(self, tokens, input_pos):
        return self.pair.run_target(tokens, input_pos)


class _DraftStep(_Forward):
    def forward(self, token, state, input_pos):
        return self.pair.run_draft(token, state, input_pos)


def delegated_share(edge_program) -> tuple[int, int]:
    """(delegated call nodes, other compute nodes) in a lowered edge program."""
    delegated = other = 0
    for node in edge_program.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "executorch_call_delegate" in name:
            delegated += 1
        elif "getitem" not in name and "copy_" not in name:
            other += 1
    return delegated, other


def export_executorch(target, drafter, path: Path, max_context: int, max_draft: int) -> dict:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    spec = TargetSpec.from_hf(target.config)
    layout = CacheLayout(spec.attention, max_context, max_draft)
    pair = EtPair(target, drafter, layout).eval()
    tokens = torch.export.Dim("tokens", min=1, max=max_context)
    ids = torch.full((1, 3), spec.bos_token_id, dtype=torch.long)
    pos = torch.tensor([0])
    programs = {}
    with torch.no_grad():
        for name, method in (("forward", _Forward), ("target_step", _TargetStep)):
            t0 = time.time()
            programs[name] = torch.export.export(method(pair), (ids, pos), dynamic_shapes=({1: tokens}, None))
            print(f"[executorch] exported {name} ({time.time() - t0:.1f}s)", flush=True)
        if drafter is not None:
            state = torch.zeros(1, 1, spec.hidden_size)
            programs["draft_step"] = torch.export.export(_DraftStep(pair), (ids[:, :1], state, pos))
            print("[executorch] exported draft_step", flush=True)
    eos = target.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    metadata = {
        "get_max_seq_len": max_context,
        "get_max_context_len": max_context,
        "get_vocab_size": spec.vocab_size,
        "get_n_layers": spec.attention.num_layers,
        "get_num_kv_shared_layers": spec.attention.num_kv_shared_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
        "get_bos_id": spec.bos_token_id,
        "get_eos_ids": eos,
    }
    t0 = time.time()
    edge = to_edge_transform_and_lower(
        programs,
        partitioner=[XnnpackPartitioner()],
        constant_methods=metadata,
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    print(f"[executorch] lowered to XNNPACK ({time.time() - t0:.1f}s)", flush=True)
    shares = {}
    for name in programs:
        d, o = delegated_share(edge.exported_program(name))
        shares[name] = {"delegate_calls": d, "non_delegated_ops": o}
        print(f"      {name}: {d} XNNPACK delegate calls, {o} ops left to portable kernels", flush=True)
    prog = edge.to_executorch(
        ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True))
    )
    Path(path).write_bytes(prog.buffer)
    return {"methods": sorted(programs), "metadata": metadata, "delegation": shares}
