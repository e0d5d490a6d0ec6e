#!/usr/bin/env bash
# Scale-out on this CPU (issue 11): the real SmolLM2-135M, LoRA on GSM8K, one process vs 2 gloo ranks
# (DDP and FSDP2) with the same global batch (micro_batch_size 2 x 2 micro-batches per step), `bf16: auto`
# (bf16 where the CPU has native bf16, else fp32: emulated bf16 on an AVX2-only CPU is ~100x slower).
# Prints one row per run: engine, ranks, final loss, tokens/s (real tokens, first 2 steps excluded), peak memory.
# 2 ranks on 2 cores get one thread each (torchrun's default), one process gets both: the honest comparison.
# Usage: [SEQ=256] bash bench/cpu_distributed.sh [STEPS]   (from the repository root, after scripts/setup.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
steps=${1:-8}
common=(bench/lora_gsm8k_bench.yml --max_steps="$steps" --save_steps=1000 --micro_batch_size=2 --sequence_len="${SEQ:-256}" --bf16=auto)
fsdp='--fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}'
run() {  # NAME NPROC, then overrides
  local name=$1 nproc=$2; shift 2
  local out=/tmp/cpu-dist/$name
  rm -rf "$out"
  if ! python -m lmforge train "${common[@]}" --output_dir="$out" --nproc "$nproc" "$@" > "/tmp/cpu-dist-$name.log" 2>&1; then
    echo "$name: FAILED (/tmp/cpu-dist-$name.log)"; grep -E "error" "/tmp/cpu-dist-$name.log" | tail -3; return
  fi
  python - "$name" "$out" <<'PY'
import json, sys
from pathlib import Path
name, out = sys.argv[1], Path(sys.argv[2])
s = json.loads((out / "summary.json").read_text())
print(f"{name:<12} {s['engine']:<15} {s['ranks']:>5} {s['final_train_loss']:>8.4f} {s['tokens_per_s']:>9.0f} {s['peak_memory_mb']:>9.0f}")
PY
}
mkdir -p /tmp/cpu-dist
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "run          engine          ranks     loss  tokens/s  peak MB"
run one-lora 1 --gradient_accumulation_steps=2
run ddp-lora 2 --gradient_accumulation_steps=1
run fsdp-lora 2 --gradient_accumulation_steps=1 "$fsdp"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
