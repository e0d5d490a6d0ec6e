"""Does preference tuning learn on the shipped GSM8K pairs, on this CPU? LoRA DPO, ORPO, KTO, SimPO and a reward model.

Runs `lmforge train` on examples/smollm2-135m/{method}-gsm8k.yml (dpo, ipo, orpo, kto, simpo, rm: the reward
model) with the overrides given, and prints, per method, the held-out numbers before the first step and after the
last: loss, the reward accuracy (DPO/IPO/KTO: the share of held-out pairs whose chosen answer gains more
log-probability over the reference than the rejected one; rm: the share whose chosen answer scores higher) and
margin, the wall time and the load average while it ran. The acceptance bar: DPO's held-out accuracy from ~50% to
>= 75% with a positive margin; ORPO's, KTO's and SimPO's held-out losses lower; the reward model >= 75%.

    python bench/preference_learning.py                       # dpo, orpo, kto, simpo, rm with the examples' settings
    python bench/preference_learning.py --methods dpo --max_steps 30 --threads 1
    python bench/preference_learning.py --methods rm --set learning_rate=0.001 --set micro_batch_size=8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(method: str, out: Path, overrides: list[str], threads: int | None, held_out: int | None) -> dict:
    config = REPO / "examples" / "smollm2-135m" / f"{method}-gsm8k.yml"
    if held_out:  # the example with its held-out file cut to the first `held_out` rows (pairs; KTO: rows)
        import yaml

        settings = yaml.safe_load(config.read_text())
        for entry in settings["datasets"]:
            entry["path"] = str(REPO / entry["path"])
        for entry in settings["test_datasets"]:
            subset = out / f"{method}-held-out.jsonl"
            subset.parent.mkdir(parents=True, exist_ok=True)
            subset.write_text("".join((REPO / entry["path"]).read_text().splitlines(keepends=True)[:held_out]))
            entry["path"] = str(subset)
        config = out / f"{method}-gsm8k.yml"
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
    command = [sys.executable, "-m", "lmforge.cli", "train", str(config), f"--output_dir={out / method}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads:  # one thread is the fast choice on a shared CPU: two threads wait on each other's barrier
        env["OMP_NUM_THREADS"] = str(threads)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: {method} failed:\n{proc.stderr[-3000:]}")
    (out / method / "train.log").write_text(proc.stdout + proc.stderr)
    summary = json.loads((out / method / "summary.json").read_text())
    summary["bench_wall_seconds"] = time.perf_counter() - started
    summary["bench_load"] = (load_before, os.getloadavg()[1])  # 1-min load at the start, 5-min load at the end
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dpo,orpo,kto,simpo,rm")
    parser.add_argument("--max_steps", type=int, default=None)
    parser.add_argument("--eval_steps", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another config override (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: inherited)")
    parser.add_argument("--held_out", type=int, default=None,
                        help="evaluate on the first N held-out rows only (each held-out pass costs ~2 CPU-seconds a pair)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "runs" / "preference_learning")
    args = parser.parse_args()
    overrides = [f"--{k}={v}" for k, v in (("max_steps", args.max_steps), ("eval_steps", args.eval_steps)) if v is not None]
    overrides += [f"--{item}" for item in args.set]
    print(f"overrides: {' '.join(overrides) or 'none'}; held-out rows: {args.held_out or 'all'}")
    print("| method | steps | held-out loss start → end | reward accuracy start → end | margin start → end | wall s | load |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        s = run(method, args.out, overrides, args.threads, args.held_out)
        start, end = s.get("eval_metrics_start") or {}, s.get("eval_metrics_end") or {}
        acc = (f"{start.get('rewards/accuracies', float('nan')):.1%} → {end.get('rewards/accuracies', float('nan')):.1%}"
               if "rewards/accuracies" in end else "-")
        margin = (f"{start.get('rewards/margins', float('nan')):.3f} → {end.get('rewards/margins', float('nan')):.3f}"
                  if "rewards/margins" in end else "-")
        print(f"| {method} | {s['steps']} | {s['eval_loss_start']:.4f} → {s['eval_loss_end']:.4f} | {acc} | {margin} | "
              f"{s['bench_wall_seconds']:.0f} | {s['bench_load'][0]:.1f} / {s['bench_load'][1]:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
