"""`make size-check LAYERS=4,8 OUT=dir`: what the real E4B costs to export and to run, measured
on random weights at E4B's real widths and vocabulary, extrapolated to its 42 layers.

Steps (each measured stage runs in its own process, so its peak resident memory and wall
time are its own; a watchdog stops a stage whose resident memory passes `--memory-limit-gb`
before it can take the machine):
1. `checkpoint`: a random-weight pair with E4B's config at depth n (`e4b_config_at`: both
   layer types, KV sharing with both producers, the real 262144 vocabulary and the real
   78.5M-parameter drafter), written as bf16 safetensors shards tensor by tensor (the 42-layer
   target is 15 GB on disk and never held whole in memory);
2. per deployment target (android: 8da4w + int8 tables; linux-x86_64: fp32), the ExecuTorch
   program, read in bounded memory (export/checkpoint.py quantizes as it reads), and the
   ONNX graphs, also bounded (export/onnx_weights.py reads, quantizes and writes one weight
   at a time; fp32 graphs are skipped, with that reason, where the fp32 pair passes the
   memory limit: onnxruntime would hold it whole to run them);
3. `run`: the native runner (native/, `make native`) over each `.pte`, loaded memory-mapped
   without mlock as an app loads it: greedy tokens on a prompt past the sliding window, peak
   resident memory, and how much of it is pages of the mapped program file (the token and
   PLE tables are portable-kernel constants read row by row from the map);
   `onnx-run`: our onnxruntime backend over each ONNX export, in its own measured process:
   greedy tokens on the same prompt, prefill and mean decode step, peak resident memory;
4. `reference`: transformers' greedy tokens for the same prompt where the fp32 pair fits, to
   compare with every run's tokens (both formats). Random weights make the quality gates
   meaningless: they are not run (the report says so);
5. every figure fitted as a + b * layers over the depths measured and extrapolated to 42;
   `size_check.json` and `size_check.png` under OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from export.checkpoint import fp32_pair_bytes

REPO = Path(__file__).resolve().parent.parent
E4B_LAYERS = 42
E4B_SHARED = 18
PROMPT_LEN = 600  # past the 512-token sliding window
NEW_TOKENS = 32
GiB = 1 << 30


# ---------------------------------------------------------------------------- checkpoint


def e4b_config_at(layers: int):
    """E4B's TargetSpec at `layers` layers: the shared share of E4B (18 of 42, at least 1),
    the owners' layer pattern sliding^(p-1) full with p = min(6, owners), so the owners hold
    both layer types and the last owner is full (E4B itself: 24 owners, p = 6, exact)."""
    from export.config import FULL, SLIDING, preset

    if layers < 4:
        raise ValueError(f"layers={layers}: at least 4 are needed for both layer types among owners and sharers")
    e4b = preset("e4b").target
    shared = max(1, round(layers * E4B_SHARED / E4B_LAYERS))
    period = min(6, layers - shared)
    types = [FULL if (i + 1) % period == 0 else SLIDING for i in range(layers)]
    types[-1] = FULL
    attention = dataclasses.replace(e4b.attention, layer_types=tuple(types), num_kv_shared_layers=shared)
    return dataclasses.replace(e4b, attention=attention)


SHARD_BYTES = 2 * GiB


def _random(shape, std: float, gen: torch.Generator) -> torch.Tensor:
    """bf16 normal(0, std), drawn 16M values at a time (no fp32 copy of a large table)."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    step = 1 << 24
    for a in range(0, flat.numel(), step):
        b = min(a + step, flat.numel())
        flat[a:b] = torch.randn(b - a, generator=gen) * std
    return out


