#!/usr/bin/env bash
# The README's test command: set up, then run every test (slow end-to-end ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -n "${IMLT_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
