"""`make bench-peers`: our exports against the peers that export Gemma 4 from the same weights,
measured side by side in one run.

Peers (benchmark dependencies only: `requirements-peers.lock`, installed by the make target;
nothing under export/ or runtime/ imports them outside this file):
- ExecuTorch's own gemma4 example (`executorch.examples.models.gemma4`, in the executorch
  wheel): its text decoder built from the checkpoint, exported with dynamic sequence length
  and lowered to XNNPACK with the example's own partitioners and passes (custom SDPA op, fp32:
  `text_quantize="none"`); driven as its runner does, with input_ids, input_pos and zero
  inputs_embeds (one call for the whole prompt, then one per token);
- mobius-onnx 0.1.0 (Microsoft's onnxscript model builder): `gemma4_text` built for the CPU
  execution provider (GroupQueryAttention, fused norms), fp32, run in onnxruntime with its
  growing past_key_values and attention_mask.
Two adaptations make each peer read a transformers 5.23 checkpoint, done here and nowhere else:
- ExecuTorch example: its config reader ignores `per_layer_config` and the nested
  `rope_parameters` (it would give full-attention layers head_dim 512 and default RoPE), so
  global head_dim, RoPE thetas and the partial rotary factor are set from the checkpoint; its
  weight map expects `Gemma4ForConditionalGeneration` names (`model.language_model.*`), so a
  `Gemma4ForCausalLM` checkpoint's `model.*` names are renamed into a temporary file;
- mobius: `allow_global_per_layer_attribute_access` on the transformers config (per-layer
  `head_dim`), and the full-attention layers' head_dim from `per_layer_config` copied into its
  `global_head_dim` (None otherwise).

Measured, for a short prompt and a long one (past the sliding window), all backends
interleaved within each repeat, each timed right after an untimed run of its own: prefill (the whole prompt to the first token's logits) and
the mean decode step of a greedy run (`--new-tokens`), each backend's tokens compared with
transformers' greedy tokens; ratios ours / peer per repeat, medians over repeats. Beside
them, `onnx-unbound`: our onnxruntime backend with `io_binding=False` (the ratio
onnx / onnx-unbound is what binding the caches gains). A table on
stdout, `bench_peers.json` and `bench_peers.png` under `--out`. Exit status 1 when one of
*our* backends' tokens differ from transformers (a peer's mismatch is reported, not fatal).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runtime.loop import greedy_generate

REPO = Path(__file__).resolve().parent.parent
PEER_CACHE = Path(os.environ.get("GEMMA4_EXPORT_CACHE", REPO / ".cache" / "exports"))
# our backends (their tokens must equal transformers'); onnx-unbound: our onnxruntime backend
# without I/O binding (caches fed and returned as fresh arrays each call), the same export
# measured beside the bound default to show what the binding gains
OURS = ("onnx", "executorch", "onnx-unbound")
# ours / peer ratios reported, each of our backends against its own family's peer first
PAUSE_S = 0.5  # between backends in the interleaved runs (see `run`): past OpenMP's 200 ms spin (KMP_BLOCKTIME)
PAIRS = [("executorch", "executorch-example"), ("onnx", "mobius"), ("onnx", "executorch-example"),
         ("executorch", "mobius"), ("onnx", "onnx-unbound")]


# ----------------------------------------------------------------------------- peers: builds


def _full_head_dim(cfg: dict) -> int:
    """head_dim of the full-attention layers: `per_layer_config` (transformers 5.23), else
    `global_head_dim`, else the shared head_dim."""
    full = [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]
    per_layer = cfg.get("per_layer_config") or {}
    for i in full:
        entry = per_layer.get(f"{i:02d}") or per_layer.get(str(i)) or {}
        if "head_dim" in entry:
            return int(entry["head_dim"])
    return int(cfg.get("global_head_dim") or cfg["head_dim"])


def _text_config(checkpoint: Path) -> dict:
    cfg = json.loads((checkpoint / "config.json").read_text())
    return cfg.get("text_config", cfg)


def _peer_dir(kind: str, checkpoint: Path, **settings) -> Path:
    """A cache folder keyed by the checkpoint files, the settings, the build code and the
    peers' versions (a peer build takes minutes: ExecuTorch lowering)."""
    import inspect
    from importlib.metadata import version

    from export.cache import _fingerprint

    blob = json.dumps(
        {
            "kind": kind,
            "checkpoint": [str(checkpoint.resolve()), _fingerprint(checkpoint)],
            "settings": settings,
            "source": hashlib.sha256("".join(inspect.getsource(f) for f in _BUILD_CODE()).encode()).hexdigest(),
            "versions": {n: version(n) for n in ("torch", "executorch", "onnxruntime", "mobius-onnx")},
        },
        sort_keys=True,
    )
    return PEER_CACHE / f"peer-{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _atomic_build(final: Path, marker: str, build) -> Path:
    from export.cache import build_atomically

    return final if (final / marker).is_file() else build_atomically(final, build)


