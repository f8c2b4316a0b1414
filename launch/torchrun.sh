#!/usr/bin/env bash
# Multi-node training with torchrun's c10d rendezvous. Run this same script on every node:
#   NNODES=2 GPUS_PER_NODE=8 RDZV_HOST=node0.example RDZV_ID=resnet50-run1 bash launch/torchrun.sh [overrides]
# RDZV_ID names the run: every node writes to outputs/torchrun/$RDZV_ID (use a shared filesystem).
# When a worker dies, torchrun stops the others and restarts them all (MAX_RESTARTS times, default 1):
# they resume from the last checkpoint (set checkpoint.every_n_steps to lose less).
set -euo pipefail
: "${NNODES:?number of nodes}" "${GPUS_PER_NODE:?processes (GPUs) per node}" "${RDZV_HOST:?host of the rendezvous}"
: "${RDZV_ID:?a unique name for this run}"
RDZV_PORT=${RDZV_PORT:-29400}
MAX_RESTARTS=${MAX_RESTARTS:-1}
# Restarted workers must not share the rendezvous store with the round before: they would read the dead
# workers' addresses from it and fail to connect (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" --max-restarts="$MAX_RESTARTS" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$RDZV_ID" \
    -m train trainer=ddp trainer.devices="$GPUS_PER_NODE" trainer.num_nodes="$NNODES" "$@"
