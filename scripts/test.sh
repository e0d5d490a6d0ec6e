#!/usr/bin/env bash
# Set up everything, then run the test suite (fast unit tests and the real-model integration tests).
# With no arguments it then runs the learning-outcome tests (marker `learning`) a second time with AVX2 kernels,
# so a threshold that only one CPU's rounding meets fails on this machine rather than on the next one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
python -m pytest -q --durations=40 "$@"
[ $# -eq 0 ] || exit 0

# On a CPU with more than AVX2 (AVX-512, AMX) the second pass caps every kernel library at AVX2: ATen's own
# kernels, MKL's GEMMs and oneDNN's (bf16 becomes emulated there, as on an AVX2-only CPU). On an AVX2-only CPU
# it runs them again under the default kernels, which still catches a test that passes only by luck of one run.
if grep -qwE 'avx512f|amx_tile' /proc/cpuinfo 2>/dev/null; then
  kernels=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2)
else
  kernels=(ATEN_CPU_CAPABILITY=default)
fi
echo "== second pass: learning-outcome tests (-m learning) under ${kernels[*]} =="
env "${kernels[@]}" python -m pytest -q -m learning -p no:cacheprovider