def write_checkpoint(layers: int, out: Path, seed: int = 0, drafter=None) -> tuple[Path, Path]:
    """out/target (gemma4_text, bf16 shards + index) and out/assistant (the real-size drafter);
    weights: normal(0, 0.02) matrices, ones for norms and scalars; the token table drawn at
    0.05 and the drafter's head at 0.3 (clear top-2 margins, as export/random_pair.py)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from export.config import preset
    from export.hf_compat import patch_transformers
    from export.random_pair import DEMO_TOKENIZER, RandomShape

    patch_transformers()
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    spec = e4b_config_at(layers)
    out = Path(out)
    tdir, ddir = out / "target", out / "assistant"
    for d in (tdir, ddir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    hf = spec.to_hf()
    with torch.device("meta"):
        meta = Gemma4ForCausalLM(hf)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items() if k != "lm_head.weight"}  # tied
    gen = torch.Generator().manual_seed(seed)
    drafter_spec = drafter or preset("e4b").drafter
    defaults = RandomShape(spec, drafter_spec)
    weight_map, shard, shard_bytes, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(tdir / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, shard_bytes, n = {}, 0, n + 1

    for key, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        if shard_bytes + 2 * numel > SHARD_BYTES:
            flush()
        if len(shape) == 1:
            shard[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            std = defaults.embed_std if key == "model.embed_tokens.weight" else 0.02
            shard[key] = _random(shape, std, gen)
        shard_bytes += 2 * numel
        print(f"\r[checkpoint] {len(weight_map) + len(shard)}/{len(shapes)} tensors", end="", flush=True)
    flush()
    print(flush=True)
    (tdir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    hf.save_pretrained(tdir)
    GenerationConfig(
        bos_token_id=spec.bos_token_id, eos_token_id=list(spec.eos_token_ids), pad_token_id=spec.pad_token_id
    ).save_pretrained(tdir)

    torch.manual_seed(seed)
    drafter = Gemma4AssistantForCausalLM(drafter_spec.to_hf(spec))
    with torch.no_grad():
        drafter.model.embed_tokens.weight.normal_(0.0, defaults.drafter_head_std)
        if drafter.masked_embedding is not None:
            drafter.masked_embedding.token_ordering.copy_(torch.randperm(spec.vocab_size))
            drafter.masked_embedding.centroids.weight.normal_(0.0, defaults.drafter_head_std)
    drafter.to(torch.bfloat16).save_pretrained(ddir)
    for d in (tdir, ddir):
        shutil.copyfile(DEMO_TOKENIZER, d / "tokenizer.json")
    return tdir, ddir


# ---------------------------------------------------------------------------- stages (own processes)


def _target_file(name: str):
    from export.targets import load_target

    return load_target(name)


def stage_executorch(checkpoint: Path, assistant: Path, target: str, out: Path) -> dict:
    """The target file's ExecuTorch program, the target read in bounded memory."""
    from export.checkpoint import load_pair
    from export.executorch_export import write_executorch

    from export.checkpoint import read_config

    cfg = _target_file(target)
    q = cfg.executorch.recipe(read_config(checkpoint).spec.hidden_size)
    t0 = time.time()
    target_model, drafter = load_pair(checkpoint, assistant, quantization=q)
    from export.executorch_export import _memory

    print(f"[executorch] pair read{' and quantized' if q else ''} ({time.time() - t0:.0f}s; {_memory()})", flush=True)
    info = write_executorch(target_model, drafter, out, cfg.max_context, cfg.max_draft, q)
    return {"quantization": info["quantization"], "delegation": info["delegation"]}


def stage_onnx(checkpoint: Path, assistant: Path, target: str, out: Path) -> dict:
    """The target file's ONNX graphs (the exporter of `make export`: the pair traced with its
    large tensors left in the checkpoint, each weight read, quantized and written in turn)."""
    from types import SimpleNamespace

    from export.build import build_onnx

    cfg = _target_file(target)
    plan = SimpleNamespace(
        cfg=cfg, checkpoint=Path(checkpoint), assistant=Path(assistant),
        stage=lambda i, text: print(f"[onnx] {text}", flush=True),
    )
    return {"quantization": build_onnx(plan, Path(out)).quantization}


