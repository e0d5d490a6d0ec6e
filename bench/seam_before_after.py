#!/usr/bin/env python
"""Benchmark: lmforge before vs after a change, on the same batches, interleaved (issue 22: "no slowdown, ±5%").

    git worktree add --detach /tmp/lmforge-before b61e8e0        # main just before the objective seam
    nice -n 10 .venv/bin/python bench/seam_before_after.py --before /tmp/lmforge-before --rounds 3 --threads 1

The project benchmark's lmforge side (``bench/sft_vs_peers.py --only lmforge``, workloads lora and pretrain),
run by two checkouts of lmforge:
- One batch file per workload, written once by this checkout with sft_vs_peers' own builders (GSM8K through
  lmforge's pipeline, length-grouped; Tiny Shakespeare windows and a random-init Llama saved once), read by both.
- Each side runs its own ``bench/lmforge_fixed_run.py`` with its own lmforge (the runner imports the checkout
  it sits in), so each trains the way its code did: "before" with the loss function its recipes passed,
  "after" with the objective its TrainingRun passes. Same model folder, settings, precision and threads.
- Runs alternate between the sides (``--order abba``: before, after, after, before, ...; ``abab`` too), so a
  load that drifts during the run (a shared machine) weighs on both alike. Each round's ratio is after/before
  of its two runs; the table gives each run, the median ratio and the spread (min to max) of the rounds.

Per run: real (non-pad) tokens/s over the timed steps (the batch file's tokens, the same for both sides),
real tokens per CPU-second of the training process (moves far less than wall time on a loaded machine),
the losses (both sides must train alike: same first and last loss), and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import common  # noqa: E402  (measured child runs, the model folder, the machine's description)

WORKLOADS = ("lora", "pretrain")


def batch_file(workload: str, args: argparse.Namespace, run_root: Path, model_dir: Path) -> tuple[Path, dict, Path | None]:
    """The workload's batch file (and the pretraining init folder), built once by this checkout."""
    import sft_vs_peers as peers

    total = args.warmup + args.steps
    init_dir = None
    if workload == "pretrain":
        init_dir = run_root / "pretrain-init"
        init_dir.mkdir(exist_ok=True)
        spec = peers.pretrain_batches(total, args.seed, args.pretrain_seq, model_dir, init_dir, args.pretrain_preset)
    else:
        spec = peers.sft_batches(total, args.seed)
    path = run_root / f"{workload}-batches.json"
    path.write_text(json.dumps(spec))
    return path, spec, init_dir


def run_side(side: str, checkout: Path, workload: str, batches: Path, init_dir: Path | None, model_dir: Path,
             seq: int, out: Path, args: argparse.Namespace) -> dict:
    """One run of `checkout`'s own fixed-batch runner; its result JSON plus the load around it."""
    result = out / "result.json"
    cmd = [sys.executable, str(checkout / "bench" / "lmforge_fixed_run.py"), "--config",
           str(checkout / "bench" / "lora_gsm8k_bench.yml"), "--batches", str(batches), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--result", str(result),
           "--set", f"bf16={'true' if args.precision == 'bf16' else 'false'}"]
    if workload == "pretrain":
        cmd += ["--set", "adapter=", "--init-dir", str(init_dir), "--set", f"sequence_len={seq}"]
    else:
        cmd += ["--set", f"base_model={model_dir}"]
    if args.ops:  # the same runner, its timed steps under torch.profiler (profile_child)
        cmd[1:2] = [str(Path(__file__).resolve()), "--profile-child", str(checkout), str(out / "ops.json"), cmd[1]]
    load = os.getloadavg()[0]
    common.log(f"{workload}/{side}: {checkout} (load {load:.2f})")
    m = common.run_measured(cmd, out / "log.txt", common.child_env(args.threads), args.timeout, cwd=checkout)
    if m["rc"] != 0 or not result.exists():
        raise common.BenchError(f"{workload}/{side} rc {m['rc']}: {common.tail(out / 'log.txt', 12)}")
    ops = json.loads((out / "ops.json").read_text()) if args.ops else None
    return {**json.loads(result.read_text()), "load": load, "load_after": os.getloadavg()[0],
            "peak_rss_mb": m["peak_rss_mb"], "ops": ops}


