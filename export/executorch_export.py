"""ExecuTorch export: one .pte whose methods share the KV caches and the embedding table.

Steps:
1. `EtPair`: the export modules of export/modules.py (the same ones ONNX uses) with the
   target's caches as mutable buffers (same ring layout), tanh-GELU spelled out (XNNPACK in
   ExecuTorch 1.5.1 would otherwise run the erf GELU, ~1e-2 off on the logits);
2. methods, each exported with torch.export (dynamic token count where it applies):
   - `forward(tokens [1, N], input_pos [1])` -> logits [1, 1, V] of the last position: the
     contract of ExecuTorch's LLM runners (`TextLLMRunner`); N <= `get_max_seq_len` (the
     prefill chunk, `MAX_CHUNK`), the caches hold `get_max_context_len` positions;
   - `target_step(tokens, input_pos, logit_index [R])` -> logits [1, R, V] of the rows
     logit_index names (R <= max_draft + 1, so the planned logits buffer is (max_draft + 1)
     x V, not max_context x V), hidden [1, R, H] of the same rows, which must be the call's
     last R positions (the KV-shared layers compute those rows only): prefill chunk,
     decode, verify;
   - `draft_step(token [1, 1], state [1, 1, H], input_pos [1])` -> logits, projected state:
     the drafter reads the caches the target methods wrote and embeds its token with the
     program's one embedding table;
   - `draft_k{k}(token, state, input_pos)` -> draft tokens [1, k] for k = 1..max_draft: a
     whole drafting round in one call (`DraftTokens`: k steps, argmax inside), the
     runtime's fast path;
3. lowered to XNNPACK (portable kernels as fallback) with mutable buffers shared between the
   methods, metadata as constant methods; the delegated share per method is printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
from pathlib import Path

import torch

from export.config import TargetSpec
from export.modules import CacheLayout, DrafterStep, DraftTokens, EmbedStep, TargetStep, layout_dict
from runtime.artifacts import LAYOUT_FILE, eos_ids

# Tokens one call of `forward` / `target_step` takes at most (the runtimes' prefill chunk;
# `get_max_seq_len` says it, and ExecuTorch's TextLLMRunner prefills longer prompts in chunks
# of it). The memory planner sizes the activation arena for it: at E4B's widths 251 MB for
# the whole context (1024 tokens), 45 MB for 256 (export/planned_memory.py).
MAX_CHUNK = 256


class EtPair(torch.nn.Module):
    def __init__(self, target, drafter, layout: CacheLayout):
        super().__init__()
        self.layout = layout
        self.embed = EmbedStep(target)
        self.step = TargetStep(target, layout, xnnpack=True)
        self.draft = DrafterStep(drafter, layout, xnnpack=True) if drafter is not None else None
        for i in layout.owners:
            self.register_buffer(f"k_cache_{i}", torch.zeros(layout.shape(i)), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(layout.shape(i)), persistent=False)

    def caches(self) -> list[torch.Tensor]:
        out = []
        for i in self.layout.owners:
            out += [getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")]
        return out

    def run_target(self, tokens, input_pos, logit_index):
        embeds, ple = self.embed(tokens)
        positions = (input_pos[0] + torch.arange(tokens.shape[1]))[None]
        caches = self.caches()
        logits, hidden, *present = self.step(embeds, ple, positions, logit_index, *caches)
        for buf, new in zip(caches, present):
            buf.copy_(new)
        return logits, hidden

    def shared_caches(self) -> list[torch.Tensor]:
        caches = self.caches()
        return [caches[i] for i in self.layout.shared_cache_indices()]

    def run_draft(self, token, state, input_pos):
        embeds, _ = self.embed(token)
        return self.draft(torch.cat([embeds, state], dim=-1), input_pos[None], *self.shared_caches())

    def run_draft_round(self, token, state, input_pos, steps: int):
        rounds = DraftTokens(self.draft, self.embed.embed_tokens, steps)
        return rounds(token, state, input_pos[None], *self.shared_caches())


class _Forward(torch.nn.Module):
    """forward(tokens, input_pos) -> logits [1, 1, V] of the last position: the LLM-runner
    contract (ExecuTorch's own LLM exports return the last position too)."""

    def __init__(self, pair: EtPair):
        super().__init__()
        self.pair = pair

    def forward(self, tokens, input_pos):
        n = tokens.shape[1]
        return self.pair.run_target(tokens, input_pos, torch.arange(n - 1, n))[0]


class _TargetStep(_Forward):
    """target_step(tokens, input_pos, logit_index) -> logits of the rows logit_index names
    (at most max_draft + 1, the call's last positions) and their hidden states."""

    def forward(self, tokens, input_pos, logit_index):
        return self.pair.run_target(tokens, input_pos, logit_index)


class _DraftStep(_Forward):
    def forward(self, token, state, input_pos):
        return self.pair.run_draft(token, state, input_pos)


class _DraftRound(_Forward):
    def __init__(self, pair: EtPair, steps: int):
        super().__init__(pair)
        self.steps = steps

    def forward(self, token, state, input_pos):
        return self.pair.run_draft_round(token, state, input_pos, self.steps)


class _ResetCaches(_Forward):
    """Zero-fill every cache (the runtime backend calls it before a new sequence)."""

    def forward(self):
        caches = self.pair.caches()
        for buf in caches:
            buf.zero_()
        return torch.tensor([len(caches)])


class _SharedKV(_Forward):
    """Copies of the producer caches the drafter reads (parity checks)."""

    def forward(self):
        return tuple(c.clone() for c in self.pair.shared_caches())


def _memory() -> str:
    """Resident memory now and at peak, for the progress lines of long lowerings."""
    import resource

    now = 0
    try:
        now = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) * 1024
    except (OSError, StopIteration):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return f"resident {now / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB"