def executorch_example_config(checkpoint: Path, max_seq_len: int):
    """The example's Gemma4Config for this checkpoint (adaptation 1: head_dim and RoPE)."""
    from executorch.examples.models.gemma4.text_decoder.gemma4_config import Gemma4Config

    text = _text_config(checkpoint)
    config = Gemma4Config.from_json(str(checkpoint / "config.json"))
    rope = text.get("rope_parameters") or {}
    full, sliding = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    config.global_head_dim = _full_head_dim(text)
    config.rope_theta = float(full.get("rope_theta", config.rope_theta))
    config.rope_local_base_freq = float(sliding.get("rope_theta", config.rope_local_base_freq))
    config.partial_rotary_factor = float(full.get("partial_rotary_factor", 1.0))
    config.use_kv_cache = True
    config.max_seq_len = config.max_context_len = max_seq_len
    config.enable_dynamic_shape = True
    config.use_custom_sdpa = True
    return config


def _weights_as_conditional_generation(checkpoint: Path, out: Path) -> None:
    """The example's weight map reads `model.language_model.*` names: a CausalLM checkpoint's
    `model.*` tensors renamed into one safetensors file (tensors stay in their stored dtype)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name.startswith("model.") and not name.startswith("model.language_model."):
                    new = "model.language_model." + name[len("model.") :]
                else:
                    new = name
                tensors[new] = st.get_tensor(name)
    save_file(tensors, str(out / "model.safetensors"))


def build_executorch_example(checkpoint: Path, max_seq_len: int) -> Path:
    """text_decoder.pte of ExecuTorch's gemma4 example (fp32, XNNPACK, custom SDPA)."""

    def build(tmp: Path):
        import logging

        from executorch.examples.models.gemma4.export_gemma4 import _build_partitioners, _build_transform_passes
        from executorch.examples.models.gemma4.text_decoder.gemma4_model import Gemma4Model
        from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
        from executorch.exir.capture._config import ExecutorchBackendConfig
        from executorch.exir.passes import MemoryPlanningPass
        from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers the SDPA op)

        logging.getLogger("executorch").setLevel(logging.ERROR)
        print(f"[peers] ExecuTorch example: exporting {checkpoint} (fp32, XNNPACK; minutes)", flush=True)
        config = executorch_example_config(checkpoint, max_seq_len)
        weights = tmp / "weights"
        weights.mkdir()
        _weights_as_conditional_generation(checkpoint, weights)
        wrapper = Gemma4Model(config=config, checkpoint_path=str(weights), dtype=torch.float32)
        model = wrapper.get_eager_model().eval()
        ids, pos, embeds = wrapper.get_example_inputs_with_audio(seq_len=min(770, max_seq_len - 2))
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]), torch.no_grad():
            program = torch.export.export(
                model,
                (ids,),
                kwargs={"input_pos": pos, "inputs_embeds": embeds},
                dynamic_shapes=wrapper.get_dynamic_shapes(with_audio_embeds=True),
            )
        del model, wrapper
        edge = to_edge_transform_and_lower(
            {"text_decoder": program.run_decompositions({})},
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
            partitioner=_build_partitioners(False, False, "none", "none", "none"),
            transform_passes=_build_transform_passes(False, False),
        )
        et = edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
            )
        )
        (tmp / "text_decoder.pte").write_bytes(et.buffer)
        shutil.rmtree(weights)

    return _atomic_build(_peer_dir("executorch-example", checkpoint, max_seq_len=max_seq_len), "text_decoder.pte", build)


