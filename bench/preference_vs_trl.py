#!/usr/bin/env python
"""Benchmark: lmforge's LoRA DPO and GRPO against TRL 1.16's DPOTrainer and GRPOTrainer, on the same batches.

    nice -n 10 .venv/bin/python bench/preference_vs_trl.py                          # dpo and grpo, 2 rounds (a b b a)
    nice -n 10 .venv/bin/python bench/preference_vs_trl.py --method dpo --rounds 4 --steps 6
    nice -n 10 .venv/bin/python bench/preference_vs_trl.py --method grpo --trl trl-bf16,trl-fp32

Fairness, as in ``sft_vs_peers.py``:
- One batch file per method, written once (``runs/pref-<stamp>/<method>/batches.json``), read by both runners in order.
  dpo: the first pairs of data/gsm8k_preferences/train.jsonl in file order (prepared by lmforge's pipeline from
  examples/smollm2-135m/dpo-gsm8k.yml: chat template, EOS, TRL's truncation), as prompt / chosen / rejected ids,
  micro-batch 4 pairs. grpo: the first prompts of data/gsm8k/train.jsonl (chat-templated by the example's
  transform), 2 prompts x num_generations 4 per step, micro-batch 4, gradient accumulation 2; completions sampled
  with min_new_tokens = max_completion_length on both sides, so every step has the same token count.
- Same model (SmolLM2-135M-Instruct from the shipped GGUF, de-quantized once; TRL loads that folder), LoRA r 16,
  alpha 32, no dropout, all linear layers; AdamW (torch), constant lr, clip 1.0, seed 42; beta 0.1 (dpo) / 0.04 (grpo,
  with the reference's log-probabilities: the adapter disabled on both sides); no eval, no checkpoints.
- TRL in its best CPU settings, measured in the same run (``--trl``): bf16 weights + bf16 autocast (``trl-bf16``), or
  its default fp32 weights + bf16 autocast (``trl-fp32``); lmforge under bf16: auto.
- Interleaved: round i runs lmforge then TRL when i is even, TRL then lmforge when odd (a b b a ...), so a drifting
  load on the shared machine weighs on both. The table gives the median and the spread (min-max) over rounds and
  the load average at each run's start and end; on a shared machine only the ratios mean anything.

Per row: real (non-pad) tokens/s of the timed steps (the batch file's tokens: dpo, prompt + answer of both rows of a
pair; grpo, prompt + completion of each completion), MFU against the bf16 matmul ceiling measured in the same run,
peak RSS (wait4 from outside), and for GRPO the time per step in sampling, in the reference's log-probabilities and
in the rest (the loss's forward and backward, the optimizer, scoring).
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

import common  # noqa: E402

EXAMPLES = REPO / "examples" / "smollm2-135m"
CONFIGS = {"dpo": EXAMPLES / "dpo-gsm8k.yml", "grpo": EXAMPLES / "grpo-gsm8k.yml"}
TRL_VARIANTS = {"trl-bf16": "bfloat16", "trl-fp32": "float32"}  # model weights' dtype; both train under bf16 autocast
SETTINGS = {
    "dpo": {"micro_batch": 4, "grad_accum": 1, "lr": 5e-4, "beta": 0.1, "seq_len": 512},
    "grpo": {"micro_batch": 4, "grad_accum": 2, "lr": 5e-4, "beta": 0.04, "num_generations": 4, "max_completion_length": 32,
             "temperature": 0.9, "reward_weights": [1.0, 0.5]},
}


def log(msg: str) -> None:
    print(f"[pref {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dpo_batches(steps: int, seed: int) -> dict:
    """The first steps x 4 pairs of the shipped train file, through lmforge's preference pipeline, in file order."""
    from lmforge.config import load_config
    from lmforge.data.preference import prepare_preferences
    from lmforge.models.load import config_tokenizer

    s = dict(SETTINGS["dpo"], seed=seed, lora_r=16, lora_alpha=32)
    cfg = load_config(str(CONFIGS["dpo"]), [])
    tok = config_tokenizer(cfg)
    data = prepare_preferences(cfg.data, tok, seed, max_prompt_len=cfg.rl.max_prompt_len)
    need = steps * s["micro_batch"]
    if len(data.train) < need:
        raise common.BenchError(f"{need} pairs wanted, the train file gives {len(data.train)}: lower --steps")
    pairs = [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in data.train[:need]]
    batches = [pairs[i:i + s["micro_batch"]] for i in range(0, need, s["micro_batch"])]
    return {"method": "dpo", "settings": s, "batches": batches,
            "source": f"the first {need} pairs of data/gsm8k_preferences/train.jsonl ({CONFIGS['dpo'].relative_to(REPO)})"}