MATMUL_OPS = ("aten.mm", "aten.bmm", "aten.addmm", "aten.linear", "aten.matmul", "aten.convolution")


def delegated_share(edge_program) -> dict:
    """Operators of a lowered method inside XNNPACK delegates vs left to portable kernels,
    the matmul-like operators (linears, attention products) left outside, by name, and the
    count of each operator left outside."""
    gm = edge_program.graph_module
    inside = outside = 0
    matmuls_outside = []
    by_name: dict[str, int] = {}
    for node in edge_program.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "executorch_call_delegate" in name:
            lowered = getattr(gm, node.args[0].target)
            inside += sum(n.op == "call_function" for n in lowered.original_module.graph.nodes)
        elif "getitem" in name:
            continue
        else:
            outside += 1
            by_name[name] = by_name.get(name, 0) + 1
            if any(op in name for op in MATMUL_OPS):
                matmuls_outside.append(name)
    total = max(inside + outside, 1)
    return {
        "ops_delegated": inside,
        "ops_outside": outside,
        "delegated_share": round(inside / total, 4),
        "matmuls_outside": matmuls_outside,
        "outside_by_operator": dict(sorted(by_name.items())),
    }


def _tensor_info(name: str, val) -> dict:
    shape = [d if isinstance(d, int) else "tokens" for d in val.shape]
    return {"name": name, "dtype": str(val.dtype).replace("torch.", ""), "shape": shape}


def method_io(program) -> dict:
    """Input and output names, dtypes and shapes of one exported method (for the manifest)."""
    sig = program.graph_signature
    nodes = {n.name: n for n in program.graph.nodes}
    inputs = [_tensor_info(name, nodes[name].meta["val"]) for name in sig.user_inputs]
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    vals = [a.meta["val"] for a in out_node.args[0]][-len(sig.user_outputs) :] if sig.user_outputs else []
    return {"inputs": inputs, "outputs": [_tensor_info(f"output_{i}", v) for i, v in enumerate(vals)]}


def _partitioner(backend: str):
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return XnnpackPartitioner()
    if backend == "coreml":
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        specs = CoreMLBackend.generate_compile_specs(
            minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16
        )
        return CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=False)
    raise ValueError(f"unknown ExecuTorch backend {backend!r}; known: xnnpack, coreml")


