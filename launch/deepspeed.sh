#!/usr/bin/env bash
# Launch pretraining with the deepspeed launcher.
#   single node:  NPROC=8 bash launch/deepspeed.sh --config configs/simmim_swinv2_base_192_w12.yaml [key=value ...]
#   several nodes (passwordless ssh between them): HOSTFILE=hostfile bash launch/deepspeed.sh --config ...
#     (a hostfile lists "host slots=N" per node; launch/hostfile_from_slurm.sh writes one for a SLURM allocation)
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPSPEED="${DEEPSPEED:-$([[ -x .venv/bin/deepspeed ]] && echo .venv/bin/deepspeed || echo deepspeed)}"
args=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE")
    [[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
else
    # --num_gpus is the launcher's name for local processes (on a CPU-only machine: CPU processes).
    args+=(--num_gpus "${NPROC:-1}")
fi
exec "$DEEPSPEED" "${args[@]}" --module pretrain "$@"