def grpo_batches(steps: int, seed: int) -> dict:
    """The first prompts of the example's GSM8K prompt set (its transform, its chat template), 2 per step."""
    from lmforge.config import load_config
    from lmforge.data.prompt_sets import prepare_prompts
    from lmforge.models.load import config_tokenizer

    s = dict(SETTINGS["grpo"], seed=seed, lora_r=16, lora_alpha=32)
    cfg = load_config(str(CONFIGS["grpo"]), ["--val_set_size=0"])
    tok = config_tokenizer(cfg)
    per_step = s["micro_batch"] * s["grad_accum"] // s["num_generations"]
    data = prepare_prompts(cfg.data, tok, seed, cfg.flat(), cfg.rl.trl.chat_template_kwargs)
    prompts = [{"prompt_ids": list(p.ids), "value": p.value, "answer": p.columns["answer"]}
               for p in data.train[:steps * per_step]]
    return {"method": "grpo", "settings": s, "batches": [prompts[i:i + per_step] for i in range(0, len(prompts), per_step)],
            "source": f"the first {steps * per_step} prompts of data/gsm8k/train.jsonl ({CONFIGS['grpo'].relative_to(REPO)})"}


def step_tokens(spec: dict, warmup: int) -> tuple[int, int, int]:
    """(real tokens, generated tokens, prompt tokens) of the timed steps."""
    timed = spec["batches"][warmup:]
    if spec["method"] == "dpo":
        real = sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for b in timed for p in b)
        return real, 0, sum(2 * len(p["prompt_ids"]) for b in timed for p in b)
    s = spec["settings"]
    group, width = s["num_generations"], s["max_completion_length"]
    prompt = sum(group * len(p["prompt_ids"]) for b in timed for p in b)
    generated = sum(group * width for b in timed for _ in b)
    return prompt + generated, generated, prompt


def flops(spec: dict, warmup: int, fm: dict) -> float:
    """Model FLOPs of the timed steps: matmuls (2 per weight per token forward, 4 backward; LoRA's frozen base needs
    only the input gradient, 2) and attention (12 x layers x width x mean length per token, forward and backward)."""
    real, generated, prompt = step_tokens(spec, warmup)
    n_base, n_lora = fm["n_base"], fm["n_lora"]
    if spec["method"] == "dpo":
        timed = spec["batches"][warmup:]
        rows = 2 * sum(len(b) for b in timed)
        mean = real / rows
        attention = 12 * fm["layers"] * fm["d_attn"] * mean
        train = (4 * n_base + 6 * n_lora + attention) * real
        return train + (2 * n_base + attention / 3) * real  # + the reference's forward
    s = spec["settings"]
    mean = real / (len(spec["batches"][warmup:]) * s["micro_batch"] * s["grad_accum"])
    attention = 12 * fm["layers"] * fm["d_attn"] * mean
    sampling = 2 * (n_base + n_lora) * real  # prefill + one token at a time (cache; LoRA unmerged)
    reference = (2 * n_base + attention / 3) * real
    train = (4 * n_base + 6 * n_lora + attention) * real
    return sampling + reference + train


