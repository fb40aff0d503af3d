"""`make export TARGET=<t>`: the app-ready artifacts of one deployment target.

Steps, one function each (`build_target` runs them; progress printed as [i/n]):
1. `plan`: the target file (targets/<t>.toml), the pair (strict safetensors mapping, pair
   check; loaded once for the whole export) and the prompts -> `Plan`;
2. `reference_check`: transformers' speculative output equals its greedy output on a
   held-out prompt past two sliding windows;
3. `build_executorch` (if the target has [executorch]): `executorch/pair.pte` (target and
   drafter methods sharing caches and the embedding table, runner metadata), the target
   quantized per the target file as it is read (bounded memory); the size reduction is
   measured against the pair's fp32 weight bytes (computed, no fp32 twin) -> `FormatBuild`;
4. `build_onnx` (if [onnx]): `onnx/{embed,target,drafter,drafter_k*}.onnx` + external data,
   each weight read from the checkpoint, quantized per the target (4-bit MatMulNBits, int8 or
   int4 tables) and written in turn (bounded memory) -> `FormatBuild`;
5. `calibrate`: acceptance per draft position and step costs, the predicted best draft
   length (or the target's fixed one);
6. `assess`: quality report per format against the fp32 reference (calibration/quality.py)
   and the target's gates (accepted length at the deployed draft length): a miss fails the
   export, naming the gate and the margin;
7. `write_manifest`: files with sha256 and size, model and drafter summary, methods and
   I/O, cache layout, the gates, draft length, EOS ids, quality, calibration, toolchain.

Everything is written into a temporary sibling folder and renamed to `<OUT>/<t>` only when
complete, so a failed or killed export leaves no `<OUT>/<t>` (and an earlier complete
one untouched). The bytes depend only on the inputs; step timings, the one measurement that
varies between runs, can be pinned with `--step-costs FILE` (JSON with decode_ms,
verify2_ms.., draft_ms, e.g. the `draft_calibration.step_costs_ms` of an earlier manifest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT_VERSION = 4  # 2: target graphs take logit_index and return those rows' logits only;
# 3: cache_layout per format (the .pte's sliding caches are rings, the ONNX graphs' linear);
# 4: the ONNX graphs' sliding caches are window caches (sliding_block, max_call_tokens)
QUALITY_NEW_TOKENS = 128
CALIBRATION_NEW_TOKENS = 128


class ExportError(ValueError):
    """An export that cannot complete; the message says why and what to do."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = {"sha256": sha256(p), "bytes": p.stat().st_size}
    return out


def _checkpoint_digest(directory: Path) -> dict:
    """Content hashes of the checkpoint's config and weights (not paths: the same inputs
    elsewhere give the same manifest)."""
    return {
        p.name: sha256(p)
        for p in sorted(Path(directory).iterdir())
        if p.is_file() and p.suffix in (".json", ".safetensors")
    }


def _versions() -> dict:
    from importlib.metadata import version

    return {
        name: version(name)
        for name in ("torch", "transformers", "executorch", "torchao", "onnx", "onnxruntime", "coremltools")
    }


def _onnx_io(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def info(v):
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}

    return {"inputs": [info(v) for v in m.graph.input], "outputs": [info(v) for v in m.graph.output]}


def _summary(target, drafter) -> dict:
    from export.config import TargetSpec

    spec = TargetSpec.from_hf(target.config)
    a = spec.attention
    tc = drafter.config.get_text_config()
    return {
        "target": {
            "architecture": type(target).__name__,
            "parameters": sum(p.numel() for p in target.parameters()),
            "layers": a.num_layers,
            "hidden_size": spec.hidden_size,
            "vocab_size": spec.vocab_size,
            "ple_dim": spec.ple_dim,
            "sliding_window": a.sliding_window,
            "layer_types": list(a.layer_types),
            "num_kv_shared_layers": a.num_kv_shared_layers,
            "head_dim": {"sliding_attention": a.head_dim, "full_attention": a.global_head_dim},
        },
        "drafter": {
            "architecture": type(drafter).__name__,
            "parameters": sum(p.numel() for p in drafter.parameters()),
            "layers": len(tc.layer_types),
            "hidden_size": tc.hidden_size,
            "use_ordered_embeddings": bool(drafter.config.use_ordered_embeddings),
        },
    }


