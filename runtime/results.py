"""`make results`: the README's results table, rendered from measurements kept in results/.

A number in the README's table is never typed: `make parity` writes parity.json, `make bench`
writes bench.json, `make export` writes manifest.json and `make size-check` size_check.json; `make results ADD=<that file>
NAME=<short name>` copies the file into results/<name>.json and re-renders the table between
the README's `<!-- results:begin -->` and `<!-- results:end -->` markers. Each row names the
command that produced it (recorded in the JSON by the command itself).
tests/test_results.py fails when the README's table differs from the rendering of results/.

Steps of `render(results_dir)`:
1. read every results/*.json, sorted by name;
2. recognise its kind by its keys (parity: `checks`; bench: `step_costs_ms`; export
   manifest: `files` and `quality`; `make size-check`: `depths` and `extrapolated`);
3. one or more table rows per file: what was measured, the numbers, the command.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
README = REPO / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
HEADER = "| result | numbers | reproduce |\n|---|---|---|"


def command_line(module: str, argv: list[str] | None) -> str:
    """The command a results file came from, as it can be typed again."""
    return " ".join(["python -m", module, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def _command(data: dict) -> str:
    cmd = data.get("command")
    return f"`{cmd}`" if cmd else "(command not recorded)"


def _parity_rows(name: str, data: dict) -> list[str]:
    checks = data["checks"]
    passed = sum(c["ok"] for c in checks)
    errs = [c["value"] for c in checks if c["detail"].startswith("rel err") and c["value"] is not None]
    tokens = [c for c in checks if c["name"].endswith("tokens") or "speculative" in c["name"]]
    drafts = [c for c in checks if "transformers drafter" in c["name"]]
    parts = [f"{passed}/{len(checks)} checks pass"]
    if errs:
        parts.append(f"tensors max relative error {max(errs):.1e} (tolerance {data.get('rtol', 1e-4):g})")
    if tokens:
        parts.append(f"token checks {sum(c['ok'] for c in tokens)}/{len(tokens)} identical")
    if drafts:
        differ = sum(int(m.group(1)) for c in drafts if (m := re.search(r"(\d+) differ", c["detail"])))
        rounds = sum(int(m.group(1)) for c in drafts if (m := re.search(r"(\d+) rounds", c["detail"])))
        parts.append(f"drafts vs transformers' drafter: {differ} of {rounds} rounds differ")
    longest = [c for c in checks if re.search(r"speculative k=(\d+) tokens", c["name"]) and c["value"] is not None]
    if longest:
        k = max(int(re.search(r"k=(\d+)", c["name"]).group(1)) for c in longest)
        values = [f"{c['value']:.2f}" for c in longest if f"k={k} " in c["name"]]
        parts.append(f"mean accepted length at k = {k}: {', '.join(values)}")
    if not errs:  # an export judged by its gates: each check's own line
        parts += [f"{c['name']}: {c['detail']}" for c in checks]
    failed = [c["name"] for c in checks if not c["ok"]]
    if failed:
        parts.append("FAILED: " + "; ".join(failed))
    what = re.sub(r"\S*/\.cache/exports/\S+?(?=[,\s]|$)", "(fp32 export, cached)", data.get("subject", name))
    return [f"| parity: {what} | {'; '.join(parts)} | {_command(data)} |"]


def _bench_rows(name: str, data: dict) -> list[str]:
    rows = []
    costs = data["step_costs_ms"]
    for backend, entry in data.items():
        if not isinstance(entry, dict) or backend == "step_costs_ms":
            continue
        decode = costs.get(backend, {}).get("decode_ms")
        rows.append(
            f"| bench ({data.get('subject', name)}): {backend} | decode step {decode:.2f} ms; greedy "
            f"{entry['greedy_tok_s']:.0f} tok/s; speculative/greedy {entry['speedup']:.2f}x at k = "
            f"{entry['draft_tokens']} (predicted {entry['predicted_speedup']:.2f}x), mean accepted length "
            f"{entry['mean_accepted_length']:.2f} | {_command(data)} |"
        )
    return rows


def _export_rows(name: str, data: dict) -> list[str]:
    sizes: dict[str, int] = {}
    for path, f in data["files"].items():
        top = path.split("/", 1)[0] if "/" in path else "(top)"
        sizes[top] = sizes.get(top, 0) + f["bytes"]
    size = ", ".join(f"{d} {b / 1e6:.2f} MB" for d, b in sorted(sizes.items()) if d != "(top)")
    quality = []
    for fmt, q in sorted(data.get("quality", {}).items()):
        if "top1_agreement" in q:
            quality.append(f"{fmt} top-1 {100 * q['top1_agreement']:.1f}%, KL {q['mean_kl']:.4f}")
    quant = data.get("quantization", {})
    kinds = ", ".join(
        f"{fmt} {v.get('linear')}" + (f" + {v['embedding']} tables" if v.get("embedding", "fp32") != "fp32" else "")
        for fmt, v in sorted(quant.items())
        if isinstance(v, dict) and "linear" in v
    )
    delegation = quant.get("executorch_delegation", {})
    if delegation:
        shown = [m for m in ("target_step", "draft_step", f"draft_k{data.get('draft_tokens')}") if m in delegation]
        outside = sum(len(v["matmuls_outside"]) for v in delegation.values())
        parts_d = ", ".join(f"{m} {100 * delegation[m]['delegated_share']:.1f}%" for m in shown)
        kinds += f"; ops in XNNPACK {parts_d}, matmuls outside {outside}"
    cal = data.get("draft_calibration", {})
    parts = [f"sizes {size}", f"weights {kinds}" if kinds else "", "; ".join(quality)]
    if cal:
        parts.append(f"deployed draft length {cal.get('draft_tokens')} (predicted {cal.get('predicted_speedup')}x)")
    # the manifest holds no command line (two exports of the same inputs are byte-identical)
    return [f"| export: {data['target']} | {'; '.join(p for p in parts if p)} | `make export TARGET={data['target']}` |"]


def _size_rows(name: str, data: dict) -> list[str]:
    """size_check.json: per depth, what each stage held and took, the artifacts, the run."""
    gb = 1e9
    rows = []
    for d in data["depths"]:
        parts = [f"checkpoint {d['checkpoint_bytes'] / gb:.2f} GB bf16"]
        for stage, st in d["stages"].items():
            if stage == "checkpoint":
                continue
            if st["exit_status"] == 0:
                parts.append(f"{stage}: peak RSS {st['peak_rss_bytes'] / gb:.2f} GB, {st['seconds'] / 60:.1f} min")
            else:
                parts.append(f"{stage}: FAILED ({st.get('stopped') or 'exit %d' % st['exit_status']})")
        for art, files in d["artifact_bytes"].items():
            parts.append(f"{art} artifacts {sum(files.values()) / gb:.2f} GB")
        for target, run in d["run"].items():
            if "peak_rss_bytes" in run:
                mapped = run["program_mapped_rss_bytes"]
                prompt = f" after a {d['prompt_tokens']}-token prompt" if "prompt_tokens" in d else ""
                parts.append(
                    f"native run ({target}, {len(run['tokens'])} tokens{prompt}): peak RSS {run['peak_rss_bytes'] / gb:.2f} GB, of it {mapped / gb:.2f} GB pages of the "
                    f"mapped program, {(run['rss_bytes'] - mapped) / gb:.2f} GB other"
                )
            if "equal_to_transformers" in run:
                parts.append(f"{target} tokens == transformers greedy: {run['equal_to_transformers']}")
        for target, run in d.get("onnx_run", {}).items():
            if "equal_to_transformers" in run:
                parts.append(f"onnxruntime run ({target}): peak RSS {run['peak_rss_bytes'] / gb:.2f} GB, "
                             f"prefill {run.get('prefill_ms')} ms, decode {run.get('decode_ms')} ms a step, "
                             f"tokens == transformers greedy: {run['equal_to_transformers']}")
        parts += [f"{k} skipped ({why})" for k, why in d["skipped"].items()]
        rows.append(f"| size check ({name}): E4B widths, {d['layers']} layers, random weights | {'; '.join(parts)} | "
                    f"{_command(data)} |")
    return rows


def rows_for(name: str, data: dict) -> list[str]:
    if "checks" in data:
        return _parity_rows(name, data)
    if "step_costs_ms" in data:
        return _bench_rows(name, data)
    if "files" in data and "quality" in data:
        return _export_rows(name, data)
    if "depths" in data and "extrapolated" in data:
        return _size_rows(name, data)
    raise ValueError(f"results/{name}.json: not a parity.json, bench.json, manifest.json or size_check.json")


def render(results_dir: Path = RESULTS) -> str:
    rows = []
    for path in sorted(results_dir.glob("*.json")):
        rows += rows_for(path.stem, json.loads(path.read_text()))
    return "\n".join([BEGIN, HEADER, *rows, END])


def replace_block(text: str, block: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {BEGIN} ... {END} block")
    return text[:start] + block + text[end + len(END) :]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.results", description=__doc__.split("\n")[0])
    ap.add_argument("--add", type=Path, help="a parity.json, bench.json or manifest.json to keep in results/")
    ap.add_argument("--name", help="its name in results/ (e.g. parity-demo-fp32)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README's table is not the rendering of results/")
    args = ap.parse_args(argv)
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"error: README.md has no {BEGIN} ... {END} block to render into", file=sys.stderr)
        return 2
    if args.add:
        if not args.name or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", args.name):
            print("error: --add needs --name (lower case letters, digits, '-', '_', '.')", file=sys.stderr)
            return 2
        if not args.add.is_file():
            print(f"error: {args.add} does not exist (run the command that writes it first)", file=sys.stderr)
            return 2
        try:
            rows_for(args.name, json.loads(args.add.read_text()))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            print(f"error: {args.add}: cannot render it ({e})", file=sys.stderr)
            return 2
        RESULTS.mkdir(exist_ok=True)
        shutil.copyfile(args.add, RESULTS / f"{args.name}.json")
    new = replace_block(text, render())
    if args.check:
        if new != text:
            print("README.md's results table is stale: run `make results`", file=sys.stderr)
            return 1
        print("README.md's results table matches results/")
        return 0
    README.write_text(new)
    print(f"README.md: results table rendered from {len(list(RESULTS.glob('*.json')))} files in results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
