"""Does preference tuning learn on the shipped GSM8K pairs, on this CPU? LoRA DPO, ORPO and KTO from the examples.

Runs `lmforge train` on examples/smollm2-135m/{dpo,orpo,kto}-gsm8k.yml (with the overrides given) and prints, per
method, the held-out numbers before the first step and after the last: loss, and for DPO/KTO the reward accuracy
(the share of held-out pairs whose chosen answer gains more log-probability over the reference than the
rejected one) and margin. The acceptance bar: DPO's held-out accuracy from ~50% to >= 75% with a positive margin;
ORPO's and KTO's held-out losses lower.

    python bench/preference_learning.py                       # all three, the examples' settings
    python bench/preference_learning.py --methods dpo --max_steps 30
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(method: str, out: Path, overrides: list[str]) -> dict:
    config = REPO / "examples" / "smollm2-135m" / f"{method}-gsm8k.yml"
    command = [sys.executable, "-m", "lmforge.cli", "train", str(config), f"--output_dir={out / method}", *overrides]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {method} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / method / "summary.json").read_text())
    summary["bench_wall_seconds"] = time.perf_counter() - started
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dpo,orpo,kto")
    parser.add_argument("--max_steps", type=int, default=None)
    parser.add_argument("--eval_steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "runs" / "preference_learning")
    args = parser.parse_args()
    overrides = [f"--{k}={v}" for k, v in (("max_steps", args.max_steps), ("eval_steps", args.eval_steps)) if v is not None]
    print("| method | steps | held-out loss start → end | reward accuracy start → end | margin start → end | wall s |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        s = run(method, args.out, overrides)
        start, end = s.get("eval_metrics_start") or {}, s.get("eval_metrics_end") or {}
        acc = (f"{start.get('rewards/accuracies', float('nan')):.1%} → {end.get('rewards/accuracies', float('nan')):.1%}"
               if "rewards/accuracies" in end else "-")
        margin = (f"{start.get('rewards/margins', float('nan')):.3f} → {end.get('rewards/margins', float('nan')):.3f}"
                  if "rewards/margins" in end else "-")
        print(f"| {method} | {s['steps']} | {s['eval_loss_start']:.4f} → {s['eval_loss_end']:.4f} | {acc} | {margin} | "
              f"{s['bench_wall_seconds']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