@dataclass
class Plan:
    """Step 1: what an export works from (one loaded pair, used by every step)."""

    name: str
    cfg: object  # export.targets.DeploymentTarget
    checkpoint: Path
    assistant: Path
    target: object
    drafter: object
    heldout: list  # token ids of the held-out prompts (quality, reference check)
    calib: list  # token ids of the calibration prompts (draft length)
    started: float = dataclasses.field(default_factory=time.time)

    def stage(self, i: int, text: str) -> None:
        print(f"[{i}/{STEPS}] {text} [{time.time() - self.started:.0f}s]", flush=True)

    @property
    def reference(self):
        from runtime.reference import ReferencePair

        return ReferencePair(self.target, self.drafter)


@dataclass
class FormatBuild:
    """Steps 3-4: one format's artifacts."""

    directory: Path
    methods: dict  # method or graph -> input/output names, dtypes, shapes
    quantization: dict  # manifest `quantization` entries of this format
    clients: dict = dataclasses.field(default_factory=dict)  # client layout -> files it reads


STEPS = 7


def build_target(
    name: str,
    checkpoint: Path,
    assistant: Path,
    out_root: Path,
    step_costs: dict | None = None,
    check_tokens: int = 64,
    targets_dir: Path | None = None,
) -> Path:
    p = plan(name, checkpoint, assistant, targets_dir)
    reference_check(p, check_tokens)
    with _staging(Path(out_root), name) as tmp:
        formats = {}
        if p.cfg.executorch is not None:
            formats["executorch"] = build_executorch(p, tmp / "executorch")
        else:
            p.stage(3, "ExecuTorch: not part of this target")
        if p.cfg.onnx is not None:
            formats["onnx"] = build_onnx(p, tmp / "onnx")
        else:
            p.stage(4, "ONNX: not part of this target")
        calibration = calibrate(p, formats, step_costs)
        quality = assess(p, formats, calibration["draft_tokens"], tmp)
        p.stage(7, f"manifest and atomic rename to {Path(out_root) / name}")
        write_manifest(p, formats, calibration, quality, tmp)
    print(f"wrote {Path(out_root) / name} [{time.time() - p.started:.0f}s]", flush=True)
    return Path(out_root) / name


def plan(name: str, checkpoint: Path, assistant: Path, targets_dir: Path | None) -> Plan:
    """Step 1: the target file, the pair (strict loading, pair check) and the prompts."""
    from calibration.quality import HELDOUT, calibration_prompts
    from export.checkpoint import load_pair
    from export.targets import load_target
    from runtime.generate import load_tokenizer

    cfg = load_target(name) if targets_dir is None else load_target(name, targets_dir)
    print(f"[1/{STEPS}] target {name!r}: {cfg.description}; reading {checkpoint} and {assistant}", flush=True)
    check_memory(checkpoint, assistant)
    target, drafter = load_pair(checkpoint, assistant)
    if drafter is None:
        raise ExportError("a deployment export needs the drafter: pass ASSISTANT=<dir>")
    tok = load_tokenizer(checkpoint)
    heldout = [tok.encode(path.read_text()).ids for path in HELDOUT]
    calib = calibration_prompts(tok) or heldout
    longest = max(len(ids) for ids in heldout + calib) + max(QUALITY_NEW_TOKENS, CALIBRATION_NEW_TOKENS) + 1
    if longest > cfg.max_context:
        raise ExportError(f"max_context {cfg.max_context} of {name!r} is below the check prompts ({longest})")
    return Plan(name, cfg, Path(checkpoint), Path(assistant), target, drafter, heldout, calib)


FP32_HOLDERS = 1  # the fp32 pair (reference check, quality); the ONNX graphs read weights one at a time


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where there is none: not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_memory(checkpoint: Path, assistant: Path) -> None:
    """Refuse, before anything is read, an export whose fp32 steps cannot fit this machine:
    the reference check and the quality assessment hold the pair in fp32."""
    from export.checkpoint import fp32_pair_bytes

    need = FP32_HOLDERS * fp32_pair_bytes(checkpoint, assistant)
    have = available_memory()
    if have and need > have:
        raise ExportError(
            f"this export holds the pair in fp32 for its reference check and quality gates: about "
            f"{need / 2**30:.2f} GiB, and this machine has {have / 2**30:.2f} GiB available. Export on a machine with "
            "more memory. The ExecuTorch program and the ONNX graphs alone are read and quantized in bounded memory: "
            "`make size-check` builds and measures them for E4B-sized models (the fp32 reference and quality steps "
            "have no bounded-memory path)"
        )


