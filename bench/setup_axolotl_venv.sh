#!/usr/bin/env bash
# Make axolotl's own venv for bench/sft_vs_peers.py (variant `axolotl`, runner bench/axolotl_run.py), CPU only.
#
#   bash bench/setup_axolotl_venv.sh                          # -> bench/.venv-axolotl
#   AXOLOTL_VENV=/work/venvs/axolotl bash bench/setup_axolotl_venv.sh
#   AXOLOTL_VENV=/work/venvs/axolotl nice -n 10 .venv/bin/python bench/sft_vs_peers.py --workload lora --only lmforge,axolotl
#
# `pip install axolotl` resolves for 15+ minutes (gradio, trackio, modal, lm_eval, cloud filesystems, xformers,
# liger, flash-linear-attention, ...), so axolotl goes in with --no-deps and then only what a CPU LoRA / full
# fine-tune imports, at axolotl 0.19.0's pins. torch stays at TORCH (a CPU build) in every resolving command;
# nothing from CUDA/nvidia is installed. triton is only imported (axolotl's trainer builder imports it at
# module level); its kernels are turned off by the runner. About 2 minutes with a warm pip cache.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AXOLOTL_VENV:-bench/.venv-axolotl}
TORCH=${TORCH:-torch==2.13.0}
AXOLOTL=${AXOLOTL:-axolotl==0.19.0}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --disable-pip-version-check)
"${PIP[@]}" "$TORCH"
"${PIP[@]}" --no-deps "$AXOLOTL"
# axolotl 0.19.0's pinned core, plus the modules its training path imports at module level
# (numba: multipack sampler; posthog: telemetry; pillow: multimodal schema; bitsandbytes: adapter loader;
# wandb + evaluate: callbacks).
"${PIP[@]}" "$TORCH" transformers==5.16.1 peft==0.20.0 trl==1.9.0 accelerate==1.13.0 datasets==4.8.4 \
    huggingface_hub==1.17.0 tokenizers==0.23.1 hf_xet==1.4.3 packaging==26.0 pydantic==2.12.5 PyYAML==6.0.3 \
    typing-extensions==4.15.0 python-dotenv==1.0.1 zstandard==0.22.0 posthog==6.7.11 bitsandbytes==0.50.2 \
    "numpy>=2.1,<3.0" "numba>=0.63.1,<1.0" addict fire einops colorama scipy sentencepiece requests art fastcore \
    pillow wandb
# Packages whose own requirements would pull in more than they need here.
"${PIP[@]}" --no-deps axolotl-contribs-lgpl==0.0.7 axolotl-contribs-mit==0.0.6 "triton>=3.4.0" evaluate==0.4.1 responses

"$VENV/bin/python" - <<'EOF'
import os
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
import torch, transformers, peft, trl, axolotl
from axolotl.cli.train import do_cli  # noqa: F401
from axolotl.core.builders import HFCausalTrainerBuilder  # noqa: F401
from axolotl.loaders.adapter import load_adapter  # noqa: F401
assert not torch.version.cuda, f"a CUDA torch got in: {torch.__version__}"
print(f"axolotl {axolotl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, trl {trl.__version__}")
EOF
echo "ok: $VENV (use AXOLOTL_VENV=$VENV with bench/sft_vs_peers.py unless it is bench/.venv-axolotl)"
