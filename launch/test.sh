#!/usr/bin/env bash
# Sets up (with test extras) and runs the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
