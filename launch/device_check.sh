#!/usr/bin/env bash
# One device check (benchmarks/device_check.py): plain vs speculative at batch
# 1/8/64, verify cost by width, draft cost, compiles after warm-up, synthetic
# acceptance speedups, the greedy mismatch rate; one table + one JSON.
#
# Installs nothing: run it where JAX and its accelerator plugin are installed
# (no network needed). Pure-Python wheels shipped alongside in wheels/ (for
# example ml_collections-*.whl) are put on the path as they are.
#   bash launch/device_check.sh [--shapes=llama3_8b_1b] [--out=runs/device_check.json]
#   bash launch/device_check.sh --dry-run      # CPU, tiny shapes (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
for wheel in wheels/*.whl; do
  if [ -e "$wheel" ]; then export PYTHONPATH="$PWD/$wheel${PYTHONPATH:+:$PYTHONPATH}"; fi
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
args=()
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ] || [ "$arg" = "--dry_run" ]; then
    export JAX_PLATFORMS=cpu
    arg=--dry_run
  fi
  args+=("$arg")
done
exec "$PY" benchmarks/device_check.py "${args[@]}"
