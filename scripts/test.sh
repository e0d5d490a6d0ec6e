#!/usr/bin/env bash
# Set up everything, then run the test suite (fast unit tests and the real-model integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
python -m pytest -q "$@"