def build_mobius(checkpoint: Path) -> Path:
    """model.onnx (+ .data) of mobius-onnx for the CPU execution provider, fp32."""

    def build(tmp: Path):
        import onnx_ir as ir
        import transformers
        from mobius._builder import build_from_module
        from mobius._config_resolver import _config_from_hf, _default_task_for_model
        from mobius._registry import registry
        from safetensors.torch import load_file

        print(f"[peers] mobius: building {checkpoint} (fp32, CPU execution provider)", flush=True)
        hf = transformers.AutoConfig.from_pretrained(checkpoint)
        text = getattr(hf, "text_config", None) or hf
        text.allow_global_per_layer_attribute_access = True  # adaptation 2a: per-layer head_dim
        module_class = registry.get(text.model_type)
        config = _config_from_hf(text, parent_config=hf, module_class=module_class)
        config = dataclasses.replace(
            config, global_head_dim=_full_head_dim(_text_config(checkpoint)), dtype=ir.DataType.FLOAT
        )  # adaptation 2b: global_head_dim from per_layer_config
        module = module_class(config)
        package = build_from_module(module, config, _default_task_for_model(text.model_type), execution_provider="cpu")
        state = {}
        for f in sorted(checkpoint.glob("*.safetensors")):
            state.update(load_file(str(f)))
        if hasattr(module, "preprocess_weights"):
            state = module.preprocess_weights(state)
        package.apply_weights(state, prefix_map=getattr(module, "weight_prefix_map", None))
        package.save(str(tmp), progress_bar=False)

    return _atomic_build(_peer_dir("mobius", checkpoint), "model.onnx", build)


def _BUILD_CODE():
    return (_full_head_dim, _text_config, executorch_example_config, _weights_as_conditional_generation,
            build_executorch_example, build_mobius)


# --------------------------------------------------------------------------- peers: runtimes


class ExecuTorchExamplePeer:
    """The example's text_decoder method as a target-only StepBackend (greedy loop)."""

    name = "executorch-example"
    eos_token_ids: tuple[int, ...] = ()
    max_draft = None

    def __init__(self, pte: Path, hidden: int, vocab: int):
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the SDPA kernel it calls)
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(str(pte)).load_method("text_decoder")
        self.hidden, self.vocab_size = hidden, vocab

    def reset(self) -> None:
        """Nothing to clear: its caches are written at input_pos and read under a causal mask
        from input_pos, so entries of an earlier run past the current position are unseen."""

    def target(self, ids: list[int], start: int):
        n = len(ids)
        out = self.method.execute(
            [torch.tensor([ids], dtype=torch.long), torch.arange(start, start + n), torch.zeros(1, n, self.hidden)]
        )[0]
        return out.numpy().reshape(-1, out.shape[-1])[-1:], None


class MobiusPeer:
    """mobius's model.onnx as a target-only StepBackend: past_key_values grow by each call."""

    name = "mobius"
    eos_token_ids: tuple[int, ...] = ()
    max_draft = None

    def __init__(self, directory: Path, vocab: int, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(directory / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.vocab_size = vocab
        self.reset()

    def reset(self) -> None:
        self.cache = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past}
        self.length = 0

    def target(self, ids: list[int], start: int):
        if start != self.length:
            raise ValueError(f"mobius peer: call at {start} after {self.length} cached positions (no rollback)")
        n = len(ids)
        feeds = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, start + n), np.int64),
            **self.cache,
        }
        values = dict(zip(self.outputs, self.session.run(None, feeds)))
        for name in self.cache:
            self.cache[name] = values[name.replace("past_key_values.", "present.")]
        self.length = start + n
        return values["logits"][0, -1:], None


# ----------------------------------------------------------------------------------- bench


def bench_prompts(checkpoint: Path, lengths: list[int]) -> dict[int, list[int]]:
    """Prompts of the given token lengths: the held-out prompt files' tokens, repeated as
    needed, behind BOS."""
    from calibration.quality import HELDOUT
    from runtime.generate import load_tokenizer

    tok = load_tokenizer(checkpoint)
    stream = [t for p in HELDOUT for t in tok.encode(p.read_text()).ids if t != 2]
    while len(stream) < max(lengths):
        stream = stream + stream
    return {n: [2] + stream[: n - 1] for n in lengths}


