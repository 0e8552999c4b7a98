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
#   MAX_RESTARTS; default 0), MASTER_PORT (default 20000 + job id % 20000), NCCL_DEBUG, EXTRA_SRUN_ARGS.
# Shared with slurm/pretrain_deepspeed.sh: slurm/common.sh (found next to the submitted script, else under the job's
# working directory).
#
# Preemption: SLURM sends USR1 to this batch shell (--signal=B:USR1@300, 5 min before the time limit, or
# `scancel --signal=USR1 --batch <job>`); SIGTERM is treated the same. The shell forwards it to every task; the
# trainer finishes its current step, all ranks save a complete checkpoint and exit with code 75, and this script
# requeues the job. The requeued job resumes from the newest complete checkpoint automatically.
# A preemption with GraceTime and `scancel --signal=TERM <job>` send SIGTERM straight to every rank (and its data
# loader workers, which leave it to the rank): the same save, exit 75 and requeue, within the grace time.
# `scancel --full --signal=TERM` also reaches this shell, which passes USR1 on; srun runs in a session of its own
# so that it is not signalled (on SIGTERM it would kill the ranks at once). A plain `scancel <job>` cancels: the
# ranks may still save, but the job is not requeued.
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

SCRIPT_NAME=slurm/pretrain.sh
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "$SCRIPT_NAME is a batch script: submit it with sbatch (see its header)" >&2
    exit 2
fi
# sbatch runs a copy of this file from slurmd's spool directory: find slurm/common.sh next to the submitted file (the
# path SLURM recorded for the job), else under the job's working directory (where sbatch was called, or --chdir).
submitted="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p')"
for common in "$(dirname "${submitted:-.}")/common.sh" slurm/common.sh; do
    [[ -f "$common" ]] && break
done
if [[ ! -f "$common" ]]; then
    echo "$SCRIPT_NAME: slurm/common.sh not found next to '$submitted' nor under $PWD: submit from the repository root" >&2
    exit 2
fi
# Ranks come from srun: pretrain/distributed.py maps SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS.
forward_signal() { pkill -USR1 -P "$_child"; } # to srun (the wrapper's child), which passes it on to every task
# shellcheck source=slurm/common.sh
source "$common"

# The job runs in the directory sbatch was called from (or --chdir): relative paths in the config resolve there.
slurm_trainer_args "$@"
slurm_master
gpus="$(slurm_gpus_per_node)"
slurm_env "$gpus" "${SLURM_CPUS_PER_TASK:-1}"

say "nodes=${SLURM_JOB_NUM_NODES:-1} (${SLURM_JOB_NODELIST}) tasks=${SLURM_NTASKS:-1}" \
    "cpus/task=${SRUN_CPUS_PER_TASK:-unset} gpus/node=$gpus master=$MASTER_ADDR:$MASTER_PORT" \
    "restarts=$restarts/$MAX_RESTARTS python=$PYTHON"
say "command: srun ${EXTRA_SRUN_ARGS:-}${EXTRA_SRUN_ARGS:+ }$PYTHON -m pretrain ${args[*]}"

# No --kill-on-bad-exit: after a preemption every rank exits with 75 on its own, and a rank that one early exit killed
# would turn the step's exit code into 143. A crashed rank is still detected: its peers' collectives time out
# (distributed.timeout_minutes) and they exit with an error.
read -r -a extra <<< "${EXTRA_SRUN_ARGS:-}"
slurm_launch srun ${extra[@]+"${extra[@]}"} "$PYTHON" -m pretrain "${args[@]}"
slurm_finish "$rc"
