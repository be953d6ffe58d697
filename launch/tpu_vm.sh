#!/bin/bash
# LayerFlow on a multi-host Cloud TPU VM slice with gcloud: create, install on every worker, train, delete.
#
#   TPU=layerflow ZONE=us-east5-a TYPE=v5p-32 launch/tpu_vm.sh create
#   TPU=layerflow ZONE=us-east5-a launch/tpu_vm.sh install
#   TPU=layerflow ZONE=us-east5-a launch/tpu_vm.sh train configs/stages.py:size=5b /mnt/runs/5b --config.mesh.data=1 --config.mesh.fsdp=-1
#   TPU=layerflow ZONE=us-east5-a launch/tpu_vm.sh delete
#
# Every worker runs the same `layerflow train` (gcloud --worker=all); jax.distributed auto-detects the TPU slice
# (coordinator, process count and id), so no variables are needed. WORKDIR and data must be visible on every
# worker at the same path: mount a bucket with gcsfuse (done by `install` when BUCKET is set) or a Filestore share.
set -euo pipefail
: "${TPU:?set TPU (the TPU VM name)}" "${ZONE:?set ZONE}"
TYPE=${TYPE:-v5p-32}
VERSION=${VERSION:-v2-alpha-tpuv5}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION" ;;
  install)
    # copy this checkout (without local venvs/data) to every worker and install it with the TPU jax wheel
    tar --exclude=.venv --exclude=data --exclude=runs -czf /tmp/layerflow.tgz .
    gcloud compute tpus tpu-vm scp /tmp/layerflow.tgz "$TPU":~/ --zone="$ZONE" --worker=all
    ssh_all "mkdir -p ~/layerflow-jax && tar -xzf ~/layerflow.tgz -C ~/layerflow-jax && cd ~/layerflow-jax &&
             python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"
    if [ -n "${BUCKET:-}" ]; then
      ssh_all "sudo mkdir -p /mnt/runs && sudo chown \$USER /mnt/runs && gcsfuse --implicit-dirs $BUCKET /mnt/runs"
    fi ;;
  train)
    shift
    CONFIG=${1:?train CONFIG WORKDIR [--config.KEY=VALUE …]}; WORKDIR=${2:?train CONFIG WORKDIR …}; shift 2
    ssh_all "cd ~/layerflow-jax && LAYERFLOW_INIT_TIMEOUT_S=600 LAYERFLOW_HEARTBEAT_TIMEOUT_S=300 \
             .venv/bin/layerflow train --config $CONFIG --workdir $WORKDIR --no-progress $*" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU" --zone="$ZONE" --quiet ;;
  *)
    echo "usage: TPU=… ZONE=… [TYPE=v5p-32] $0 create|install|train CONFIG WORKDIR [overrides]|delete" >&2
    exit 2 ;;
esac
