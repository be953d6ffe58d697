#!/bin/bash
# LayerFlow on a Cloud TPU VM slice (one or several hosts) with gcloud: create, install on every worker, train,
# delete. Every step runs on all workers at once (gcloud … --worker=all).
#
#   export TPU=layerflow ZONE=us-east5-a TYPE=v5p-32 BUCKET=gs://my-bucket
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh install
#   launch/tpu_vm.sh train configs/stages.py:size=2b,tpu=1 2b_stage1 [--config.KEY=VALUE …]
#   launch/tpu_vm.sh delete
#   DRY_RUN=1 launch/tpu_vm.sh train …          # print the exact commands, run nothing
#
# Environment of each host (set by `train`, the same on every worker):
#   TPU_WORKER_HOSTNAMES / TPU_WORKER_ID         set by the TPU VM itself: jax.distributed.initialize() reads the
#                                                coordinator, process count and id from them (no arguments)
#   LAYERFLOW_INIT_TIMEOUT_S=600                 layerflow_jax/distributed.py: a worker that never joins ends the
#   LAYERFLOW_HEARTBEAT_TIMEOUT_S=300            job in bounded time (exit 75 = retry; the work dir resumes)
#   TF_CPP_MIN_LOG_LEVEL=3
# Storage: BUCKET is mounted with gcsfuse at /mnt/gcs on every worker by `install`; the work dir (Orbax
# checkpoints, metrics, TensorBoard) is $MOUNT/runs/NAME and the TFDS data $MOUNT/tfds (= $BUCKET/runs/NAME and
# $BUCKET/tfds), so every host sees the same paths. Several slices: use launch/tpu_gke.sh (JobSet / xpk).
set -euo pipefail
: "${TPU:?set TPU (the TPU VM name)}" "${ZONE:?set ZONE}"
TYPE=${TYPE:-v5p-32}
VERSION=${VERSION:-v2-alpha-tpuv5}     # TPU VM image (v6e: v2-alpha-tpuv6e)
MOUNT=${MOUNT:-/mnt/gcs}
BUCKET=${BUCKET:-}
REPO_DIR='~/layerflow-jax'

run() {  # print the command; run it unless DRY_RUN=1
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi
}
ssh_all() { run gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }

case "${1:-}" in
  create)
    run gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION" ;;
  install)
    # this checkout (without venvs, data, runs) to every worker; the pinned set with the tpu extra (libtpu)
    run tar --exclude=.venv --exclude=data --exclude=runs --exclude=demo_out -czf /tmp/layerflow.tgz .
    run gcloud compute tpus tpu-vm scp /tmp/layerflow.tgz "$TPU":~/ --zone="$ZONE" --worker=all
    ssh_all "mkdir -p $REPO_DIR && tar -xzf ~/layerflow.tgz -C $REPO_DIR && cd $REPO_DIR && python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[video,tpu]'"
    if [ -n "$BUCKET" ]; then
      ssh_all "sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT && gcsfuse --implicit-dirs ${BUCKET#gs://} $MOUNT"
    fi ;;
  train)
    shift
    CONFIG=${1:?train CONFIG NAME [--config.KEY=VALUE …]}; NAME=${2:?train CONFIG NAME …}; shift 2
    ssh_all "cd $REPO_DIR && LAYERFLOW_INIT_TIMEOUT_S=600 LAYERFLOW_HEARTBEAT_TIMEOUT_S=300 TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/layerflow train --config $CONFIG --workdir $MOUNT/runs/$NAME --config.data.data_dir=$MOUNT/tfds --no-progress $*" ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU" --zone="$ZONE" --quiet ;;
  *)
    echo "usage: TPU=… ZONE=… [TYPE=v5p-32] [BUCKET=gs://…] [DRY_RUN=1] $0 create|install|train CONFIG NAME [overrides]|delete" >&2
    exit 2 ;;
esac