def run(backends: dict, prompts: dict[int, list[int]], reference: dict[int, list[int]], new_tokens: int, repeats: int):
    """All backends interleaved within each repeat and prompt; per (prompt, backend) the
    prefill and mean decode ms of every repeat and whether the tokens equal the reference
    (in every run). A first, untimed round warms each backend up (a first call of a new
    shape plans memory and packs weights: 5x a steady prefill), and in every repeat each
    backend's timed run follows an untimed run of its own over the same prompt (a warm
    turn): what it is measured after is then itself, not whichever backend ran before it."""
    raw = {n: {b: {"prefill_ms": [], "decode_ms": [], "tokens_equal": True} for b in backends} for n in prompts}
    names = list(backends)
    m = len(names)
    steps = [s for s in range(1, m) if math.gcd(s, m) == 1] or [1]
    for r in range(-1, repeats):
        # repeat r runs the backends in strides of steps[r]: the backend before each one
        # changes from repeat to repeat (with 5 backends each other one precedes it once in
        # 4 repeats), so no backend is always measured right after the same one (measured
        # here: an onnxruntime prefill right after ExecuTorch's example's run took 2x its
        # time in most such places, also after a 2 s pause; not explained; the warm turn
        # below removes it from what is timed)
        s = steps[r % len(steps)]
        order = [names[(r + i * s) % m] for i in range(m)]
        for n, ids in prompts.items():
            for name in order:
                backend = backends[name]
                # a pause first: the previous backend's thread pool (onnxruntime's workers spin
                # after a run) must not share the two cores with this one's prefill
                time.sleep(PAUSE_S)
                if r >= 0:  # the warm turn, untimed
                    greedy_generate(backend, ids, new_tokens)
                tokens, _, timer = greedy_generate(backend, ids, new_tokens)
                entry = raw[n][name]
                entry["tokens_equal"] &= tokens == reference[n]
                if r < 0:
                    continue
                ms = timer.mean_ms()
                entry["prefill_ms"].append(ms["prefill"])
                entry["decode_ms"].append(ms["decode"])
        print(f"  {'warm-up round' if r < 0 else f'repeat {r + 1}/{repeats}'} done", flush=True)
    return raw


def summarize(raw: dict) -> dict:
    """Medians per backend; ours / peer ratios per repeat, medians over repeats."""
    out = {}
    for n, by_backend in raw.items():
        rows = {}
        for name, e in by_backend.items():
            rows[name] = {
                "prefill_ms": round(statistics.median(e["prefill_ms"]), 3),
                "decode_ms": round(statistics.median(e["decode_ms"]), 4),
                "tokens_equal_transformers": bool(e["tokens_equal"]),
                "runs": {kind: [round(x, 4) for x in e[kind]] for kind in ("prefill_ms", "decode_ms")},
            }
        ratios = {}
        for ours, peer in PAIRS:
            if ours in by_backend and peer in by_backend:
                a, b = by_backend[ours], by_backend[peer]
                ratios[f"{ours}/{peer}"] = {
                    kind: round(statistics.median(x / y for x, y in zip(a[kind], b[kind])), 3)
                    for kind in ("prefill_ms", "decode_ms")
                }
        out[str(n)] = {"backends": rows, "ratios": ratios}
    return out


