#!/usr/bin/env bash
# The README's main job: set up, then run the end-to-end demo (read, validate, train, evaluate, publish).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
imlt demo "$@"
