#!/usr/bin/env bash
# For a maintainer with one NVIDIA GPU: install the project (core only, into .venv), then measure our
# trainer against timm's train benchmark in float16 and bfloat16, check the fp16 non-finite guard,
# and write the train_gpu section of benchmarks/RESULTS.md. Unattended; about 5 minutes plus install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -m benchmarks.train_gpu "$@"
