#!/usr/bin/env bash
# Run any dpeft run config on N processes per node, on one or several nodes:
#   launch/torchrun.sh CONFIG [NPROC] [section.field=value ...]
# Examples:
#   launch/torchrun.sh configs/tiny_llama.yaml 2
#   launch/torchrun.sh configs/quickstart.yaml 2 train.steps=50
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh configs/smollm2_qa.yaml 8   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh configs/smollm2_qa.yaml 8   # on node 1
# Environment: NNODES (default 1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500).
# Each rank calls the same dpeft.train.run(cfg) as `dpeft train`; the store backend 'auto' becomes 'sharded'.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ? 2 : 0 ))
fi
CONFIG="$1"; shift
NPROC=1
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then NPROC="$1"; shift; fi
if [[ ! -f "$CONFIG" ]]; then echo "launch/torchrun.sh: config $CONFIG does not exist" >&2; exit 2; fi

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
# CPU ranks share the cores: give each its share of threads unless the caller chose.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    CORES="$(nproc)"
    export OMP_NUM_THREADS=$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))
fi

exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    -m dpeft.cli.main train --config "$CONFIG" "$@"