def stage_onnx_run(artifacts: Path, prompt: list[int], new_tokens: int) -> dict:
    """Greedy tokens of our onnxruntime backend over an ONNX export (no torch needed)."""
    from runtime.loop import greedy_generate
    from runtime.onnx_backend import OnnxBackend

    backend = OnnxBackend(artifacts)
    greedy_generate(backend, prompt[:8], 2)  # warm-up: a session's first calls plan memory
    tokens, _, timer = greedy_generate(backend, prompt, new_tokens)  # no EOS stop, as the reference
    ms = timer.mean_ms()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda key: int(status[key].split()[0]) * 1024 if key in status else None  # noqa: E731
    # resident now: anonymous (heap: weights onnxruntime copied or repacked, caches, arena)
    # and file pages (memory-mapped external data: the rows of the tables read so far)
    return {"tokens": tokens, "prefill_ms": round(ms["prefill"], 2), "decode_ms": round(ms["decode"], 3),
            "rss_anon_bytes": kib("RssAnon"), "rss_file_bytes": kib("RssFile")}


def stage_reference(checkpoint: Path, assistant: Path, prompt: list[int], new_tokens: int) -> dict:
    """transformers' greedy tokens (fp32) for the prompt."""
    from export.checkpoint import load_pair
    from runtime.reference import ReferencePair

    target_model, drafter = load_pair(checkpoint, assistant)
    tokens, _ = ReferencePair(target_model, drafter).generate(prompt, new_tokens, 0, stop_at_eos=False)
    return {"tokens": tokens}