def profile_child(checkout: Path, ops_file: Path, runner: Path, runner_args: list[str]) -> None:
    """Run `checkout`'s runner with its second train_loop call (the timed steps) under torch.profiler, and write
    how often each op ran with which input shapes: the work a step asks of the CPU, whatever the machine's load."""
    import runpy

    import torch

    sys.path.insert(0, str(checkout))  # before this checkout's own lmforge is imported (the runner does the same)
    import lmforge.train.loop as loop

    original, calls = loop.train_loop, []

    def profiled(*a: object, **k: object) -> object:
        calls.append(1)
        if len(calls) == 1:  # the warm-up steps
            return original(*a, **k)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            result = original(*a, **k)
        counts = {f"{e.key} {e.input_shapes}": e.count for e in prof.key_averages(group_by_input_shape=True)}
        ops_file.write_text(json.dumps(counts, indent=0, sort_keys=True))
        return result

    loop.train_loop = profiled
    sys.argv = [str(runner), *runner_args]
    runpy.run_path(str(runner), run_name="__main__")


def compare_ops(workload: str, runs: list[dict]) -> str:
    """Whether both sides' timed steps ran the same ops on the same shapes, the same number of times."""
    before = next(r["ops"] for r in runs if r["side"] == "before")
    after = next(r["ops"] for r in runs if r["side"] == "after")
    differ = sorted(k for k in set(before) | set(after) if before.get(k, 0) != after.get(k, 0))
    total = (sum(before.values()), sum(after.values()))
    line = (f"- {workload} ops: before {total[0]:,} op calls in {len(before):,} (op, input shapes) kinds, after "
            f"{total[1]:,} in {len(after):,}; ")
    if not differ:
        return line + "identical."
    shown = "; ".join(f"`{k[:100]}` {before.get(k, 0)} → {after.get(k, 0)}" for k in differ[:12])
    return line + f"{len(differ)} differ: {shown}" + (" ..." if len(differ) > 12 else "")


def order(rounds: int, pattern: str) -> list[tuple[int, str]]:
    """(round, side) in run order: abab = before, after each round; abba = the first side alternates."""
    runs = []
    for r in range(rounds):
        pair = ["before", "after"] if pattern == "abab" or r % 2 == 0 else ["after", "before"]
        runs += [(r, side) for side in pair]
    return runs


