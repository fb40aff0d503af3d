"""`make export TARGET=<t>` / `python -m export --target <t>`: see export/build.py.

Exit status: 0 written; 1 a quality gate missed (nothing written); 2 bad input (unknown
target, bad checkpoint, bad --step-costs; nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.generate import DEMO_ASSISTANT, DEMO_TARGET


def main(argv: list[str] | None = None) -> int:
    from export.targets import known_targets

    ap = argparse.ArgumentParser(
        prog="python -m export",
        description="Export the Gemma 4 target + MTP drafter pair for one deployment target into OUT/TARGET.",
    )
    ap.add_argument("--target", default="android", help=f"deployment target: {', '.join(known_targets())}")
    ap.add_argument("--checkpoint", type=Path, default=DEMO_TARGET, help="target checkpoint dir (default: demo)")
    ap.add_argument("--assistant", type=Path, default=DEMO_ASSISTANT, help="drafter checkpoint dir (default: demo)")
    ap.add_argument("--out", type=Path, default=Path("artifacts"), help="output root; writes OUT/TARGET")
    ap.add_argument(
        "--step-costs",
        type=Path,
        help="JSON of step costs in ms (decode_ms, verify2_ms.., draft_ms) to use instead of measuring them: "
        "pins the draft-length calibration, the one input that varies between runs",
    )
    ap.add_argument("--check-tokens", type=int, default=64, help="new tokens in the reference check")
    ap.add_argument("--targets-dir", type=Path, help="folder of target files (default: targets/)")
    args = ap.parse_args(argv)

    from calibration.quality import GateError
    from export.build import ExportError, build_target
    from export.checkpoint import CheckpointError
    from export.targets import TargetError

    import signal

    def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so the partial output is removed
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    try:
        step_costs = None
        if args.step_costs is not None:
            try:
                step_costs = json.loads(args.step_costs.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ExportError(f"--step-costs {args.step_costs}: cannot read it as JSON ({e})") from None
            step_costs = step_costs.get("draft_calibration", {}).get("step_costs_ms", step_costs)
        build_target(
            args.target, args.checkpoint, args.assistant, args.out, step_costs, args.check_tokens, args.targets_dir
        )
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.out / args.target}", file=sys.stderr)
        return 130
    except GateError as e:
        print(f"error: {e}\nnothing was written to {args.out / args.target}", file=sys.stderr)
        return 1
    except (TargetError, CheckpointError, ExportError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
