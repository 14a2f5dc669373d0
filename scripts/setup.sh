#!/usr/bin/env bash
# Create .venv and install the project with every extra. Idempotent: re-running is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.imlt-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[kfp,airflow,dev]"
  python -m pip check
  touch "$stamp"
fi
