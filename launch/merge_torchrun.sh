#!/usr/bin/env bash
# Merge adapters into a sharded HF checkpoint with the output shards split over the ranks of one or more nodes.
#
#   NPROC=4 launch/merge_torchrun.sh --base /models/llama --adapter /runs/lora --out /models/llama-merged
#
# Multi-node: run it on every node with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT set; --base, --adapter
# and --out must be on a file system all nodes see. Every extra argument goes to `dpeft merge`.
set -euo pipefail
NPROC="${NPROC:-2}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29531}"
# One thread per rank: the work is reading, a matmul per target tensor and writing.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m dpeft.cli.main merge "$@"