# ---------------------------------------------------------------------------- measuring a stage


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def measure(argv: list[str], log: Path, limit_bytes: int) -> dict:
    """Run argv as a child; its wall time, peak resident memory (the kernel's own account,
    from wait4), exit status. A watchdog kills it when its resident memory passes
    limit_bytes (then `stopped` says so)."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    stopped = []

    def watch():
        while not stopped:
            if _rss_bytes(proc.pid) > limit_bytes:
                stopped.append(f"resident memory passed the {limit_bytes / GiB:.1f} GiB limit")
                proc.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if not stopped:
        stopped.append(None)
    watcher.join()
    progress = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("[")]
    return {
        "seconds": round(time.time() - t0, 1),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "exit_status": proc.returncode,
        "stopped": stopped[0],
        "progress": progress[-12:],  # the stage's own progress lines: where a stopped stage was
        "log": str(log),
    }


def _stage_argv(*args) -> list[str]:
    return [sys.executable, "-m", "export.size_check", "stage", *map(str, args)]


def _bytes_of(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def run_native(cli: Path, pte: Path, prompt: list[int], new_tokens: int) -> dict:
    out = subprocess.run(
        [str(cli), "--pte", str(pte), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(new_tokens),
         "--ignore-eos", "--memory"],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-500:]}
    lines = out.stdout.strip().splitlines()
    return {"tokens": [int(t) for t in lines[:-1]], **json.loads(lines[-1])}


def run_onnx(art: Path, d: Path, new_tokens: int, limit: int) -> dict:
    """The `onnx-run` stage over one ONNX export: its tokens and its measured figures."""
    out = art.parent / "onnx_run.json"
    st = measure(_stage_argv("onnx-run", art, d / "prompt.json", new_tokens, out), art.parent / "onnx-run.log", limit)
    if st["exit_status"] != 0 or not out.is_file():
        return {"error": f"exit {st['exit_status']} ({st['stopped'] or 'see ' + st['log']})"}
    return {**json.loads(out.read_text()), "peak_rss_bytes": st["peak_rss_bytes"], "seconds": st["seconds"]}


# ---------------------------------------------------------------------------- the check


def prompt_ids(n: int = PROMPT_LEN, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(3, 262_144, (n - 1,), generator=g).tolist()


def check_depth(layers: int, out: Path, targets: list[str], limit: int, cli: Path | None, new_tokens: int) -> dict:
    """Every stage at one depth; returns its figures (see the module docstring)."""
    d = out / f"layers-{layers}"
    d.mkdir(parents=True, exist_ok=True)
    pair = d / "pair"
    res: dict = {"layers": layers, "stages": {}, "artifact_bytes": {}, "run": {}, "onnx_run": {}, "skipped": {}}
    done = pair / "complete"
    if done.is_file():
        print(f"[size-check] {layers} layers: reusing the checkpoint in {pair}", flush=True)
    else:
        print(f"[size-check] {layers} layers: writing the random-weight checkpoint to {pair}", flush=True)
        res["stages"]["checkpoint"] = measure(_stage_argv("checkpoint", layers, pair), d / "checkpoint.log", limit)
        if res["stages"]["checkpoint"]["exit_status"] != 0:
            raise SystemExit(f"error: writing the checkpoint failed; see {d / 'checkpoint.log'}")
        done.write_text("")
    res["checkpoint_bytes"] = sum(p.stat().st_size for p in (pair / "target").glob("*.safetensors"))
    fp32 = res["fp32_pair_bytes"] = fp32_pair_bytes(pair / "target", pair / "assistant")
    prompt = prompt_ids()
    res["prompt_tokens"] = len(prompt)
    (d / "prompt.json").write_text(json.dumps(prompt))
    for target in targets:
        cfg = _target_file(target)
        if cfg.executorch is not None:
            too_big = not cfg.executorch.quantized and 3 * fp32 > limit
            art = _export_stage(res, "executorch", target, pair, d, limit, too_big and (
                f"the fp32 program's lowering holds about 3x the fp32 pair ({3 * fp32 / GiB:.1f} GiB) "
                f"> the {limit / GiB:.1f} GiB limit; measured at smaller depths and extrapolated"))
            if art is not None and cli is not None:
                print(f"[size-check] {layers} layers: native runner over {target}'s program", flush=True)
                res["run"][target] = run_native(cli, art / "pair.pte", prompt, new_tokens)
        if cfg.onnx is not None:
            # the export reads one weight at a time; fp32 graphs are the fp32 pair, which
            # onnxruntime then holds whole to run them
            art = _export_stage(res, "onnx", target, pair, d, limit, not cfg.onnx.quantized and fp32 > limit and (
                f"fp32 graphs hold the fp32 pair ({fp32 / GiB:.1f} GiB) > the {limit / GiB:.1f} GiB limit; "
                "measured at smaller depths and extrapolated"))
            if art is not None:
                print(f"[size-check] {layers} layers: onnxruntime over {target}'s graphs", flush=True)
                res["onnx_run"][target] = run_onnx(art, d, new_tokens, limit)
    if 1.3 * fp32 < limit:
        print(f"[size-check] {layers} layers: transformers' greedy tokens (fp32)", flush=True)
        ref_file = d / "reference.json"
        res["stages"]["reference"] = measure(
            _stage_argv("reference", pair / "target", pair / "assistant", d / "prompt.json", new_tokens, ref_file),
            d / "reference.log", limit,
        )
        if ref_file.is_file():
            ref = json.loads(ref_file.read_text())["tokens"]
            res["reference_tokens"] = ref
            for run in [*res["run"].values(), *res["onnx_run"].values()]:
                if "tokens" in run:
                    run["equal_to_transformers"] = run["tokens"] == ref
    else:
        res["skipped"]["reference"] = f"the fp32 pair ({fp32 / GiB:.1f} GiB) does not fit the limit"
    return res


def _export_stage(res: dict, kind: str, target: str, pair: Path, d: Path, limit: int, skip) -> Path | None:
    """One format's export of `target` as a measured stage (or its reason to skip); returns
    the artifacts' folder when it completed."""
    name = f"{kind}-{target}"
    if skip:
        res["skipped"][name] = skip
        return None
    print(f"[size-check] {res['layers']} layers: {name}", flush=True)
    art = d / target / kind
    shutil.rmtree(art, ignore_errors=True)
    res["stages"][name] = measure(
        _stage_argv(kind, pair / "target", pair / "assistant", target, art), d / f"{name}.log", limit
    )
    if res["stages"][name]["exit_status"] != 0:
        return None
    res["artifact_bytes"][name] = _bytes_of(art)
    return art


