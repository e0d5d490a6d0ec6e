"""Seconds per training step while another process holds a core (issue 21: OpenMP threads spinning on a busy core).

Runs `lmforge pretrain examples/scratch/llama-shakespeare.yml` for a few steps, once per code tree given with
--code (e.g. main's checkout and a branch) and per thread setting, with a busy loop pinned to one core, and
prints a Markdown table: seconds per step (the loop's train_seconds / steps), the notice lmforge printed, and
the load average before and after (other processes share the machine).

    python bench/threads_busy_core.py --code main=/work/main --code after=. --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLE = "examples/scratch/llama-shakespeare.yml"


def run(code: Path, steps: int, out: Path, extra_env: dict[str, str]) -> tuple[float, str]:
    """One short training; (seconds per step, lmforge's thread notice or '')."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MKL_"))}
    env.update(PYTHONPATH=str(code), **extra_env)
    cmd = [sys.executable, "-m", "lmforge", "pretrain", EXAMPLE, f"--max_steps={steps}", f"--output_dir={out}",
           "--eval_steps=100000", "--logging_steps=1", "--sample_prompt="]
    # run inside the code tree: `python -m` puts the working folder ahead of PYTHONPATH
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    notice = next((line for line in done.stderr.splitlines() if "busy with other processes" in line), "")
    return summary["train_seconds"] / summary["steps"], notice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", action="append", required=True, help="LABEL=PATH of an lmforge checkout (repeatable)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--busy-core", type=int, default=1, help="the core the busy loop is pinned to (-1: none)")
    parser.add_argument("--threads", default="default,1", help="settings to run: default (no OMP_NUM_THREADS) and/or N")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    hog = None
    if args.busy_core >= 0:
        hog = subprocess.Popen(["taskset", "-c", str(args.busy_core), sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
    print("| code | OMP_NUM_THREADS | s/step | load before -> after | lmforge's notice |")
    print("|---|---|---|---|---|")
    try:
        with tempfile.TemporaryDirectory(prefix="threads-bench-") as tmp:
            for _ in range(args.repeat):
                for spec in args.code:
                    label, path = spec.split("=", 1)
                    for threads in args.threads.split(","):
                        extra = {} if threads == "default" else {"OMP_NUM_THREADS": threads}
                        before = os.getloadavg()[0]
                        # one output folder per code tree: its tokenizer and shards are reused by its later runs
                        seconds, notice = run(Path(path).resolve(), args.steps, Path(tmp) / label, extra)
                        print(f"| {label} | {threads} | {seconds:.2f} | {before:.1f} -> {os.getloadavg()[0]:.1f} | {notice} |",
                              flush=True)
    finally:
        if hog:
            hog.kill()


if __name__ == "__main__":
    main()