def summarize(workload: str, runs: list[dict], spec: dict, args: argparse.Namespace) -> tuple[str, dict]:
    timed = spec["batches"][args.warmup:]
    real = sum(len(e["input_ids"]) for b in timed for e in b)
    for r in runs:
        r["tokens_per_s"] = real / r["train_seconds"]
        r["tokens_per_cpu_s"] = real / r["train_cpu_seconds"]
    lines = ["| round | side | real tokens/s | real tokens per CPU-s | loss first → last | timed s | load avg |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['round'] + 1} | {r['side']} | {r['tokens_per_s']:.1f} | {r['tokens_per_cpu_s']:.1f} "
                     f"| {r['first_loss']:.4f} → {r['last_loss']:.4f} | {r['train_seconds']:.1f} "
                     f"| {r['load']:.2f}→{r['load_after']:.2f} |")
    stats: dict = {"real_tokens": real}
    for key, label in (("tokens_per_s", "tokens/s"), ("tokens_per_cpu_s", "tokens per CPU-s")):
        ratios = []
        for rnd in sorted({r["round"] for r in runs}):
            pair = {r["side"]: r[key] for r in runs if r["round"] == rnd}
            ratios.append(pair["after"] / pair["before"])
        before = statistics.median(r[key] for r in runs if r["side"] == "before")
        after = statistics.median(r[key] for r in runs if r["side"] == "after")
        stats[key] = {"before_median": before, "after_median": after, "ratios": ratios,
                      "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)}
        lines.append(f"| **after / before** | {label} | **{statistics.median(ratios):.3f}** (rounds {min(ratios):.3f} to "
                     f"{max(ratios):.3f}; medians {before:.1f} → {after:.1f}) | | | | |")
    return "\n".join(lines), stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="a checkout of the older commit (git worktree add --detach DIR REV)")
    ap.add_argument("--after", default=str(REPO), help="the newer checkout (default: this one)")
    ap.add_argument("--workload", action="append", choices=WORKLOADS, help="repeatable (default: lora and pretrain)")
    ap.add_argument("--rounds", type=int, default=3, help="before/after pairs per workload (default 3)")
    ap.add_argument("--order", choices=["abba", "abab"], default="abba")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run (default 4)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--pretrain-seq", type=int, default=1024)
    ap.add_argument("--pretrain-preset", default="50M")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 on a CPU with native bf16 (AVX512-BF16/AMX) or a GPU, else fp32")
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--ops", action="store_true", help="one run per side with its timed steps under torch.profiler: "
                    "compare the ops and shapes each step runs (load-independent), instead of timing rounds")
    ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    if sys.argv[1:2] == ["--profile-child"]:  # internal: one side's runner under the profiler (see --ops)
        checkout, ops_file, runner, *rest = sys.argv[2:]
        profile_child(Path(checkout), Path(ops_file), Path(runner), rest)
        return 0
    args = ap.parse_args()
    if args.ops:
        args.rounds = 1
    sides = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    for side, path in sides.items():
        if not (path / "bench" / "lmforge_fixed_run.py").is_file():
            print(f"bench error: --{side} {path} has no bench/lmforge_fixed_run.py (a checkout of lmforge?)", file=sys.stderr)
            return 2
    if args.nice:
        os.nice(args.nice)
    revs = {side: subprocess.run(["git", "-C", str(path), "log", "-1", "--format=%h %s"], capture_output=True,
                                 text=True).stdout.strip()[:90] for side, path in sides.items()}
    stamp = dt.datetime.now(dt.timezone.utc)
    run_root = BENCH / "runs" / ("seam-" + stamp.strftime("%Y%m%d-%H%M%S"))
    run_root.mkdir(parents=True)
    if args.precision == "auto":
        import torch

        from lmforge.device import cpu_supports_bf16

        args.precision = "bf16" if torch.cuda.is_available() or cpu_supports_bf16() else "fp32"
    model_dir = common.model_dir()
    sections, record = [], {"revs": revs, "args": vars(args), "workloads": {}}
    for workload in args.workload or list(WORKLOADS):
        batches, spec, init_dir = batch_file(workload, args, run_root, model_dir)
        runs = []
        for rnd, side in order(args.rounds, args.order):
            out = run_root / workload / f"{rnd + 1}-{side}"
            out.mkdir(parents=True)
            r = run_side(side, sides[side], workload, batches, init_dir, model_dir, spec["seq_len"], out, args)
            runs.append({"round": rnd, "side": side, **r})
            common.log(f"{workload}/{side} round {rnd + 1}: {r['train_seconds']:.1f} s timed, loss {r['last_loss']:.4f}")
        table, stats = summarize(workload, runs, spec, args)
        if args.ops:
            table += "\n\n" + compare_ops(workload, runs)
            for r in runs:
                r.pop("ops")
        record["workloads"][workload] = {"runs": runs, "stats": stats, "source": spec["source"]}
        title = {"lora": "LoRA SFT, SmolLM2-135M, GSM8K, seq 512",
                 "pretrain": f"pretraining, random-init Llama ({args.pretrain_preset}), Tiny Shakespeare, seq {args.pretrain_seq}"}
        profiled = " (--ops: timed under torch.profiler, so the times are not the benchmark's)" if args.ops else ""
        sections.append(f"### {title[workload]}{profiled}\n\n{table}\n\n- Batches: {spec['source']}; {args.warmup} warm-up + "
                        f"{args.steps} timed steps of micro-batch {spec['micro_batch']}, {stats['real_tokens']:,} real "
                        "tokens timed per run.\n")
        print(sections[-1], flush=True)
    (run_root / "results.json").write_text(json.dumps(record, indent=2, default=str))
    m = common.machine_description()
    header = (f"## {stamp.strftime('%Y-%m-%d %H:%M UTC')}: before vs after, same batches (bench/seam_before_after.py)\n\n"
              f"`python bench/seam_before_after.py {' '.join(sys.argv[1:])}`; before = `{revs['before']}`, "
              f"after = `{revs['after']}`. {m['cpu']}, {m['cpus']} CPUs, {m.get('mem_gb')} GB, CPU flags: {common.cpu_flags()}; "
              f"precision {args.precision}, {args.threads} torch thread(s), niced +{os.nice(0)}, runs in {args.order} order. "
              "The machine was shared with other jobs (see the load averages).\n")
    report = header + "\n" + "\n".join(sections)
    common.publish_report(report, run_root, append=not args.no_results)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except common.BenchError as exc:  # a failed run: one line, not a traceback
        print(f"bench error: {exc}", file=sys.stderr)
        sys.exit(2)
