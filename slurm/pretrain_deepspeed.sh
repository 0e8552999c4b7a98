#!/usr/bin/env bash
# SimMIM pretraining on SLURM through the deepspeed launcher (for clusters that prefer it to srun).
#   mkdir -p logs && sbatch slurm/pretrain_deepspeed.sh --config configs/simmim_swinv2_base_192_w12.yaml [key=value ...]
# One batch task writes a hostfile for the allocation (launch/hostfile_from_slurm.sh) and runs `deepspeed --hostfile`,
# which starts the processes on every node over passwordless ssh (pdsh). Without ssh between nodes use
# slurm/pretrain.sh (srun) instead. Requeue-on-preemption works as in slurm/pretrain.sh, with one difference: the
# deepspeed launcher does not pass USR1 on (USR1 would end it), so this shell signals the training processes that the
# launcher started on this node (found by walking the launcher's process tree from its pid). That is enough: the
# trainer shares the flag with every rank through a collective at the next step boundary, all ranks save a complete
# checkpoint and exit 75, and the job is requeued.
# Environment: CONFIG, DEEPSPEED (launcher executable, default `deepspeed` on PATH), SLOTS_PER_NODE (processes per
# node, default the GPUs SLURM allocated), MAX_RESTARTS (default 20).
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
# sbatch runs a copy of this script from its spool directory, so the repository is the job's working directory
# (where sbatch was called, or --chdir), not this file's directory.
if ! bash launch/hostfile_from_slurm.sh "$hostfile" "$slots"; then
    say "could not write the hostfile with launch/hostfile_from_slurm.sh: submit from the repository root (or --chdir)"
    exit 2
fi
master="$(head -n 1 "$hostfile" | cut -d' ' -f1)"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
say "deepspeed launcher: $(wc -l < "$hostfile") nodes x $slots processes, master $master"
# The launcher's descendants that run `-m pretrain` (the ranks on this node), by pid.
trainer_pids() {
    local queue=("$1") found=() p child
    while ((${#queue[@]})); do
        p="${queue[0]}"; queue=("${queue[@]:1}")
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
forward() {
    local pids
    pids="$(trainer_pids "$pid")"
    say "received SIG$1: sending USR1 to the training processes on this node (${pids:-none found}); every rank saves" \
        "a checkpoint at the next step boundary"
    # shellcheck disable=SC2086
    [[ -n "$pids" ]] && kill -USR1 $pids 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
if (( $(wc -l < "$hostfile") > 1 )); then
    where=(--hostfile "$hostfile")
else
    # One node: the launcher would insist on ssh to a hostfile's single host, so start the processes locally.
    where=(--num_gpus "$slots")
fi
"$DEEPSPEED" "${where[@]}" --master_addr "$master" --master_port $((20000 + SLURM_JOB_ID % 20000)) \
    --module pretrain "${args[@]}" &
pid=$!
while true; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done
case "$rc" in
    0) say "training finished; not requeued" ;;
    75) if (( ${SLURM_RESTART_COUNT:-0} < ${MAX_RESTARTS:-20} )); then
            say "checkpoint saved after preemption: requeueing job $SLURM_JOB_ID; it resumes from that checkpoint"
            scontrol requeue "$SLURM_JOB_ID" && exit 0
            say "scontrol requeue failed (job cancelled, or submitted without --requeue?): resubmit to resume"
        else
            say "not requeued: ${SLURM_RESTART_COUNT:-0} restarts already (MAX_RESTARTS=${MAX_RESTARTS:-20})"
        fi ;;
    2) say "configuration or data error (exit 2, message above); not requeued" ;;
    *) say "training failed with exit code $rc; not requeued" ;;
esac
exit "$rc"