def export_executorch(
    target,
    drafter,
    path: Path,
    max_context: int,
    max_draft: int,
    quantization: dict | None = None,
    backend: str = "xnnpack",
    methods: tuple[str, ...] | None = None,
    max_chunk: int = MAX_CHUNK,
) -> dict:
    """max_chunk: tokens per target call at most (`MAX_CHUNK`). methods: the compute methods
    to export (default all: `forward`, `target_step`, `draft_step`,
    `draft_k1..draft_k{max_draft}`; `reset_caches`, `shared_kv` and the metadata always).
    The runtimes need `target_step`; without `draft_k{k}` they chain `draft_step` calls.
    Tests that check a shape lower fewer methods: lowering takes minutes per method."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    spec = TargetSpec.from_hf(target.config)
    layout = CacheLayout(spec.attention, max_context, max_draft)
    known = ["forward", "target_step"]
    if drafter is not None:
        known += ["draft_step"] + [f"draft_k{k}" for k in range(1, max_draft + 1)]
    methods = known if methods is None else list(methods)
    unknown = sorted(set(methods) - set(known))
    if unknown or "target_step" not in methods:
        raise ValueError(f"methods {methods}: target_step is required; known: {', '.join(known)}")
    pair = EtPair(target, drafter, layout).eval()
    quant_report = None
    if quantization:
        from export.quantize import quantize_for_executorch

        t0 = time.time()
        quant_report = quantize_for_executorch([pair], **quantization)
        print(
            f"[executorch] quantized linears {quant_report['linear']}: {quant_report['linears_int4']} int4, "
            f"{quant_report['linears_int8']} int8 (keep_8bit); {quant_report['embeddings']} tables "
            f"{quant_report['embedding']} ({time.time() - t0:.1f}s)",
            flush=True,
        )
    chunk = min(max_chunk, max_context)
    if chunk < max_draft + 1:
        raise ValueError(f"max_chunk {max_chunk} must hold a verify pass of max_draft + 1 = {max_draft + 1} tokens")
    tokens = torch.export.Dim("tokens", min=1, max=chunk)
    rows = torch.export.Dim("logit_rows", min=1, max=max_draft + 1)
    ids = torch.full((1, 3), spec.bos_token_id, dtype=torch.long)
    pos = torch.tensor([0])
    state = torch.zeros(1, 1, spec.hidden_size)
    programs = {}
    with torch.no_grad():
        for name in methods:
            t0 = time.time()
            if name == "forward":
                programs[name] = torch.export.export(_Forward(pair), (ids, pos), dynamic_shapes=({1: tokens}, None))
            elif name == "target_step":
                programs[name] = torch.export.export(
                    _TargetStep(pair), (ids, pos, torch.arange(1, 3)), dynamic_shapes=({1: tokens}, None, {0: rows})
                )
            else:
                method = _DraftStep(pair) if name == "draft_step" else _DraftRound(pair, int(name[len("draft_k") :]))
                programs[name] = torch.export.export(method, (ids[:, :1], state, pos))
            print(f"[executorch] exported {name} ({time.time() - t0:.1f}s; {_memory()})", flush=True)
        programs["reset_caches"] = torch.export.export(_ResetCaches(pair), ())
        programs["shared_kv"] = torch.export.export(_SharedKV(pair), ())
    eos = list(eos_ids(target.generation_config.eos_token_id))
    metadata = {
        "get_max_seq_len": chunk,
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
    io = {name: method_io(p) for name, p in programs.items()}
    t0 = time.time()
    with _constants_on_disk(Path(path).parent), _preprocess_shares_constants(backend):
        edge = to_edge_transform_and_lower(
            programs,
            partitioner=[_partitioner(backend)],
            constant_methods=metadata,
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        print(f"[executorch] lowered to {backend} ({time.time() - t0:.1f}s; {_memory()})", flush=True)
        shares = {}
        for name in programs:
            share = shares[name] = delegated_share(edge.exported_program(name))
            print(
                f"      {name}: {100 * share['delegated_share']:.1f}% of ops in {backend} "
                f"({share['ops_delegated']} in, {share['ops_outside']} on portable kernels; "
                f"matmuls outside: {len(share['matmuls_outside'])})",
                flush=True,
            )
        names = list(programs)
        del programs  # the lowered programs hold what is still needed
        prog = edge.to_executorch(
            ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True))
        )
        del edge
        with open(path, "wb") as f:  # streamed from the serialized pieces: no whole-file copy in memory
            prog.write_to_file(f)
    print(f"[executorch] wrote {path} ({Path(path).stat().st_size / 1e6:.1f} MB; {_memory()})", flush=True)
    return {
        "methods": sorted(names),
        "metadata": metadata,
        "delegation": shares,
        "io": io,
        "quantization": quant_report,
    }


SPILL_MIN_BYTES = 1 << 20  # constants at least this large wait on disk for serialization


@contextlib.contextmanager
def _constants_on_disk(directory: Path):
    """While lowering and serializing: every delegate constant of at least SPILL_MIN_BYTES
    goes to a file (one per distinct content) and the program's data store holds ExecuTorch's
    own on-disk buffer for it (`FileBackedData`), streamed into the .pte at the end.

    Why: XNNPACK's lowering hands each constant to the program's named data store as a
    bytes copy, per method, kept until serialization merges equal ones. `forward` and
    `target_step` both hold every target linear, so E4B's 4.7B linear weights were held
    twice on top of the model (measured: ~0.5 bytes per parameter per method of the ~1.7 that
    lowering added; after this the lowered methods retain about nothing beyond the model's
    own quantized weights). Patches the store's `add_named_data` for the duration only
    (executorch is pinned); the files live in a temporary folder beside the .pte."""
    from executorch.exir._serialize._cord import FileBackedData
    from executorch.exir._serialize._named_data_store import NamedDataStore

    original = NamedDataStore.add_named_data
    with tempfile.TemporaryDirectory(prefix=".pte-constants-", dir=directory) as tmp:
        spilled: dict[bytes, FileBackedData] = {}

        def add_named_data(self, key, data, alignment=1, external_tag=None, tensor_layout=None):
            if isinstance(data, bytes) and len(data) >= SPILL_MIN_BYTES:
                digest = hashlib.sha256(data).digest()
                if digest not in spilled:
                    file = Path(tmp) / f"{len(spilled)}.bin"
                    file.write_bytes(data)
                    spilled[digest] = FileBackedData(str(file), sha256=digest)
                data = spilled[digest]
            return original(self, key, data, alignment, external_tag, tensor_layout)

        NamedDataStore.add_named_data = add_named_data
        try:
            yield
        finally:
            NamedDataStore.add_named_data = original


@contextlib.contextmanager
def _preprocess_shares_constants(backend: str):
    """While lowering to XNNPACK: the copy of each partition that the backend preprocesses
    shares the partition's constant tensors instead of deep-copying them.

    Why: ExecuTorch deep-copies every partition of every method before preprocessing any
    (`copy_exported_program_for_preprocess`, so that a backend may rewrite its graph); with
    the two full-depth methods that is two copies of every packed target weight at once
    (~1.1 bytes per parameter each: 10 GiB at E4B's size, where the 42-layer lowering passed
    20 GiB). XNNPACK's preprocessing reads the constants and serializes converted copies; it
    does not write into them (the ExecuTorch parity tests would see it: methods share
    weights). Measured with 8 linears of 2560 x 10240 in two methods: +0.43 GiB of copies ->
    none. The graph and its containers are still copied; only tensors are shared."""
    if backend != "xnnpack":
        yield
        return
    import copy

    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    def copy_sharing_constants(cls, edge_program, compile_specs):
        tensors = [*edge_program.state_dict.values(), *edge_program.constants.values()]
        return copy.deepcopy(edge_program, {id(t): t for t in tensors})

    had_own = "copy_exported_program_for_preprocess" in XnnpackBackend.__dict__
    original = XnnpackBackend.__dict__.get("copy_exported_program_for_preprocess")
    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(copy_sharing_constants)
    try:
        yield
    finally:
        if had_own:
            XnnpackBackend.copy_exported_program_for_preprocess = original
        else:
            del XnnpackBackend.copy_exported_program_for_preprocess


def write_executorch(
    target,
    drafter,
    out_dir: Path,
    max_context: int,
    max_draft: int,
    quantization: dict | None = None,
    methods: tuple[str, ...] | None = None,
    max_chunk: int = MAX_CHUNK,
) -> dict:
    """pair.pte, layout.json (the cache layout, as for ONNX) and executorch_report.json
    (methods, metadata, delegated share per method) into out_dir."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = export_executorch(
        target, drafter, out_dir / "pair.pte", max_context, max_draft, quantization, methods=methods,
        max_chunk=max_chunk,
    )
    spec = TargetSpec.from_hf(target.config)
    layout = CacheLayout(spec.attention, max_context, max_draft)
    (out_dir / LAYOUT_FILE).write_text(json.dumps(layout_dict(target, drafter, layout), indent=1) + "\n")
    (out_dir / "executorch_report.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


def write_coreml(out_dir: Path, checkpoint: Path, assistant: Path, max_context: int, max_draft: int) -> dict:
    """`pair_coreml.pte`: the same methods delegated to Core ML (fp16, iOS 18), where that
    lowering works on this machine. It is built, not run: Core ML executes only on Apple
    hardware, so its numbers cannot be checked here."""
    from export.checkpoint import load_pair

    target, drafter = load_pair(checkpoint, assistant)
    info = export_executorch(target, drafter, Path(out_dir) / "pair_coreml.pte", max_context, max_draft, backend="coreml")
    return {"built": True, "file": "pair_coreml.pte", "delegation": info["delegation"], "checked_here": False}
