#!/usr/bin/env python
"""Benchmark: lmforge against its peers on the same examples in the same batches (LoRA, full fine-tuning, pretraining).

    nice -n 10 .venv/bin/python bench/sft_vs_peers.py                       # all three workloads
    nice -n 10 .venv/bin/python bench/sft_vs_peers.py --workload lora --steps 6 --warmup 2
    nice -n 10 .venv/bin/python bench/sft_vs_peers.py --workload pretrain --only lmforge,hf-clm

Fairness, the point of this script (its deleted predecessor, lora_vs_trl.py, let each tool pick its own batches):
- One batch file per workload, written once by this harness (``runs/<stamp>/<workload>/batches.json``):
  for each optimizer step, the examples of its micro-batch as token ids and labels (-100 = no loss).
  lora/full: GSM8K tokenized and truncated by lmforge's data pipeline from ``bench/lora_gsm8k_bench.yml``,
  batches chosen by length grouping (lmforge's ``batch_order``, the cheapest padding any tool's
  grouping gives); pretrain: Tiny Shakespeare tokenized with SmolLM2's tokenizer, cut into windows of
  ``--pretrain-seq`` tokens. Every runner reads that file, in order, with a sequential sampler.
- Each tool runs in its best CPU settings, measured in the same run: TRL with bf16 weights (LoRA) and
  its fp32 default, each padded and ``padding_free``; lmforge padded and packed (one row per batch).
  The table's ratios compare lmforge's best row with each peer's best row.
- Same model: SmolLM2-135M (the shipped GGUF, de-quantized once by lmforge; both tools load that
  folder); pretraining: a random-init Llama built by lmforge's ``build_model`` (preset 50M), saved once,
  loaded by both sides (same initial weights).
- Same settings: micro-batch 4, grad-accum 1, AdamW (torch) constant lr, clip 1.0, bf16 autocast,
  seq 512 (1024 for pretraining), no gradient checkpointing, seed 42.

Per row: real (non-pad) tokens/s over the timed steps (real tokens = the batch file's, identical for every
tool), MFU against the bf16 matmul ceiling measured in the same run, peak RSS (wait4 of the process,
measured from outside), first and last loss, the load average when the row started.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import common  # noqa: E402  (venv handling, ceiling shapes, RSS measurement, FLOPs model)

CONFIG = BENCH / "lora_gsm8k_bench.yml"
AXOLOTL_VENV = Path(os.environ.get("AXOLOTL_VENV") or BENCH / ".venv-axolotl")  # bench/setup_axolotl_venv.sh makes it
MICRO_BATCH = 4
WORKLOADS = ("lora", "full", "pretrain")

# (name, tool, workload set, runner options). The name is what --only filters on.
VARIANTS = [
    ("lmforge", "lmforge", {"lora", "full", "pretrain"}, {}),
    ("lmforge-packed", "lmforge", {"lora", "full"}, {"packed": True}),
    ("trl-bf16", "trl", {"lora"}, {"dtype": "bfloat16"}),
    ("trl-bf16-padding-free", "trl", {"lora"}, {"dtype": "bfloat16", "padding_free": True}),
    ("trl-default", "trl", {"lora", "full"}, {"dtype": "float32"}),
    ("trl-default-padding-free", "trl", {"lora", "full"}, {"dtype": "float32", "padding_free": True}),
    ("hf-clm", "hf", {"pretrain"}, {"dtype": "float32"}),
    ("axolotl", "axolotl", {"lora", "full"}, {}),
]
LABELS = {
    "lmforge": "lmforge (padded batches)",
    "lmforge-packed": "lmforge (batch packed into one row)",
    "trl-bf16": "TRL SFTTrainer, bf16 weights, padded",
    "trl-bf16-padding-free": "TRL SFTTrainer, bf16 weights, padding_free",
    "trl-default": "TRL SFTTrainer, default (fp32 weights; bf16 autocast under bf16), padded",
    "trl-default-padding-free": "TRL SFTTrainer, default (fp32 weights; bf16 autocast under bf16), padding_free",
    "hf-clm": "transformers Trainer (run_clm-style, fp32 weights; bf16 autocast under bf16)",
    "axolotl": "axolotl (fp32: it refuses bf16 on CPU)",
}


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the batch files


def sft_batches(steps: int, seed: int) -> dict:
    """GSM8K through lmforge's pipeline; the first `steps` length-grouped batches of epoch 0."""
    from lmforge.config import load_config
    from lmforge.data.batching import batch_order
    from lmforge.data.prepare import prepare
    from lmforge.models.load import config_tokenizer

    cfg = load_config(str(CONFIG), [])
    tok = config_tokenizer(cfg)
    data = prepare(cfg.data, tok, seed, save=False)
    lengths = [len(e) for e in data.train]
    order = [b for b in batch_order(lengths, MICRO_BATCH, seed, 0, True) if len(b) == MICRO_BATCH][:steps]
    batches = [[{"input_ids": list(data.train[i].input_ids), "labels": list(data.train[i].labels)} for i in b]
               for b in order]
    return {"micro_batch": MICRO_BATCH, "seq_len": cfg.data.sequence_len, "batches": batches,
            "source": f"{CONFIG.relative_to(REPO)} (GSM8K train), lmforge batch_order(group_by_length, seed {seed})"}


