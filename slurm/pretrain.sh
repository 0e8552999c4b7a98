#!/usr/bin/env bash
# SimMIM pretraining on SLURM: multi-node, one task per GPU, safe under preemption and time limits.
#
#   mkdir -p logs
#   sbatch slurm/pretrain.sh --config configs/simmim_swinv2_base_192_w12.yaml [section.key=value ...]
#   CONFIG=configs/simmim_swinv2_base_192_w12.yaml sbatch slurm/pretrain.sh [section.key=value ...]
#
# Every #SBATCH line below is a default; override it on the sbatch command line, e.g.
#   sbatch --nodes=4 --time=2-00:00:00 --partition=gpu --account=myproj slurm/pretrain.sh --config ...
# Environment knobs: CONFIG, PYTHON (interpreter with the project installed, e.g. /path/to/.venv/bin/python; default
#   `python` on PATH), GPUS_PER_NODE (default: what SLURM allocated, 0 on a CPU-only cluster: submit with
#   --gpus-per-node=0 there),
#   MAX_RESTARTS (requeues allowed in total, default 20), REQUEUE_ON_CRASH (1: requeue a crashed run too, within
#   MAX_RESTARTS; default 0), NCCL_DEBUG, EXTRA_SRUN_ARGS.
#
# Preemption: SLURM sends USR1 to this batch shell (--signal=B:USR1@300, 5 min before the time limit, or
# `scancel --signal=USR1 --batch <job>`); SIGTERM is treated the same. The shell forwards it to every task; the
# trainer finishes its current step, all ranks save a complete checkpoint and exit with code 75, and this script
# requeues the job. The requeued job resumes from the newest complete checkpoint automatically.
#
#SBATCH --job-name=swinv2-simmim
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -uo pipefail

EXIT_PREEMPTED=75
EXIT_CONFIG=2

say() { echo "[slurm/pretrain.sh $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?} run $((${SLURM_RESTART_COUNT:-0} + 1))] $*"; }

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "slurm/pretrain.sh is a batch script: submit it with sbatch (see its header)" >&2
    exit 2
fi
# The job runs in the directory sbatch was called from (or --chdir): relative paths in the config resolve there.

args=("$@")
if [[ -n "${CONFIG:-}" ]]; then
    args=(--config "$CONFIG" "${args[@]}")
fi
if [[ ! " ${args[*]} " =~ " --config " ]]; then
    say "no config given: pass --config FILE or set CONFIG=FILE"
    exit $EXIT_CONFIG
fi
PYTHON="${PYTHON:-python}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
REQUEUE_ON_CRASH="${REQUEUE_ON_CRASH:-0}"
restarts="${SLURM_RESTART_COUNT:-0}"

# Ranks come from srun (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS: pretrain/distributed.py maps them). The master is
# the first node of the allocation, the port is derived from the job id so jobs sharing a node do not collide.
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export PYTHONFAULTHANDLER=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
gpus="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}}"
if [[ "$gpus" != "0" && -n "$gpus" ]]; then
    # NCCL: fail fast on collective errors and dump the flight recorder on timeouts instead of hanging.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=3
    export TORCH_NCCL_DUMP_ON_TIMEOUT=1
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export PYTORCH_ALLOC_CONF=expandable_segments:True
fi

say "nodes=${SLURM_JOB_NUM_NODES:-1} (${SLURM_JOB_NODELIST}) tasks=${SLURM_NTASKS:-1} gpus/node=${gpus:-0}" \
    "master=$MASTER_ADDR:$MASTER_PORT restarts=$restarts/$MAX_RESTARTS python=$PYTHON"
say "command: $PYTHON -m pretrain ${args[*]}"

signalled=""
forward() {
    signalled="$1"
    say "received SIG$1: asking every rank to save a checkpoint at the next step boundary"
    [[ -n "${srun_pid:-}" ]] && kill -USR1 "$srun_pid" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# srun runs in the background so that this shell can run its traps while training goes on. No --kill-on-bad-exit:
# after a preemption every rank exits with 75 on its own, and a rank that one early exit killed would turn the step's
# exit code into 143. A crashed rank is still detected: its peers' collectives time out
# (distributed.timeout_minutes) and they exit with an error.
# shellcheck disable=SC2086
srun ${EXTRA_SRUN_ARGS:-} "$PYTHON" -m pretrain "${args[@]}" &
srun_pid=$!
while true; do
    wait "$srun_pid"
    rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break  # wait was interrupted by a trap: keep waiting for srun
done

requeue() {
    if (( restarts >= MAX_RESTARTS )); then
        say "not requeued: $restarts restarts already (MAX_RESTARTS=$MAX_RESTARTS)"
        exit "$1"
    fi
    say "requeueing job $SLURM_JOB_ID ($2); it resumes from the newest complete checkpoint"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        say "scontrol requeue failed (job cancelled, or submitted without --requeue?): resubmit to resume"
        exit "$1"
    fi
    exit 0
}

case "$rc" in
    0)
        say "training finished (exit 0); not requeued" ;;
    "$EXIT_PREEMPTED")
        requeue "$rc" "checkpoint saved after ${signalled:+SIG$signalled}${signalled:-a signal}" ;;
    "$EXIT_CONFIG")
        say "configuration or data error (exit $rc, message above); not requeued" ;;
    *)
        if [[ "$REQUEUE_ON_CRASH" == 1 ]]; then
            requeue "$rc" "crash with exit code $rc, REQUEUE_ON_CRASH=1"
        fi
        say "training failed with exit code $rc; not requeued (set REQUEUE_ON_CRASH=1 to requeue crashes)" ;;
esac
exit "$rc"