def figures(depth: dict) -> dict[str, float]:
    """The numbers of one depth that scale with the layer count, flat."""
    f = {"checkpoint_bytes": depth["checkpoint_bytes"], "fp32_pair_bytes": depth["fp32_pair_bytes"]}
    for name, st in depth["stages"].items():
        if st["exit_status"] == 0:
            f[f"{name}.peak_rss_bytes"] = st["peak_rss_bytes"]
            f[f"{name}.seconds"] = st["seconds"]
    for name, files in depth["artifact_bytes"].items():
        f[f"{name}.bytes"] = sum(files.values())
    for target, run in depth.get("onnx_run", {}).items():
        if "peak_rss_bytes" in run:
            f[f"onnx-run-{target}.peak_rss_bytes"] = run["peak_rss_bytes"]
        if run.get("rss_anon_bytes") is not None:  # resident outside mapped files (tables' pages)
            f[f"onnx-run-{target}.rss_excluding_mapped_bytes"] = run["rss_anon_bytes"]
    for target, run in depth["run"].items():
        if "peak_rss_bytes" in run:
            f[f"run-{target}.peak_rss_bytes"] = run["peak_rss_bytes"]
            f[f"run-{target}.rss_bytes"] = run["rss_bytes"]
            f[f"run-{target}.rss_excluding_program_map_bytes"] = run["rss_bytes"] - run["program_mapped_rss_bytes"]
    return f


