#!/usr/bin/env bash
# The GPU check for an offline GPU machine (issue 29): a few steps of every GPU training path, one table.
# Never part of CI (CI runs `bench/gpu_check.py --dry-run` through tests/test_gpu_check.py).
#
# Before, where a package registry is reachable:   .venv/bin/python bench/gpu_check.py --fetch   (fills .whl/, ~30 MiB)
# On the GPU machine, from the repository root:    bash bench/gpu_check.sh [gpu_check.py options]
#   (the device tool: command `bash bench/gpu_check.sh`, carry [".whl"], timeout_s 600; about 5-8 minutes)
# It uses the machine's own python3 and torch. The carried wheels go into /tmp/site with --no-deps, so
# torch, numpy and the CUDA libraries stay the image's; PYTHONPATH puts them before the image's copies.
# Writes $OUT/gpu_check.md, gpu_check.json and gpu_check.log when OUT is set (else /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=${CARRY:-.whl}
SITE=${SITE:-/tmp/site}
mkdir -p "${OUT:-/tmp/gpu-check}"
log=${OUT:-/tmp/gpu-check}/gpu_check.log

if compgen -G "$CARRY/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$CARRY"/*.whl \
    || { echo "error: pip could not install the wheels in $CARRY into $SITE (see above)"; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "note: no wheels in $CARRY: using only what this machine has installed (.venv/bin/python bench/gpu_check.py --fetch makes them)"
fi
export PYTHONPATH="$PWD:$PYTHONPATH"
# A wheel that brought its own torch would shadow the image's CUDA build: refuse before any row runs.
"$PY" - "$SITE" <<'PY' || exit 2
import sys
try:
    import torch
except ImportError:
    sys.exit(print("note: this python has no torch (only --dry-run can work here)"))
if torch.__file__.startswith(sys.argv[1]):
    sys.exit(f"error: torch {torch.__version__} comes from {torch.__file__}: a carried wheel shadows the machine's torch")
print(f"torch {torch.__version__} from {torch.__file__.rsplit('/', 2)[0]}, CUDA available: {torch.cuda.is_available()}")
PY
PYTHONUNBUFFERED=1 "$PY" bench/gpu_check.py --carry "$CARRY" "$@" 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