def run_one(tool: str, method: str, ctx: dict, args: argparse.Namespace, index: int) -> dict:
    out = ctx["dir"] / f"{tool}-{index}"
    out.mkdir(exist_ok=True)
    result = out / "result.json"
    env = common.child_env(args.threads)
    if tool == "lmforge":
        cmd = [sys.executable, str(BENCH / "preference_lmforge_run.py"), "--method", method, "--config", str(CONFIGS[method]),
               "--batches", str(ctx["batches"]), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--result", str(result)] + [x for kv in args.lmforge_set for x in ("--set", kv)]
        env["PYTHONPATH"] = str(REPO)
    else:
        cmd = [str(common.trl_python()), str(BENCH / "preference_trl_run.py"), "--method", method, "--model", str(ctx["model_dir"]),
               "--batches", str(ctx["batches"]), "--warmup", str(args.warmup), "--model-dtype", TRL_VARIANTS[tool],
               "--precision", "bf16", "--threads", str(args.threads), "--output-dir", str(out / "trainer"),
               "--rewards", str(EXAMPLES / "rewards.py"), "--result", str(result)]
    load = os.getloadavg()[0]
    log(f"{method}/{tool} #{index} (load {load:.2f})")
    m = common.run_measured(cmd, out / "log.txt", env, args.timeout)
    if m["rc"] != 0 or not result.exists():
        raise common.BenchError(f"{method}/{tool} rc {m['rc']}{' (timed out)' if m['timed_out'] else ''}: {common.tail(out / 'log.txt', 15)}")
    r = json.loads(result.read_text())
    real, generated, _ = step_tokens(ctx["spec"], args.warmup)
    row = {"tool": tool, "index": index, "tokens_per_s": real / r["train_seconds"], "train_seconds": r["train_seconds"],
           "tokens_per_cpu_s": real / r["train_cpu_seconds"] if r.get("train_cpu_seconds") else None,
           "peak_rss_mb": m["peak_rss_mb"], "load": load, "load_after": os.getloadavg()[0],
           "first_loss": r.get("first_loss"), "last_loss": r.get("last_loss"), "raw": r}
    steps = len(ctx["spec"]["batches"]) - args.warmup
    if method == "grpo":
        row["generation_s_per_step"] = r["generation_seconds"] / steps
        row["reference_s_per_step"] = r["reference_seconds"] / steps
        row["rest_s_per_step"] = (r["train_seconds"] - r["generation_seconds"] - r["reference_seconds"]) / steps
        row["generated_tokens_per_s"] = generated / r["generation_seconds"] if r["generation_seconds"] else None
        if r.get("generation_cpu_seconds") is not None and r.get("train_cpu_seconds"):  # CPU time: steadier under load
            row["generation_cpu_per_step"] = r["generation_cpu_seconds"] / steps
            row["reference_cpu_per_step"] = r["reference_cpu_seconds"] / steps
            row["rest_cpu_per_step"] = (r["train_cpu_seconds"] - r["generation_cpu_seconds"] - r["reference_cpu_seconds"]) / steps
    log(f"{method}/{tool} #{index}: {row['tokens_per_s']:.1f} tokens/s, peak RSS {row['peak_rss_mb']:.0f} MB")
    return row


def spread(values: list[float], spec: str = ".1f") -> str:
    med = statistics.median(values)
    return f"{med:{spec}} ({min(values):{spec}}–{max(values):{spec}})" if len(values) > 1 else f"{med:{spec}}"


def render(method: str, runs: list[dict], tools: list[str], ceiling: dict, fm: dict, ctx: dict, args: argparse.Namespace) -> str:
    total_flops = flops(ctx["spec"], args.warmup, fm)
    grpo = method == "grpo"
    head = ("| tool | runs | real tokens/s, median (min–max) | real tokens per CPU-s | MFU (bf16 ceiling) | peak RSS MB "
            "| loss first → last | load avg |")
    if grpo:
        head += " sampling s/step | reference s/step | rest s/step | generated tokens/s | sampling / reference / rest CPU-s per step |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    medians = {}
    for tool in tools:
        rows = [r for r in runs if r["tool"] == tool]
        if not rows:
            continue
        tps = [r["tokens_per_s"] for r in rows]
        secs = statistics.median(r["train_seconds"] for r in rows)
        mfu = total_flops / secs / 1e9 / ceiling["gflops"]
        rss = [r["peak_rss_mb"] for r in rows]
        cpu = [r["tokens_per_cpu_s"] for r in rows if r.get("tokens_per_cpu_s")]
        medians[tool] = {"tps": statistics.median(tps), "rss": statistics.median(rss),
                         "cpu": statistics.median(cpu) if cpu else None}
        loss = f"{common.fmt(rows[0]['first_loss'], '.3f')} → {common.fmt(rows[0]['last_loss'], '.3f')}"
        loads = f"{min(r['load'] for r in rows):.1f}–{max(r['load_after'] for r in rows):.1f}"
        line = (f"| {tool} | {len(rows)} | {spread(tps)} | {spread(cpu) if cpu else 'n/a'} | {mfu:.1%} | {spread(rss, ',.0f')} "
                f"| {loss} | {loads} |")
        if grpo:
            line += (f" {spread([r['generation_s_per_step'] for r in rows], '.2f')} | {spread([r['reference_s_per_step'] for r in rows], '.2f')} "
                     f"| {spread([r['rest_s_per_step'] for r in rows], '.2f')} | {spread([r['generated_tokens_per_s'] for r in rows])} |")
            cpu_rows = [r for r in rows if r.get("generation_cpu_per_step") is not None]
            line += (" " + " / ".join(f"{statistics.median(r[k] for r in cpu_rows):.2f}" for k in
                                      ("generation_cpu_per_step", "reference_cpu_per_step", "rest_cpu_per_step")) + " |"
                     if cpu_rows else " n/a |")
        lines.append(line)
    ours = medians.get("lmforge")
    for tool, m in medians.items():
        if tool == "lmforge" or not ours:
            continue
        per_round = []
        for i in range(args.rounds):
            a = [r for r in runs if r["tool"] == "lmforge" and r["index"] == i]
            b = [r for r in runs if r["tool"] == tool and r["index"] == i]
            if a and b:
                per_round.append(a[0]["tokens_per_s"] / b[0]["tokens_per_s"])
        cpu_ratio = f"**{ours['cpu'] / m['cpu']:.2f}×**" if ours["cpu"] and m["cpu"] else ""
        lines.append(f"| **lmforge / {tool}** | | **{ours['tps'] / m['tps']:.2f}×** (per round {', '.join(f'{x:.2f}' for x in per_round)}) "
                     f"| {cpu_ratio} | | **{ours['rss'] / m['rss']:.2f}×** | | |" + (" | | | | |" if grpo else ""))
    real, generated, prompt = step_tokens(ctx["spec"], args.warmup)
    steps = len(ctx["spec"]["batches"]) - args.warmup
    notes = [f"- Batches: {ctx['spec']['source']}; {args.warmup} warm-up + {steps} timed steps; {real:,} real tokens timed "
             f"({prompt:,} of them prompt tokens" + (f", {generated:,} sampled" if grpo else "") + ").",
             f"- Ceiling: {ceiling['dtype']} GEMM {ceiling['gflops']:.0f} GFLOP/s ({ceiling.get('threads')} threads), measured in this run; "
             f"MFU counts {total_flops / 1e12:.2f} TFLOP for the timed steps (policy forward + backward, the reference's forward"
             + (", sampling" if grpo else "") + ")."]
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def rerender(args: argparse.Namespace) -> int:
    """The tables of a finished run again, from its batches.json and results.json (same --warmup and --rounds)."""
    fm = common.flops_model(json.loads((common.model_dir() / "config.json").read_text()))
    for wdir in sorted(p for p in args.rerender.iterdir() if (p / "results.json").exists()):
        spec = json.loads((wdir / "batches.json").read_text())
        saved = json.loads((wdir / "results.json").read_text())
        tools = list(dict.fromkeys(r["tool"] for r in saved["runs"]))
        tools = ["lmforge", *[t for t in tools if t != "lmforge"]]
        print(f"### {spec['method']}\n\n{render(spec['method'], saved['runs'], tools, saved['ceiling'], fm, {'spec': spec}, args)}\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", action="append", choices=["dpo", "grpo"], help="repeatable; default both")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each runs both tools, order alternating (a b b a)")
    ap.add_argument("--trl", default="trl-bf16", help="TRL variants, comma-separated: " + ", ".join(TRL_VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--ceiling-seconds", type=float, default=3.0)
    ap.add_argument("--lmforge-set", action="append", default=[], help="lmforge config override key=value (a lever)")
    ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--rerender", type=Path, default=None, help="print the tables of a finished run folder (runs/pref-*) again")
    args = ap.parse_args()
    os.chdir(REPO)
    if args.rerender:
        return rerender(args)
    methods = args.method or ["dpo", "grpo"]
    trl_tools = [t for t in args.trl.split(",") if t]
    for t in trl_tools:
        if t not in TRL_VARIANTS:
            raise common.BenchError(f"unknown TRL variant {t}; use {', '.join(TRL_VARIANTS)}")
    versions = common.ensure_trl_venv()
    stamp = dt.datetime.now(dt.timezone.utc)
    root = BENCH / "runs" / ("pref-" + stamp.strftime("%Y%m%d-%H%M%S"))
    root.mkdir(parents=True, exist_ok=True)
    model_dir = common.model_dir()
    code = (f"import json, sys; sys.path.insert(0, {str(BENCH)!r}); import sft_vs_peers as s; "
            f"print(json.dumps(s.measure_ceiling('bfloat16', {args.ceiling_seconds}, {args.threads})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=common.child_env(args.threads))
    if r.returncode != 0:
        raise common.BenchError(f"ceiling measurement failed:\n{r.stderr[-2000:]}")
    ceiling = json.loads(r.stdout.strip().splitlines()[-1])
    log(f"bf16 ceiling {ceiling['gflops']:.0f} GFLOP/s (load {os.getloadavg()[0]:.2f})")
    fm = common.flops_model(json.loads((model_dir / "config.json").read_text()))
    sections = []
    for method in methods:
        wdir = root / method
        wdir.mkdir()
        spec = (dpo_batches if method == "dpo" else grpo_batches)(args.warmup + args.steps, args.seed)
        batches = wdir / "batches.json"
        batches.write_text(json.dumps(spec))
        ctx = {"dir": wdir, "batches": batches, "spec": spec, "model_dir": model_dir}
        tools = ["lmforge", *trl_tools]
        runs = []
        for i in range(args.rounds):
            for tool in (tools if i % 2 == 0 else tools[::-1]):
                runs.append(run_one(tool, method, ctx, args, i))
        (wdir / "results.json").write_text(json.dumps({"runs": runs, "ceiling": ceiling}, indent=2, default=str))
        title = {"dpo": "LoRA DPO (sigmoid, beta 0.1), SmolLM2-135M-Instruct, GSM8K preference pairs, micro-batch 4 pairs",
                 "grpo": "LoRA GRPO (beta 0.04, dapo), SmolLM2-135M-Instruct, GSM8K prompts, 2 prompts x 4 completions of 32 tokens per step"}[method]
        sections.append(f"### {title}\n\n{render(method, runs, tools, ceiling, fm, ctx, args)}\n")
        print(sections[-1], flush=True)
    m = common.machine_description()
    header = (f"## {stamp.strftime('%Y-%m-%d %H:%M UTC')}: lmforge vs TRL {versions.get('trl')}, LoRA DPO and GRPO on fixed batches "
              f"(bench/preference_vs_trl.py)\n\n`python bench/preference_vs_trl.py {' '.join(sys.argv[1:])}` on {m['cpu']} "
              f"({common.cpu_flags()}), {m['cpus']} CPUs, {m.get('mem_gb')} GB, shared with other jobs; niced +{os.nice(0)}; "
              f"{args.threads} threads per run; torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
              f"peft {versions.get('peft')} on both sides.\n")
    report = header + "\n" + "\n".join(sections)
    common.publish_report(report, root, append=not args.no_results)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except common.BenchError as exc:
        print(f"bench error: {exc}", file=sys.stderr)
        sys.exit(2)