def extrapolate(depths: list[dict], to: int = E4B_LAYERS) -> dict:
    """Each figure measured at two or more depths, fitted as a + b * layers (least squares)
    and evaluated at `to` layers; with the slope per layer."""
    series: dict[str, list[tuple[int, float]]] = {}
    for d in depths:
        for k, v in figures(d).items():
            series.setdefault(k, []).append((d["layers"], v))
    out = {}
    for k, pts in series.items():
        if len({n for n, _ in pts}) < 2:
            continue
        xs = torch.tensor([float(n) for n, _ in pts], dtype=torch.float64)
        ys = torch.tensor([float(v) for _, v in pts], dtype=torch.float64)
        b = ((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()
        a = ys.mean() - b * xs.mean()
        out[k] = {"per_layer": round(b.item(), 1), "at_%d_layers" % to: round((a + b * to).item(), 1),
                  "measured": {str(n): v for n, v in pts}}
    return out


def plot(depths: list[dict], fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in fits if k.endswith("bytes")]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for k in keys:
        pts = sorted((int(n), v / GiB) for n, v in fits[k]["measured"].items())
        line = ax.plot([n for n, _ in pts], [v for _, v in pts], "o-", label=k)[0]
        last = pts[-1]
        ax.plot([last[0], E4B_LAYERS], [last[1], fits[k][f"at_{E4B_LAYERS}_layers"] / GiB], ":",
                color=line.get_color())
    ax.axhline(20, color="red", lw=0.8, label="20 GiB export limit (issue 13)")
    ax.set_xlabel("target layers (E4B: 42)")
    ax.set_ylabel("GiB")
    ax.set_title("E4B widths, random weights: measured (solid) and extrapolated (dotted)")
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _native_cli() -> Path | None:
    cli = REPO / "build" / "native" / "gemma4-spec"
    return cli if cli.is_file() else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "stage":
        return _stage_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m export.size_check", description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="4,8", help="comma-separated depths (at least 4 each; two or more to extrapolate)")
    ap.add_argument("--out", type=Path, required=True, help="folder for checkpoints, artifacts, size_check.json and .png")
    ap.add_argument("--targets", default="android,linux-x86_64", help="deployment targets to export (targets/*.toml)")
    ap.add_argument("--memory-limit-gb", type=float, default=20.0,
                    help="a stage whose resident memory passes this is stopped (default 20)")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    args = ap.parse_args(argv)
    try:
        layers = sorted({int(x) for x in args.layers.split(",")})
    except ValueError:
        print(f"error: --layers {args.layers!r}: expected comma-separated integers such as 4,8", file=sys.stderr)
        return 2
    if min(layers) < 4:
        print("error: --layers: every depth must be at least 4 (both layer types among cache owners and sharers)",
              file=sys.stderr)
        return 2
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    from export.targets import load_target

    for t in targets:
        try:
            load_target(t)
        except Exception as e:  # noqa: BLE001 - report the targets file problem as bad input
            print(f"error: --targets: {e}", file=sys.stderr)
            return 2
    cli = _native_cli()
    if cli is None:
        print("[size-check] build/native/gemma4-spec not found: run `make native` for the run-time memory figures",
              flush=True)
    limit = int(args.memory_limit_gb * GiB)
    args.out.mkdir(parents=True, exist_ok=True)
    depths = []
    for n in layers:
        depths.append(check_depth(n, args.out, targets, limit, cli, args.new_tokens))
        _write(args.out, depths, args)  # after every depth: a long run leaves what it measured
    _print_table(depths, extrapolate(depths))
    return 0


def _write(out: Path, depths: list[dict], args) -> None:
    fits = extrapolate(depths)
    report = {
        "command": "make size-check LAYERS=%s OUT=%s" % (args.layers, args.out),
        "config": "E4B widths (hidden 2560, intermediate 10240, 8/2 heads, head dims 256/512, vocab 262144, "
        "PLE 256 per layer), random weights, real-size drafter",
        "quality_gates": "not run: random weights make top-1, KL and acceptance meaningless",
        "memory_limit_bytes": int(args.memory_limit_gb * GiB),
        "depths": depths,
        "extrapolated": fits,
    }
    (out / "size_check.json").write_text(json.dumps(report, indent=1) + "\n")
    if fits:
        plot(depths, fits, out / "size_check.png")


def _print_table(depths: list[dict], fits: dict) -> None:
    keys = sorted({k for d in depths for k in figures(d)})
    head = "figure".ljust(52) + "".join(f"{d['layers']:>10} L" for d in depths) + f"{'-> 42 L':>12}"
    print(head)
    for k in keys:
        scale, unit = (GiB, "G") if k.endswith("bytes") else (1, "s")
        row = k.ljust(52)
        for d in depths:
            v = figures(d).get(k)
            row += f"{v / scale:>11.2f}" if v is not None else f"{'-':>11}"
        if k in fits:
            row += f"{fits[k][f'at_{E4B_LAYERS}_layers'] / scale:>11.2f}{unit}"
        print(row)
    for d in depths:
        for name, why in d["skipped"].items():
            print(f"{d['layers']} layers, {name}: skipped ({why})")
        for target, run in d["run"].items():
            if "equal_to_transformers" in run:
                print(f"{d['layers']} layers, {target} program: tokens equal transformers greedy: {run['equal_to_transformers']}")
        for target, run in d.get("onnx_run", {}).items():
            if "equal_to_transformers" in run:
                print(f"{d['layers']} layers, {target} ONNX graphs: tokens equal transformers greedy: {run['equal_to_transformers']}")


def _stage_main(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    if kind == "checkpoint":
        write_checkpoint(int(rest[0]), Path(rest[1]))
    elif kind == "executorch":
        print(json.dumps(stage_executorch(Path(rest[0]), Path(rest[1]), rest[2], Path(rest[3])), default=str)[:2000])
    elif kind == "onnx":
        print(json.dumps(stage_onnx(Path(rest[0]), Path(rest[1]), rest[2], Path(rest[3])), default=str)[:2000])
    elif kind == "onnx-run":
        prompt = json.loads(Path(rest[1]).read_text())
        Path(rest[3]).write_text(json.dumps(stage_onnx_run(Path(rest[0]), prompt, int(rest[2]))))
    elif kind == "reference":
        prompt = json.loads(Path(rest[2]).read_text())
        Path(rest[4]).write_text(json.dumps(stage_reference(Path(rest[0]), Path(rest[1]), prompt, int(rest[3]))))
    else:
        raise SystemExit(f"unknown stage {kind!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
