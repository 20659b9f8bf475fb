#!/usr/bin/env bash
# Runs the PRISM pipeline on the embedded tiny default (CPU is enough), setting up .venv first if
# needed. Extra arguments are dotted overrides, e.g.
#   bash examples/run_prism_tiny.sh stages.sft.steps=20 run.output_dir=outputs/tiny-20
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. tools/setup_env.sh
echo "[run] prism run examples/configs/tiny.yaml $*"
prism run examples/configs/tiny.yaml "$@"