def window_batches(steps: int, seed: int, seq: int, model_dir: Path) -> dict:
    """Tiny Shakespeare windows of `seq` tokens with every token labelled (fine-tuning on long rows)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(Path(REPO / "data/tinyshakespeare/input.txt").read_text())["input_ids"]
    starts = list(range(0, len(ids) - seq, seq))
    random.Random(seed).shuffle(starts)
    windows = [ids[s : s + seq] for s in starts[: steps * MICRO_BATCH]]
    return {"micro_batch": MICRO_BATCH, "seq_len": seq, "source": f"Tiny Shakespeare, {seq}-token windows, all labelled",
            "batches": [[{"input_ids": w, "labels": w} for w in windows[i : i + MICRO_BATCH]]
                        for i in range(0, len(windows), MICRO_BATCH)]}


def pretrain_batches(steps: int, seed: int, seq: int, model_dir: Path, init_dir: Path, preset: str) -> dict:
    """Tiny Shakespeare windows of `seq` tokens (SmolLM2's tokenizer), and the random-init model saved to init_dir."""
    from transformers import AutoTokenizer

    from lmforge.models.build import build_config, build_model

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(Path(REPO / "data/tinyshakespeare/input.txt").read_text())["input_ids"]
    starts = list(range(0, len(ids) - seq, seq))
    random.Random(seed).shuffle(starts)
    windows = [ids[s : s + seq] for s in starts[: steps * MICRO_BATCH]]
    if not (init_dir / "config.json").exists():
        config = build_config("llama", len(tok), preset, {"max_position_embeddings": seq}, "clm",
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = build_model(config, "clm", seed=seed)
        model.save_pretrained(str(init_dir))
        tok.save_pretrained(str(init_dir))
    batches = [[{"input_ids": w, "labels": w} for w in windows[i : i + MICRO_BATCH]]
               for i in range(0, len(windows), MICRO_BATCH)]
    return {"micro_batch": MICRO_BATCH, "seq_len": seq, "batches": batches,
            "source": f"data/tinyshakespeare/input.txt, SmolLM2 tokenizer, {seq}-token windows shuffled with seed {seed}"}


# --------------------------------------------------------------------------- FLOPs


def measure_ceiling(dtype_name: str, seconds: float, threads: int) -> dict:
    """Best GEMM GFLOP/s of one dtype over common.CEILING_SHAPES (bf16 on a CPU without native bf16 is ~1 GFLOP/s:
    measuring it there would take minutes, and nothing runs in it)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    best, shapes = 0.0, []
    for m, k, n in common.CEILING_SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        c = torch.mm(a, b)
        rates = []
        for _ in range(3):
            it, t0 = 0, time.perf_counter()
            while (el := time.perf_counter() - t0) < seconds / 3 or it == 0:
                torch.mm(a, b, out=c)
                it += 1
            rates.append(2.0 * m * k * n * it / el / 1e9)
        shapes.append({"mkn": [m, k, n], "gflops": max(rates)})
        best = max(best, max(rates))
    return {"dtype": dtype_name, "gflops": best, "shapes": shapes, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def model_flops_per_token(workload: str, fm: dict, mean_seq: float) -> float:
    attention = 12 * fm["layers"] * fm["d_attn"] * mean_seq  # scores + weighted sum, fwd + bwd, no causal halving
    if workload == "lora":
        return 4 * fm["n_base"] + 6 * fm["n_lora"] + attention
    return 6 * fm["n_base"] + attention


# --------------------------------------------------------------------------- runners


def run_variant(name: str, tool: str, opts: dict, workload: str, ctx: dict, args: argparse.Namespace) -> dict:
    out = ctx["dir"] / name
    out.mkdir(exist_ok=True)
    result = out / "result.json"
    batches = str(ctx["batches"])
    env = common.child_env(args.threads)
    if tool == "lmforge":
        cmd = [sys.executable, str(BENCH / "lmforge_fixed_run.py"), "--config", str(CONFIG), "--batches", batches,
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--result", str(result)]
        if workload != "lora":
            cmd += ["--set", "adapter="]
        cmd += ["--set", f"bf16={'true' if args.precision == 'bf16' else 'false'}"]
        if workload == "pretrain":
            cmd += ["--init-dir", str(ctx["init_dir"]), "--set", f"sequence_len={ctx['seq']}"]
        elif args.model_dir:
            cmd += ["--set", f"base_model={ctx['model_dir']}", "--set", f"sequence_len={ctx['seq']}"]
        if opts.get("packed"):
            cmd.append("--packed")
        for kv in args.lmforge_set:
            cmd += ["--set", kv]
        env["PYTHONPATH"] = str(REPO)
    elif tool in ("trl", "hf"):
        common.ensure_trl_venv()
        peer = {"lora": "trl-lora", "full": "trl-full", "pretrain": "hf-clm"}[workload]
        model = ctx["init_dir"] if workload == "pretrain" else ctx["model_dir"]
        cmd = [str(common.trl_python()), str(BENCH / "peer_run.py"), "--tool", peer, "--model", str(model),
               "--batches", batches, "--warmup", str(args.warmup), "--seq-len", str(ctx["seq"]),
               "--model-dtype", opts["dtype"] if args.precision == "bf16" else "float32",
               "--precision", args.precision, "--threads", str(args.threads), "--output-dir", str(out / "trainer"),
               "--result", str(result)]
        if opts.get("padding_free"):
            cmd.append("--padding-free")
        cmd += ["--attn", args.peer_attn] + (["--liger"] if args.peer_liger else [])
        cmd += ["--load-in-4bit"] if args.peer_4bit and workload == "lora" else []
    elif tool == "axolotl":
        py = AXOLOTL_VENV / "bin" / "python"
        if not py.exists():
            raise common.BenchError(f"no axolotl venv at {AXOLOTL_VENV} (set AXOLOTL_VENV; see bench/README.md: axolotl)")
        cmd = [str(py), str(BENCH / "axolotl_run.py"), "--workload", workload, "--model", str(ctx["model_dir"]),
               "--batches", batches, "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--output-dir", str(out / "axolotl"), "--result", str(result)]
    else:
        raise ValueError(tool)
    load = os.getloadavg()[0]
    log(f"{workload}/{name}: {' '.join(cmd[1:3])} ... (load {load:.2f})")
    m = common.run_measured(cmd, out / "log.txt", env, args.timeout, rss_limit_mb=getattr(args, "rss_limit_mb", None))
    if m.get("rss_limited"):
        raise common.BenchError(f"out of memory: passed the {args.rss_limit_mb:,.0f} MB limit")
    if m["rc"] != 0 or not result.exists():
        raise common.BenchError(f"rc {m['rc']}{' (timed out)' if m['timed_out'] else ''}: {common.tail(out / 'log.txt', 12)}")
    r = json.loads(result.read_text())
    timed = ctx["spec"]["batches"][args.warmup:]
    real = sum(len(e["input_ids"]) for b in timed for e in b)
    sequences = sum(len(b) for b in timed)
    return {"name": name, "tool": LABELS[name], "real_tokens": real, "sequences": sequences,
            "train_seconds": r["train_seconds"], "tokens_per_s": real / r["train_seconds"],
            "tokens_per_cpu_s": real / r["train_cpu_seconds"] if r.get("train_cpu_seconds") else None,
            "counted_real_tokens": r.get("counted_real_tokens"), "first_loss": r.get("first_loss"),
            "last_loss": r.get("last_loss"), "trainable_params": r.get("trainable_params"), "load": load,
            "load_after": os.getloadavg()[0], **m, "raw": r}


# --------------------------------------------------------------------------- report


def render(workload: str, rows: list[dict], failures: dict, ceiling: dict, fm: dict, ctx: dict,
           args: argparse.Namespace) -> str:
    ceil = ceiling["gflops"]
    lines = [f"| tool | real tokens/s | MFU ({ceiling['dtype']} ceiling) | peak RSS MB | loss first → last | timed s | load avg "
             "| real tokens per CPU-s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r["gflops"] = model_flops_per_token(workload, fm, r["real_tokens"] / r["sequences"]) * r["tokens_per_s"] / 1e9
        r["mfu"] = r["gflops"] / ceil
        loss = f"{common.fmt(r['first_loss'], '.3f')} → {common.fmt(r['last_loss'], '.3f')}"
        lines.append(f"| {r['tool']} | {r['tokens_per_s']:.1f} | {r['mfu']:.1%} | {r['peak_rss_mb']:,.0f} | {loss} "
                     f"| {r['train_seconds']:.1f} | {r['load']:.2f}→{r['load_after']:.2f} | {common.fmt(r['tokens_per_cpu_s'], '.1f')} |")
    for name, why in failures.items():
        lines.append(f"| {LABELS[name]} | not run: {' '.join(why.split())[:160]} | | | | | | |")
    ours = [r for r in rows if r["name"].startswith("lmforge")]
    if ours:
        best = max(ours, key=lambda r: r["tokens_per_s"])
        peers: dict[str, dict] = {}
        for r in rows:
            if r["name"].startswith("lmforge"):
                continue
            family = r["name"].split("-")[0]
            if family not in peers or r["tokens_per_s"] > peers[family]["tokens_per_s"]:
                peers[family] = r
        for p in peers.values():
            lines.append(f"| **{best['name']} / best {p['name']}** | **{best['tokens_per_s'] / p['tokens_per_s']:.2f}×** "
                         f"| | **{best['peak_rss_mb'] / p['peak_rss_mb']:.2f}×** | | | | |")
    timed = ctx["spec"]["batches"][args.warmup:]
    real = sum(len(e["input_ids"]) for b in timed for e in b)
    slots = sum(max(len(e["input_ids"]) for e in b) * len(b) for b in timed)
    notes = [
        f"- Batches: {ctx['spec']['source']}; {args.warmup} warm-up + {len(timed)} timed steps of micro-batch "
        f"{MICRO_BATCH}; {real:,} real tokens in the timed steps (padded to the longest: {1 - real / slots:.1%} pad).",
        f"- Precision {args.precision} for every tool; ceiling: best {ceiling['dtype']} GEMM {ceiling['gflops']:.0f} GFLOP/s "
        f"(torch {ceiling['torch']}, {ceiling['threads']} threads). FLOPs/token: "
        + ("4·N_base + 6·N_lora + 12·L·d·s̄" if workload == "lora" else "6·N + 12·L·d·s̄")
        + f" with N_base = {fm['n_base']:,} (LM head included), N_lora = {fm['n_lora']:,}, L = {fm['layers']}, "
        f"d = {fm['d_attn']}.",
    ]
    for r in rows:
        c = r.get("counted_real_tokens")
        if c is not None and c != r["real_tokens"]:
            notes.append(f"- {r['name']}: its own loop counted {c:,} real tokens (the file has {r['real_tokens']:,}).")
    return "\n".join(lines + [""] + notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", action="append", choices=WORKLOADS, help="repeatable (default: all three)")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all; see VARIANTS)")
    ap.add_argument("--skip", default="", help="comma-separated variant names to leave out")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per tool (default 6)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pretrain-seq", type=int, default=1024)
    ap.add_argument("--pretrain-preset", default="50M", help="lmforge build_model preset for the random-init Llama")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="for every tool; auto: bf16 on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), else fp32 "
                    "(bf16 matmuls on an AVX2-only CPU run at ~1 GFLOP/s)")
    ap.add_argument("--ceiling-seconds", type=float, default=1.5, help="time per GEMM shape and dtype for the ceiling")
    ap.add_argument("--ceiling-gflops", type=float, default=0.0, help="use this bf16 ceiling instead of measuring it")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lmforge-set", action="append", default=[], help="config override for the lmforge runs (key=value)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--model-dir", default=None, help="HF folder to fine-tune instead of SmolLM2-135M (e.g. a 1B on a GPU)")
    ap.add_argument("--data", choices=["gsm8k", "windows"], default="gsm8k",
                    help="lora/full batches: GSM8K examples, or full Tiny Shakespeare windows of --seq tokens (all labelled)")
    ap.add_argument("--seq", type=int, default=512, help="window length for --data windows")
    ap.add_argument("--peer-attn", default="sdpa", help="attn_implementation for TRL / Trainer (flash_attention_2 on a GPU)")
    ap.add_argument("--peer-liger", action="store_true", help="TRL / Trainer with use_liger_kernel (GPU)")
    ap.add_argument("--peer-4bit", action="store_true", help="TRL LoRA on an NF4 base (QLoRA; pair with "
                    "--lmforge-set adapter=qlora --lmforge-set load_in_4bit=true)")
    ap.add_argument("--rss-limit-mb", type=float, default=None, help="kill a run whose RSS passes this (an OOM stand-in)")
    ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--install-trl-only", action="store_true", help="create the peers' venv (bench/.venv-trl) and exit")
    args = ap.parse_args()
    if args.install_trl_only:
        print(json.dumps(common.ensure_trl_venv()))
        return 0
    if args.nice:
        os.nice(args.nice)
    os.chdir(REPO)
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    workloads = args.workload or list(WORKLOADS)
    stamp = dt.datetime.now(dt.timezone.utc)
    run_root = BENCH / "runs" / ("peers-" + stamp.strftime("%Y%m%d-%H%M%S"))
    run_root.mkdir(parents=True, exist_ok=True)

    log(f"model folder and matmul ceiling (load {os.getloadavg()[0]:.2f})")
    model_dir = Path(args.model_dir).resolve() if args.model_dir else common.model_dir()
    import torch

    from lmforge.device import cpu_supports_bf16

    bf16 = args.precision == "bf16" or (args.precision == "auto" and (torch.cuda.is_available() or cpu_supports_bf16()))
    args.precision = "bf16" if bf16 else "fp32"
    if args.ceiling_gflops:  # a busy machine: the ceiling of a quiet run, given
        ceiling = {"dtype": "bfloat16" if bf16 else "float32", "gflops": args.ceiling_gflops, "torch": "given",
                   "threads": args.threads}
    else:
        code = (f"import json, sys; sys.path.insert(0, {str(BENCH)!r}); import sft_vs_peers as s; "
                f"print(json.dumps(s.measure_ceiling({'bfloat16' if bf16 else 'float32'!r}, {args.ceiling_seconds}, {args.threads})))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=common.child_env(args.threads))
        if r.returncode != 0:
            raise common.BenchError(f"ceiling measurement failed:\n{r.stderr[-2000:]}")
        ceiling = json.loads(r.stdout.strip().splitlines()[-1])
    log(f"precision {args.precision}; ceiling {ceiling['dtype']} {ceiling['gflops']:.0f} GFLOP/s (load {os.getloadavg()[0]:.2f})")

    sections = []
    for workload in workloads:
        wdir = run_root / workload
        wdir.mkdir()
        total = args.warmup + args.steps
        if workload == "pretrain":
            init_dir = run_root / "pretrain-init"
            init_dir.mkdir(exist_ok=True)
            spec = pretrain_batches(total, args.seed, args.pretrain_seq, model_dir, init_dir, args.pretrain_preset)
            fm_cfg = json.loads((init_dir / "config.json").read_text())
            seq = args.pretrain_seq
        else:
            init_dir = None
            spec = window_batches(total, args.seed, args.seq, model_dir) if args.data == "windows" else sft_batches(total, args.seed)
            fm_cfg = json.loads((model_dir / "config.json").read_text())
            seq = spec["seq_len"]
        batches = wdir / "batches.json"
        batches.write_text(json.dumps(spec))
        fm = common.flops_model(fm_cfg)
        ctx = {"dir": wdir, "batches": batches, "spec": spec, "model_dir": model_dir, "init_dir": init_dir, "seq": seq}
        rows, failures = [], {}
        for name, tool, sets, opts in VARIANTS:
            if workload not in sets or (only and name not in only) or name in skip:
                continue
            if args.precision == "fp32" and opts.get("dtype") == "bfloat16":
                continue  # fp32 everywhere: TRL's bf16-weights rows are its default rows
            try:
                rows.append(run_variant(name, tool, opts, workload, ctx, args))
                log(f"{workload}/{name}: {rows[-1]['tokens_per_s']:.1f} real tokens/s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB")
            except common.BenchError as exc:
                failures[name] = str(exc)
                log(f"{workload}/{name} failed: {exc}")
        table = render(workload, rows, failures, ceiling, fm, ctx, args)
        title = {"lora": "LoRA SFT, SmolLM2-135M, GSM8K, seq 512",
                 "full": "full fine-tuning, SmolLM2-135M, GSM8K, seq 512",
                 "pretrain": f"pretraining, random-init Llama ({args.pretrain_preset} preset), Tiny Shakespeare, "
                             f"seq {args.pretrain_seq}"}[workload]
        sections.append(f"### {title}\n\n{table}\n")
        print(sections[-1], flush=True)
        (wdir / "results.json").write_text(json.dumps({"rows": rows, "failures": failures, "ceiling": ceiling},
                                                      indent=2, default=str))
    m = common.machine_description()
    header = (f"## {stamp.strftime('%Y-%m-%d %H:%M UTC')}: lmforge vs peers on fixed batches (bench/sft_vs_peers.py)\n\n"
              f"`python bench/sft_vs_peers.py {' '.join(sys.argv[1:])}` on {m['cpu']}, {m['cpus']} CPUs, "
              f"{m.get('mem_gb')} GB; niced +{os.nice(0)}.\n")
    report = header + "\n" + "\n".join(sections)
    common.publish_report(report, run_root, append=not args.no_results)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except common.BenchError as exc:
        print(f"bench error: {exc}", file=sys.stderr)
        sys.exit(2)
