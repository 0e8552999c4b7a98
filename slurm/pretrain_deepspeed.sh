#!/usr/bin/env bash
# SimMIM pretraining on SLURM through the deepspeed launcher (for clusters that prefer it to srun).
#   mkdir -p logs && sbatch slurm/pretrain_deepspeed.sh --config configs/simmim_swinv2_base_192_w12.yaml [key=value ...]
# Submit from the repository root (or with --chdir to it). One batch task writes a hostfile for the allocation
# (launch/hostfile_from_slurm.sh) and runs `deepspeed --hostfile`, which starts the processes on every node over
# passwordless ssh (pdsh); on one node it starts them locally (`--num_gpus`). Without ssh between nodes use
# slurm/pretrain.sh (srun) instead.
# Everything else works as in slurm/pretrain.sh, through the same slurm/common.sh: the config check, MASTER_ADDR (the
# first node) and MASTER_PORT (kept when set, else 20000 + job id % 20000), the NCCL and debugging environment
# (written to a DeepSpeed environment file for the other nodes too), and the requeue decision (MAX_RESTARTS,
# REQUEUE_ON_CRASH). One difference on preemption: the deepspeed launcher does not pass USR1 on (USR1 would end it),
# so this shell signals the training processes that the launcher started on this node (found by walking the
# launcher's process tree from its pid). That is enough: the trainer shares the flag with every rank through a
# collective at the next step boundary, all ranks save a complete checkpoint and exit 75, and the job is requeued.
# This script runs no job step, and SLURM (seen on 22.05) sends a preemption's SIGTERM (GraceTime) to the job steps
# only: here nothing gets it, and the ranks are killed when the grace time ends, without a new checkpoint (SLURM then
# requeues the job, PreemptMode=REQUEUE, and it resumes from its last periodic one). Where preemption matters, use
# slurm/pretrain.sh.
# Environment: as slurm/pretrain.sh (CONFIG, PYTHON, GPUS_PER_NODE, MAX_RESTARTS, REQUEUE_ON_CRASH, MASTER_PORT,
# NCCL_DEBUG), plus DEEPSPEED (launcher executable, default `deepspeed` on PATH) and SLOTS_PER_NODE (processes per
# node, default the GPUs SLURM allocated, else 1).
#
#SBATCH --job-name=swinv2-simmim-ds
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=80
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -uo pipefail

SCRIPT_NAME=slurm/pretrain_deepspeed.sh
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "$SCRIPT_NAME is a batch script: submit it with sbatch (see its header)" >&2
    exit 2
fi
# sbatch runs a copy of this file from slurmd's spool directory: find slurm/common.sh next to the submitted file (the
# path SLURM recorded for the job), else under the job's working directory.
submitted="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p')"
for common in "$(dirname "${submitted:-.}")/common.sh" slurm/common.sh; do
    [[ -f "$common" ]] && break
done
if [[ ! -f "$common" ]]; then
    echo "$SCRIPT_NAME: slurm/common.sh not found next to '$submitted' nor under $PWD: submit from the repository root" >&2
    exit 2
fi

# The launcher's descendants that run `-m pretrain` (the ranks on this node), by pid.
trainer_pids() {
    local queue=("$1") found=() p child
    while ((${#queue[@]})); do
        p="${queue[0]}"
        queue=("${queue[@]:1}")
        for child in $(pgrep -P "$p"); do
            if tr '\0' ' ' < "/proc/$child/cmdline" 2>/dev/null | grep -q -- '-m pretrain'; then
                found+=("$child")
            else
                queue+=("$child")
            fi
        done
    done
    echo "${found[@]}"
}
forward_signal() {
    local pids
    pids="$(trainer_pids "$_child")"
    [[ -n "$pids" ]] || return 1
    say "sending USR1 to the training processes on this node ($pids)"
    # shellcheck disable=SC2086
    kill -USR1 $pids 2>/dev/null
    return 0
}
# shellcheck source=slurm/common.sh
source "$common"

slurm_trainer_args "$@"
slurm_master
gpus="$(slurm_gpus_per_node)"
slots="${SLOTS_PER_NODE:-$gpus}"
((slots > 0)) || slots=1
threads=$((${SLURM_CPUS_PER_TASK:-$slots} / slots))
((threads > 0)) || threads=1
slurm_env "$gpus" "$threads"

mkdir -p logs
hostfile="logs/hostfile-$SLURM_JOB_ID"
if ! bash launch/hostfile_from_slurm.sh "$hostfile" "$slots"; then
    say "could not write the hostfile with launch/hostfile_from_slurm.sh: submit from the repository root (or --chdir)"
    exit 1
fi
nodes="$(wc -l < "$hostfile")"
if ((nodes > 1)); then
    where=(--hostfile "$hostfile")
    # The launcher passes only NCCL*, PYTHON*, UCX*, MV2* and MLFLOW* variables on to the other nodes by itself; the
    # rest goes through its environment file (read from $HOME and from here, under the name DS_ENV_FILE, default
    # .deepspeed_env). Ours comes first, then the user's own, which wins.
    envfile="$PWD/logs/deepspeed_env-$SLURM_JOB_ID"
    name="${DS_ENV_FILE:-.deepspeed_env}"
    case "$name" in
        /*) user_files=("$name") ;;
        *) user_files=("$HOME/$name" "$PWD/$name") ;;
    esac
    {
        for var in OMP_NUM_THREADS TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_DUMP_ON_TIMEOUT PYTORCH_ALLOC_CONF; do
            [[ -n "${!var:-}" ]] && echo "$var=${!var}"
        done
        for f in "${user_files[@]}"; do
            [[ -f "$f" ]] && grep '=' "$f"
        done
    } > "$envfile"
    export DS_ENV_FILE="$envfile"
else
    # One node: the launcher would insist on ssh to a hostfile's single host, so start the processes locally.
    where=(--num_gpus "$slots")
fi
DEEPSPEED="${DEEPSPEED:-deepspeed}"
say "deepspeed launcher: $nodes nodes x $slots processes, gpus/node=$gpus master=$MASTER_ADDR:$MASTER_PORT" \
    "restarts=$restarts/$MAX_RESTARTS"
say "command: $DEEPSPEED ${where[*]} --master_addr $MASTER_ADDR --master_port $MASTER_PORT --module pretrain ${args[*]}"
slurm_launch "$DEEPSPEED" "${where[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module pretrain "${args[@]}"
slurm_finish "$rc"
