#!/usr/bin/env bash
# One host with several GPUs: one process sees every GPU, the mesh spans them.
# No jax.distributed needed (that is for several hosts; see tpu_vm.sh).
#
#   launch/multi_gpu.sh --config=configs/smollm2.py --workdir=runs/gpu \
#       --config.batch_size=16 [--config.mesh=data=-1,model=1] [--config.job=benchmark]
#
# MESH (default "data=-1,model=1": pure data parallelism over all GPUs; the
# batch size must be a multiple of the GPU count) is passed as --config.mesh
# unless the arguments already set one. Tensor parallelism, e.g. MESH=data=2,model=4,
# needs query heads, MLP width and vocabulary divisible by the model axis
# (see config.sharding_rules; KV heads fall back to replication, logged).
# Set SETUP=1 to install JAX for CUDA 12 into .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SETUP:-0}" = "1" ]; then
  bash launch/setup.sh
  .venv/bin/python -m pip install -q "jax[cuda12]==0.10.2"
fi
PYTHON="${PYTHON:-.venv/bin/python}"
MESH="${MESH:-data=-1,model=1}"

# Each process may otherwise pre-allocate 75% of every GPU; generation needs
# params + caches only.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

"$PYTHON" -c 'import jax; print(f"{jax.device_count()} devices: {jax.devices()}")'
extra=()
if ! printf '%s\n' "$@" | grep -q -- '--config.mesh='; then
  extra=(--config.mesh="$MESH")
fi
exec "$PYTHON" -m specdec_jax.main "$@" "${extra[@]}"
