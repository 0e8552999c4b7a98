#!/usr/bin/env bash
# SimMIM pretraining on SLURM through the deepspeed launcher (for clusters that prefer it to srun).
#   mkdir -p logs && sbatch slurm/pretrain_deepspeed.sh --config configs/simmim_swinv2_base_192_w12.yaml [key=value ...]
# One batch task writes a hostfile for the allocation (launch/hostfile_from_slurm.sh) and runs `deepspeed --hostfile`,
# which starts the processes on every node over passwordless ssh (pdsh). Without ssh between nodes use
# slurm/pretrain.sh (srun) instead. Requeue-on-preemption works as in slurm/pretrain.sh: USR1 is forwarded to the
# launcher, which passes it on to its processes; the trainer saves and exits 75, and the job is requeued.
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
say() { echo "[slurm/pretrain_deepspeed.sh $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?}] $*"; }
[[ -n "${SLURM_JOB_ID:-}" ]] || { echo "submit with sbatch" >&2; exit 2; }
args=("$@")
[[ -n "${CONFIG:-}" ]] && args=(--config "$CONFIG" "${args[@]}")
slots="${SLOTS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
hostfile="logs/hostfile-$SLURM_JOB_ID"
mkdir -p logs
bash "$(dirname "$(readlink -f "$0")")/../launch/hostfile_from_slurm.sh" "$hostfile" "$slots"
master="$(head -n 1 "$hostfile" | cut -d' ' -f1)"
DEEPSPEED="${DEEPSPEED:-$([[ -x .venv/bin/deepspeed ]] && echo .venv/bin/deepspeed || echo deepspeed)}"
say "deepspeed launcher: $(wc -l < "$hostfile") nodes x $slots processes, master $master"
trap 'say "received USR1: forwarding"; kill -USR1 "$pid" 2>/dev/null' USR1
trap 'say "received TERM: forwarding as USR1"; kill -USR1 "$pid" 2>/dev/null' TERM
"$DEEPSPEED" --hostfile "$hostfile" --master_addr "$master" --master_port $((20000 + SLURM_JOB_ID % 20000)) \
    --module pretrain "${args[@]}" &
pid=$!
while true; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done
case "$rc" in
    0) say "training finished; not requeued" ;;
    75) if (( ${SLURM_RESTART_COUNT:-0} < ${MAX_RESTARTS:-20} )); then
            say "checkpoint saved after preemption: requeueing"; scontrol requeue "$SLURM_JOB_ID"; exit 0
        fi
        say "not requeued: MAX_RESTARTS reached" ;;
    *) say "exit code $rc; not requeued" ;;
esac
exit "$rc"
