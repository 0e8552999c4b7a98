#!/usr/bin/env bash
# Launch pretraining with torchrun on this node.
#   single node:  NPROC=8 bash launch/torchrun.sh --config configs/simmim_swinv2_base_192_w12.yaml [key=value ...]
#   multi-node:   on every node, NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 address> MASTER_PORT=29500 \
#                 NPROC=8 bash launch/torchrun.sh --config ...
# NPROC defaults to the number of visible GPUs (1 on a CPU-only machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}"
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
NNODES="${NNODES:-1}"
if (( NNODES > 1 )) && [[ -z "${MASTER_ADDR:-}" || -z "${NODE_RANK:-}" ]]; then
    echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (node 0's address) and NODE_RANK on every node" >&2
    exit 2
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m pretrain "$@"
