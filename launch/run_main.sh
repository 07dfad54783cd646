#!/usr/bin/env bash
# Sets up and runs the main job: SmolLM2-135M-Instruct (offline GGUF) text
# generation followed by the n-gram speculative decoding benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
WORKDIR="${WORKDIR:-runs/smollm2}"
.venv/bin/python -m specdec_jax.main --config=configs/smollm2.py --workdir="$WORKDIR/generate" "$@"
.venv/bin/python -m specdec_jax.main --config=configs/smollm2.py --workdir="$WORKDIR/benchmark" \
    --config.job=benchmark "$@"