def reference_check(p: Plan, check_tokens: int) -> None:
    """Step 2: transformers' speculative output equals its greedy output (a broken pair
    fails here, before minutes of lowering)."""
    ids = p.heldout[0]
    p.stage(2, f"reference check: {len(ids)}-token held-out prompt, {check_tokens} new tokens")
    greedy, _ = p.reference.generate(ids, check_tokens, 0, stop_at_eos=False)
    spec, stats = p.reference.generate(ids, check_tokens, p.cfg.max_draft, stop_at_eos=False)
    if spec != greedy:
        raise ExportError("transformers' speculative output differs from its greedy output: the pair is broken")
    print(f"      speculative == greedy; mean accepted length {stats.mean_accepted_length:.2f}", flush=True)


@contextlib.contextmanager
def _staging(out_root: Path, name: str):
    """A temporary sibling folder, renamed to out_root/name only when the body completes;
    removed on any failure (and, when killed outright, by the next export of the target)."""
    out_root.mkdir(parents=True, exist_ok=True)
    for stale in out_root.glob(f".{name}.partial-*"):  # left by an export killed outright (SIGKILL)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_root / f".{name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, out_root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_executorch(p: Plan, d: Path) -> FormatBuild:
    """Step 3: the target's program, through the export cache (programs of the same inputs
    and settings are lowered once: lowering takes minutes)."""
    from export.cache import cached_executorch_export

    cfg, et = p.cfg, p.cfg.executorch
    q = et.recipe(p.target.config.hidden_size)
    p.stage(3, f"ExecuTorch: XNNPACK program, linear {et.linear}, embeddings {q['embedding'] if q else 'fp32'}")
    src = cached_executorch_export(p.checkpoint, p.assistant, cfg.max_context, cfg.max_draft, q)
    shutil.copytree(src, d)
    info = json.loads((d / "executorch_report.json").read_text())
    quant = {
        "executorch": info["quantization"] or {"linear": "fp32", "embedding": "fp32"},
        "executorch_delegation": info["delegation"],
    }
    if et.quantized:
        # against the pair's fp32 weights, computed (no fp32 twin program is lowered)
        size, fp32_size = (d / "pair.pte").stat().st_size, fp32_weight_bytes(p.target, p.drafter)
        quant["executorch_size_reduction"] = round(fp32_size / size, 3)
        quant["executorch_fp32_weight_bytes"] = fp32_size
        print(f"      pair.pte {size / 1e6:.2f} MB vs fp32 weights {fp32_size / 1e6:.2f} MB ({fp32_size / size:.2f}x smaller)")
    if et.coreml:
        quant["coreml"] = _try_coreml(d, p.checkpoint, p.assistant, cfg)
    return FormatBuild(d, info["io"], quant)


def build_onnx(p: Plan, d: Path) -> FormatBuild:
    """Step 4: the ONNX graphs, quantized per the target as each weight is written: the pair
    is read again lazily (its large tensors stay in the checkpoint until written, one at a
    time: bounded memory whatever the model's size)."""
    from export.checkpoint import load_pair
    from export.onnx_export import copy_tokenizer, export_onnx

    ox = p.cfg.onnx
    target, drafter = load_pair(p.checkpoint, p.assistant, lazy=True)
    r = ox.recipe(target.config.hidden_size)
    what = "fp32" if r is None else f"linear {r['linear']} ({r['method']}), tables {r['embedding']}"
    p.stage(4, f"ONNX: graphs, {what}; weights read one at a time from {p.checkpoint}")
    info = export_onnx(target, drafter, d, p.cfg.max_context, p.cfg.max_draft, r)
    copy_tokenizer(p.checkpoint, d)
    quant = {}
    if r is not None:
        from export.quantize import check_keep_8bit

        graphs = info["quantization"]["graphs"]
        check_keep_8bit(r["keep_8bit"], {k for c in graphs.values() for k in c.get("keep_8bit_matched", ())})
        quant["onnx"] = {
            "linear": "int4 MatMulNBits" if r["linear"] == "int4" else "fp32",
            "block_size": r["block_size"],
            "keep_8bit": r["keep_8bit"],
            "method": r["method"],
            "embedding": r["embedding"],
            "matmuls": {g: {k: v for k, v in c.items() if k != "keep_8bit_matched"} for g, c in graphs.items()},
        }
        print(f"      quantized: {quant['onnx']['matmuls']}", flush=True)
    clients = client_layouts(ox, target, d)
    return FormatBuild(d, {g.stem: _onnx_io(g) for g in sorted(d.glob("*.onnx"))}, quant, clients)


