#!/usr/bin/env bash
# Sets up (with test extras) and runs the whole test suite, slow tests included.
# A finished run prints the 25 slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
# Two workers (one per core: compiles and Python phases overlap); the tests
# that use the real SmolLM2 stay in one worker, and the slowest groups are
# handed out first (tests/conftest.py).
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup \
    --no-loadscope-reorder --durations=25 "$@"
