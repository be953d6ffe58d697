#!/bin/bash
# LayerFlow on GKE TPU slices (single or multi-slice) as a JobSet (launch/tpu_jobset.yaml), or through xpk.
#
#   export NAME=lf-2b IMAGE=us-docker.pkg.dev/PROJECT/layerflow/train:latest BUCKET=gs://my-bucket
#   SLICE=v5p-16 NUM_SLICES=2 launch/tpu_gke.sh jobset configs/stages.py:size=2b,tpu=1 [--config.KEY=VALUE …]
#   SLICE=v5p-16 NUM_SLICES=2 CLUSTER=lf launch/tpu_gke.sh xpk configs/stages.py:size=2b,tpu=1
#   launch/tpu_gke.sh image                       # build and push IMAGE from this checkout (pip install .[tpu])
#   DRY_RUN=1 …                                   # print the exact commands (and the rendered YAML), run nothing
#
# Each host gets LAYERFLOW_INIT_TIMEOUT_S=600, LAYERFLOW_HEARTBEAT_TIMEOUT_S=300 (layerflow_jax/distributed.py),
# MEGASCALE_{COORDINATOR_ADDRESS,NUM_SLICES,SLICE_ID} (multi-slice), TPU_WORKER_HOSTNAMES / TPU_WORKER_ID (GKE
# injects them); jax.distributed.initialize() takes all of them itself. The config's mesh is one slice's (tpu=1:
# fsdp over the slice) and data gains the slice count across DCN: --config.mesh.data=S --config.mesh.dcn.data=S.
# Work dir gs://BUCKET/runs/NAME and data gs://BUCKET/tfds, mounted at /gcs in every pod.
set -euo pipefail
SLICE=${SLICE:-v5p-16}
NUM_SLICES=${NUM_SLICES:-1}
NAME=${NAME:-layerflow}
IMAGE=${IMAGE:-layerflow-jax:latest}
BUCKET=${BUCKET:-gs://my-bucket}
KSA=${KSA:-default}
MAX_RESTARTS=${MAX_RESTARTS:-3}
HERE=$(cd "$(dirname "$0")" && pwd)

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi
}

# Slice name → GKE accelerator, topology, hosts, chips per host (v5p-N counts TensorCores, v6e-N chips).
case "$SLICE" in
  v5p-8)  ACCELERATOR=tpu-v5p-slice TOPOLOGY=2x2x1 HOSTS_PER_SLICE=1 CHIPS_PER_HOST=4 ;;
  v5p-16) ACCELERATOR=tpu-v5p-slice TOPOLOGY=2x2x2 HOSTS_PER_SLICE=2 CHIPS_PER_HOST=4 ;;
  v5p-32) ACCELERATOR=tpu-v5p-slice TOPOLOGY=2x2x4 HOSTS_PER_SLICE=4 CHIPS_PER_HOST=4 ;;
  v6e-8)  ACCELERATOR=tpu-v6e-slice TOPOLOGY=2x4   HOSTS_PER_SLICE=1 CHIPS_PER_HOST=8 ;;
  v6e-16) ACCELERATOR=tpu-v6e-slice TOPOLOGY=4x4   HOSTS_PER_SLICE=4 CHIPS_PER_HOST=4 ;;
  *) echo "SLICE=$SLICE: expected v5p-8|v5p-16|v5p-32|v6e-8|v6e-16" >&2; exit 2 ;;
esac

render() {  # the JobSet with this run's values
  local config=$1; shift
  local extra=""
  for a in "$@"; do extra+=", \"$a\""; done
  NAME=$NAME IMAGE=$IMAGE CONFIG=$config NUM_SLICES=$NUM_SLICES HOSTS_PER_SLICE=$HOSTS_PER_SLICE \
  CHIPS_PER_HOST=$CHIPS_PER_HOST ACCELERATOR=$ACCELERATOR TOPOLOGY=$TOPOLOGY KSA=$KSA MAX_RESTARTS=$MAX_RESTARTS \
  BUCKET_NAME=${BUCKET#gs://} EXTRA_ARGS=$extra \
  python3 -c 'import os, re, sys; sys.stdout.write(re.sub(r"\$\{(\w+)\}", lambda m: os.environ[m.group(1)], sys.stdin.read()))' \
    < "$HERE/tpu_jobset.yaml"
}

case "${1:-}" in
  image)
    run docker build -t "$IMAGE" -f - . <<'DOCKERFILE'
FROM python:3.11-slim
WORKDIR /layerflow-jax
COPY . .
RUN pip install --no-cache-dir -c constraints.txt -e '.[video,tpu]'
DOCKERFILE
    run docker push "$IMAGE" ;;
  jobset)
    shift
    CONFIG=${1:?jobset CONFIG [--config.KEY=VALUE …]}; shift
    if [ "${DRY_RUN:-0}" = 1 ]; then render "$CONFIG" "$@"; echo "+ kubectl apply -f - (the JobSet above)"
    else render "$CONFIG" "$@" | kubectl apply -f -; fi ;;
  xpk)
    shift
    CONFIG=${1:?xpk CONFIG [--config.KEY=VALUE …]}; shift
    run xpk workload create --cluster "${CLUSTER:?set CLUSTER}" --workload "$NAME" --tpu-type "$SLICE" \
      --num-slices "$NUM_SLICES" --docker-image "$IMAGE" --command \
      "LAYERFLOW_INIT_TIMEOUT_S=600 LAYERFLOW_HEARTBEAT_TIMEOUT_S=300 layerflow train --config $CONFIG --workdir /gcs/runs/$NAME --config.data.data_dir=/gcs/tfds --config.mesh.data=$NUM_SLICES --config.mesh.dcn.data=$NUM_SLICES --no-progress $*" ;;
  *)
    echo "usage: [SLICE=v5p-16] [NUM_SLICES=1] [DRY_RUN=1] $0 image|jobset CONFIG [overrides]|xpk CONFIG [overrides]" >&2
    exit 2 ;;
esac