def client_layouts(ox, target, d: Path) -> dict:
    """The target's `[onnx] clients` layouts (ox: its OnnxSpec) over the finished graphs (export/client_layouts.py):
    client -> the files it reads, relative to the artifact folder."""
    from export import client_layouts as cl

    text_config = target.config.to_dict()
    generation = target.generation_config.to_dict() if target.generation_config is not None else None
    for client in ox.clients:
        if client == "onnxruntime-genai":
            cl.write_genai_layout(d, text_config)
        else:
            cl.write_transformers_js_layout(d, ox.linear, text_config, generation)
    out = {}
    for client in ox.clients:  # once all are written: a layout may rename data files
        out[client] = {"files": cl.client_files(d, client)}
        print(f"      {client}: {', '.join(out[client]['files'])}", flush=True)
    return out


def fp32_weight_bytes(*modules) -> int:
    """4 bytes per parameter and persistent buffer of the modules, tied tensors once: the
    reference the `.pte` size reduction is measured against."""
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + [b for _, b in m.named_buffers() if b is not None]:
            if id(t) not in seen and t.is_floating_point():
                seen.add(id(t))
                total += 4 * t.numel()
    return total


def _primary(formats: dict) -> str:
    return "executorch" if "executorch" in formats else "onnx"


def calibrate(p: Plan, formats: dict, step_costs: dict | None) -> dict:
    """Step 5: acceptance per draft position and step costs on the primary format, the
    predicted best draft length (or the target file's fixed one)."""
    from calibration.quality import calibrate_draft_length

    p.stage(5, f"draft-length calibration ({len(p.calib)} prompts)")
    primary = _primary(formats)
    backend = _open(primary, formats[primary].directory, p.cfg.prefill_chunk)
    calibration = calibrate_draft_length(backend, p.calib, CALIBRATION_NEW_TOKENS, p.cfg.max_draft, step_costs)
    calibration["format"] = primary
    if p.cfg.draft_tokens != "auto":
        calibration["draft_tokens"] = p.cfg.draft_tokens
        calibration["choice"] = "fixed by the target file"
    else:
        calibration["choice"] = "argmax of predicted tokens/s"
    print(
        f"      P(>= i accepted) {calibration['p_at_least_i_accepted']}; step costs {calibration['step_costs_ms']} "
        f"({calibration['step_costs_source']}); draft length {calibration['draft_tokens']} "
        f"(predicted {calibration['predicted_speedup']}x over greedy)",
        flush=True,
    )
    return calibration


def assess(p: Plan, formats: dict, draft_tokens: int, out: Path) -> dict:
    """Step 6: each format's quality report against the fp32 reference, written to
    quality.json; a missed gate raises GateError naming every miss."""
    from calibration.quality import GateError, check_gates, quality_report
    from runtime.eager_backend import EagerBackend

    p.stage(6, f"quality vs fp32 on {len(p.heldout)} held-out prompts ({QUALITY_NEW_TOKENS} new tokens each)")
    cfg = p.cfg
    fp32 = EagerBackend(p.target, p.drafter, cfg.max_context, cfg.max_draft)
    quality, misses = {}, []
    for fmt, build in formats.items():
        backend = _open(fmt, build.directory, cfg.prefill_chunk)
        report = quality_report(
            backend, fp32, p.reference, p.heldout, QUALITY_NEW_TOKENS, cfg.max_draft, extra_prompts=p.calib
        )
        quality[fmt] = report
        drop = report["accepted_length_by_draft_tokens"][draft_tokens]["relative_drop"]
        print(
            f"      {fmt}: top-1 {report['top1_agreement']:.4f}, KL {report['mean_kl']:.5f}, "
            f"accepted-length drop at {draft_tokens} drafts {100 * drop:.1f}%, "
            f"speculative == own greedy: {report['speculative_equals_own_greedy']}",
            flush=True,
        )
        misses += check_gates(report, cfg.gates, fmt, draft_tokens)
    if "executorch" in formats and cfg.gates.min_pte_size_reduction:
        ratio = formats["executorch"].quantization["executorch_size_reduction"]
        if ratio < cfg.gates.min_pte_size_reduction:
            misses.append(f"executorch: .pte is {ratio:.2f}x smaller than the fp32 weights, gate {cfg.gates.min_pte_size_reduction}x")
    (out / "quality.json").write_text(json.dumps(quality, indent=1, sort_keys=True) + "\n")
    if misses:
        raise GateError("quality gates of target %r missed:\n  %s" % (p.name, "\n  ".join(misses)))
    return quality