def print_table(summary: dict, new_tokens: int) -> None:
    for n, entry in summary.items():
        print(f"\nprompt {n} tokens, then {new_tokens} greedy tokens")
        print(f"  {'backend':<20}{'prefill ms':>12}{'decode ms':>12}  tokens == transformers")
        for name, r in entry["backends"].items():
            print(f"  {name:<20}{r['prefill_ms']:>12.2f}{r['decode_ms']:>12.3f}  {r['tokens_equal_transformers']}")
        print(f"  {'ours / peer':<20}{'prefill':>12}{'decode':>12}")
        for pair, r in entry["ratios"].items():
            print(f"  {pair:<30}{r['prefill_ms']:>6.2f}x{r['decode_ms']:>11.2f}x")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(summary)
    names = list(summary[lengths[0]]["backends"])
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(3.6 * (len(lengths) + 1), 3.6))
    for ax, n in zip(axes, lengths):
        ax.bar(names, [summary[n]["backends"][b]["prefill_ms"] for b in names], color="C0")
        ax.set(title=f"prefill, {n}-token prompt", ylabel="ms")
    axes[-1].bar(names, [summary[lengths[-1]]["backends"][b]["decode_ms"] for b in names], color="C1")
    axes[-1].set(title=f"decode step after {lengths[-1]} tokens", ylabel="ms")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    from runtime.generate import add_pair_arguments

    ap = argparse.ArgumentParser(prog="python -m runtime.bench_peers", description=__doc__.split("\n")[0])
    add_pair_arguments(ap)
    ap.add_argument("--short", type=int, default=80, help="short prompt length in tokens")
    ap.add_argument("--long", type=int, default=600, help="long prompt length (past the sliding window)")
    ap.add_argument("--new-tokens", type=int, default=32)
    # 15: medians of 5 were not stable here (two 5-repeat runs of the same graphs: ONNX / mobius
    # decode at 80 tokens 0.75x and 1.23x)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--max-seq-len", type=int, default=1024, help="the ExecuTorch example's cache length")
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench-peers"))
    args = ap.parse_args(argv)
    args.backend = "all"
    if args.long + args.new_tokens >= args.max_seq_len:
        print(f"error: --long {args.long} + --new-tokens {args.new_tokens} must stay below --max-seq-len", file=sys.stderr)
        return 2
    try:
        import executorch.examples.models.gemma4  # noqa: F401
        import mobius  # noqa: F401
    except ImportError as e:
        print(f"error: a peer is not installed ({e}); `make bench-peers` installs requirements-peers.lock", file=sys.stderr)
        return 2

    from runtime.parity import open_backends
    from runtime.reference import ReferencePair
    from export.checkpoint import load_pair

    text = _text_config(args.checkpoint)
    try:
        prompts = bench_prompts(args.checkpoint, [args.short, args.long])
        target, drafter = load_pair(args.checkpoint, args.assistant)
        ours = {name: b for name, (_, b, _) in open_backends(args).items()}
        peers = {
            "executorch-example": ExecuTorchExamplePeer(
                build_executorch_example(args.checkpoint, args.max_seq_len) / "text_decoder.pte",
                text["hidden_size"],
                text["vocab_size"],
            ),
            "mobius": MobiusPeer(build_mobius(args.checkpoint), text["vocab_size"]),
        }
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pair = ReferencePair(target, drafter)
    reference = {n: pair.generate(ids, args.new_tokens, 0, stop_at_eos=False)[0] for n, ids in prompts.items()}
    del target, drafter, pair
    from runtime.onnx_backend import OnnxBackend

    backends = {"executorch": ours["executorch"], "executorch-example": peers["executorch-example"],
                "onnx": ours["onnx"], "mobius": peers["mobius"],
                "onnx-unbound": OnnxBackend(ours["onnx"].dir, io_binding=False)}
    print(f"bench-peers: {args.checkpoint}, prompts {args.short} and {args.long} tokens, {args.repeats} repeats", flush=True)
    raw = run(backends, prompts, reference, args.new_tokens, args.repeats)
    summary = summarize(raw)
    print_table(summary, args.new_tokens)

    from runtime.results import command_line

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "subject": f"{args.checkpoint}: prompts {args.short}/{args.long} tokens + {args.new_tokens} greedy, fp32, CPU",
        "command": command_line("runtime.bench_peers", argv),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "by_prompt_tokens": summary,
    }
    (args.out / "bench_peers.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(summary, args.out / "bench_peers.png")
    print(f"wrote {args.out / 'bench_peers.json'} and {args.out / 'bench_peers.png'}")
    bad = [f"{name} ({n} tokens)" for n, e in summary.items() for name, r in e["backends"].items()
           if name in OURS and not r["tokens_equal_transformers"]]
    if bad:
        print(f"FAIL: our tokens differ from transformers greedy: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
