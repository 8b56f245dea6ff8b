#!/usr/bin/env bash
# torchrun on one or more nodes. Run on every node with the same MASTER_ADDR (node 0's routable address).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh configs/quickstart.yaml [key=value ...]
set -euo pipefail
config=${1:?usage: torchrun.sh CONFIG [key=value ...]}; shift
exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${NPROC:-2}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  --max-restarts "${MAX_RESTARTS:-0}" -m dist_train run "$config" "$@"