def _cache_layout(directory: Path) -> dict:
    from runtime.artifacts import LAYOUT_FILE

    layout = json.loads((directory / LAYOUT_FILE).read_text())
    keys = ("max_context", "max_draft", "sliding_cache", "ring_slots", "sliding_block", "max_call_tokens",
            "cache_owners", "cache_shapes", "kv_producers")
    return {k: layout[k] for k in keys if k in layout}  # the last two: window caches only


def write_manifest(p: Plan, formats: dict, calibration: dict, quality: dict, out: Path) -> None:
    """Step 7: manifest.json (files with sha256 and size, model and drafter summary, methods
    and I/O, cache layout, gates, draft length, ids, quality, calibration, toolchain)."""
    from runtime.artifacts import LAYOUT_FILE

    layout = json.loads((formats[_primary(formats)].directory / LAYOUT_FILE).read_text())
    manifest = {
        "format_version": FORMAT_VERSION,
        "target": p.name,
        "description": p.cfg.description,
        "inputs": {"checkpoint": _checkpoint_digest(p.checkpoint), "assistant": _checkpoint_digest(p.assistant)},
        "model": _summary(p.target, p.drafter),
        "formats": {
            fmt: {"directory": b.directory.name, "entry": "pair.pte" if fmt == "executorch" else "target.onnx"}
            for fmt, b in formats.items()
        },
        "methods": {fmt: b.methods for fmt, b in formats.items()},
        "cache_layout": {fmt: _cache_layout(b.directory) for fmt, b in formats.items()},
        "prefill_chunk": p.cfg.prefill_chunk,
        # the gates this export was judged by: `make parity ARTIFACTS=` reads them from here
        "gates": dataclasses.asdict(p.cfg.gates),
        "draft_tokens": calibration["draft_tokens"],
        "eos_token_ids": layout["eos_token_ids"],
        "bos_token_id": layout["bos_token_id"],
        "quantization": {k: v for b in formats.values() for k, v in b.quantization.items()},
        "clients": {k: v for b in formats.values() for k, v in b.clients.items()},
        "quality": {fmt: {k: v for k, v in r.items() if k != "prompts"} for fmt, r in quality.items()},
        "draft_calibration": calibration,
        "toolchain": _versions(),
        "files": _files(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _open(fmt: str, directory: Path, prefill_chunk: int):
    """A runtime backend over one format's artifacts, chunking prefill as the target file says."""
    if fmt == "executorch":
        from runtime.executorch_backend import ExecuTorchBackend

        return ExecuTorchBackend(directory, prefill_chunk=prefill_chunk)
    from runtime.onnx_backend import OnnxBackend

    return OnnxBackend(directory, prefill_chunk=prefill_chunk)


def _try_coreml(d: Path, checkpoint, assistant, cfg) -> dict:
    """A Core ML delegated program where its lowering works on this machine; on failure the
    reason is recorded in the manifest and the export goes on (the XNNPACK program is the
    iOS baseline)."""
    try:
        from export.executorch_export import write_coreml

        return write_coreml(d, checkpoint, assistant, cfg.max_context, cfg.max_draft)
    except Exception as e:  # noqa: BLE001 - any lowering failure is reported, not fatal
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"      Core ML: not built ({reason})", flush=True)
        return {"built": False, "reason": reason}


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a complete export into place; an earlier export is replaced only after the new
    one is complete."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def manifest_gates(manifest: dict):
    """The quality gates an export was built with (from its manifest, not today's targets/)."""
    from export.targets import Gates

    if "gates" not in manifest:
        raise ExportError("the manifest records no gates (an export from before they were recorded); re-run `make export`")
    return Gates(**manifest["gates"])


def verify_manifest(directory: Path) -> dict:
    """Check every file of an export against its manifest entry; raise ExportError naming
    the first problems (missing, changed, or unlisted files)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path} not found: {directory} is not a `make export` output")
    manifest = json.loads(path.read_text())
    problems = []
    for rel, entry in manifest["files"].items():
        p = directory / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != entry["bytes"] or sha256(p) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (file changed or corrupted)")
    listed = set(manifest["files"])
    extra = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST]
    problems += [f"{rel}: not in the manifest" for rel in sorted(set(extra) - listed)]
    if problems:
        raise ExportError(
            f"{directory} fails its manifest, refusing to use it:\n  " + "\n  ".join(problems) + "\nre-run `make export`"
        )
    return manifest
