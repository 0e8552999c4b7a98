# shellcheck shell=bash
# What slurm/pretrain.sh (srun) and slurm/pretrain_deepspeed.sh (deepspeed launcher) share, so that each of these is
# done one way: the trainer's arguments and the config check, the master address and port, the environment of the
# ranks, the signal traps, waiting for the launcher, and the requeue decision.
#
# Sourced by those scripts (not run) after they set SCRIPT_NAME and define `forward_signal` (passes a preemption
# signal on to the training processes; returns non-zero when there is nothing to signal yet). The caller then runs:
#   slurm_trainer_args "$@"; slurm_master; slurm_env GPUS THREADS; slurm_launch CMD...; slurm_finish "$rc"

EXIT_PREEMPTED=75 # the trainer saved a complete checkpoint after a signal (pretrain/stopping.py)
EXIT_CONFIG=2     # configuration, launch or data error (pretrain/__main__.py)

PYTHON="${PYTHON:-python}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
REQUEUE_ON_CRASH="${REQUEUE_ON_CRASH:-0}"
restarts="${SLURM_RESTART_COUNT:-0}"

say() { echo "[$SCRIPT_NAME $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?} run $((restarts + 1))] $*"; }

if [[ ! "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
    say "MAX_RESTARTS must be a whole number, not '$MAX_RESTARTS'"
    exit $EXIT_CONFIG
fi

# GPUs per node: GPUS_PER_NODE, else what SLURM allocated (SLURM_GPUS_PER_NODE may read "a100:8"), else 0.
slurm_gpus_per_node() {
    local g="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}}"
    g="${g##*:}"
    echo "${g:-0}"
}

# Sets the array `args` to the trainer's arguments: CONFIG=FILE (environment) becomes `--config FILE` in front of the
# script's arguments. Requires a config (`--config FILE` or `--config=FILE`) and checks the whole configuration once,
# here in the batch shell (`python -m pretrain --print-config`), so that a bad one fails within seconds, before any
# rank starts, with the error in the job output. A requeued run gets `checkpoint.resume=auto` last (the last value of
# a key wins): it continues from its own newest checkpoint, whatever checkpoint.resume said for the first start.
slurm_trainer_args() {
    args=("$@")
    if [[ -n "${CONFIG:-}" ]]; then
        args=(--config "$CONFIG" "${args[@]}")
    fi
    if ((restarts > 0)); then
        args+=(checkpoint.resume=auto)
        say "requeued run: checkpoint.resume=auto added, so the run continues from its newest complete checkpoint"
    fi
    local a found=""
    for a in "${args[@]}"; do
        case "$a" in
            --config | --config=*) found=1 ;;
        esac
    done
    if [[ -z "$found" ]]; then
        say "no config given: pass --config FILE (or --config=FILE) or set CONFIG=FILE; not requeued"
        exit $EXIT_CONFIG
    fi
    local rc=0
    "$PYTHON" -m pretrain --print-config "${args[@]}" > /dev/null || rc=$?
    if ((rc != 0)); then
        say "the configuration check (\`$PYTHON -m pretrain --print-config ...\`, in $PWD) failed with exit code $rc" \
            "(message above); nothing was started; not requeued"
        exit $EXIT_CONFIG
    fi
}

# MASTER_ADDR: the first node of the allocation. Never a silent fallback to localhost: with more than one node each
# would form its own world and hang. MASTER_PORT: kept when set, else derived from the job id, so that jobs sharing
# a node do not collide.
slurm_master() {
    local hosts
    hosts="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}")" || hosts=""
    MASTER_ADDR="${hosts%%$'\n'*}"
    if [[ -z "$MASTER_ADDR" ]]; then
        say "cannot determine the master node: \`scontrol show hostnames '${SLURM_JOB_NODELIST:-}'\` failed or" \
            "printed nothing (scontrol on PATH? slurmctld reachable?); not falling back to localhost"
        exit 1
    fi
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    if [[ ! "$MASTER_PORT" =~ ^[0-9]+$ ]] || ((MASTER_PORT < 1 || MASTER_PORT > 65535)); then
        say "MASTER_PORT must be a port number, not '$MASTER_PORT'"
        exit 1
    fi
    export MASTER_ADDR MASTER_PORT
}

# The environment of the ranks. $1: GPUs per node (0 leaves out the GPU-only variables), $2: threads per rank.
slurm_env() {
    export PYTHONFAULTHANDLER=1
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$2}"
    # srun (SLURM 22.05+) no longer takes --cpus-per-task from the job: without this, every rank (and its data
    # loader workers) would be confined to one CPU on clusters that bind tasks to CPUs.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
    fi
    if [[ "$1" != 0 ]]; then
        # NCCL: fail fast on collective errors and dump the flight recorder on timeouts instead of hanging.
        export TORCH_NCCL_ASYNC_ERROR_HANDLING=3
        export TORCH_NCCL_DUMP_ON_TIMEOUT=1
        export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
        export PYTORCH_ALLOC_CONF=expandable_segments:True
    fi
}

# Signals. SLURM sends USR1 to this batch shell before the time limit (--signal=B:USR1@...) or by hand
# (scancel --signal=USR1 --batch); SIGTERM is handled the same way. The shell only runs a trap while it is not blocked
# in a foreground command, hence the launcher in the background and `wait`.
# What else SLURM signals (seen on 22.05): `scancel --signal=TERM <job>` and a preemption with GraceTime send SIGTERM
# (and SIGCONT) straight to every process of the job's steps, i.e. every rank and its data loader workers, not to this
# shell: the ranks save and exit 75 on their own and srun returns 75. `scancel --full --signal=TERM` signals this
# shell's whole process group; srun must not be in it, since srun answers SIGTERM by killing its tasks at once
# ("forcing job termination"), whatever disposition it inherited: the launcher runs in a session of its own (setsid)
# and gets the signal from forward_signal only. Whatever mix arrives, each rank sees TERM and/or USR1, which the
# trainer treats alike (never SIGINT, whose second delivery aborts).
signalled=""  # the last signal received: USR1 or TERM
_child=""     # the pid of the launcher's wrapper (see slurm_launch), once started
_pending=""   # a signal that could not be passed on yet (no training process to signal)
_on_signal() {
    signalled="$1"
    if [[ -z "$_child" ]]; then
        say "received SIG$1 before training started"
        return
    fi
    say "received SIG$1: asking every rank to save a checkpoint at the next step boundary"
    if forward_signal "$1"; then
        _pending=""
    else
        _pending="$1"
        say "no training process to signal yet: trying again every second until one starts"
    fi
}
trap '_on_signal USR1' USR1
trap '_on_signal TERM' TERM

# Runs "$@" in the background and waits for it; sets `rc` to its exit status.
# The command runs under a small wrapper shell (without traps) that writes its exit status to a file, and `_child` is
# that wrapper's pid (forward_signal signals the wrapper's descendants). The status cannot be taken from this shell's
# `wait`: when a trapped signal arrives just as the command ends, `wait` returns 128+n, and bash 5.2 then sometimes
# loses the status altogether (a second `wait` returns -1), so a job that saved and exited 75 would look like a crash.
slurm_launch() {
    if [[ -n "$signalled" ]]; then
        _requeue $EXIT_PREEMPTED "SIG$signalled before training started: not started, nothing new to save"
    fi
    local status waited
    status="$(mktemp "${TMPDIR:-/tmp}/slurm-launch-$SLURM_JOB_ID.XXXXXX" 2>/dev/null ||
        mktemp "/tmp/slurm-launch-$SLURM_JOB_ID.XXXXXX")" || exit 1
    # The wrapper survives the signals SLURM may send to every process of the job (SIGTERM at a time limit or on
    # preemption, USR1 from `scancel --signal=USR1` without --batch) so that it can still write the status. A handler,
    # not an ignored signal, so that the launcher it starts does not inherit "ignore". The launcher itself runs in a
    # new session, out of this shell's process group, which `scancel --full` signals (see above). `setsid -w`: the
    # wrapper's child is never a process-group leader, so setsid execs in place (no fork) and forward_signal still
    # finds the launcher as the wrapper's child; -w keeps the status should it ever fork.
    local session=()
    if command -v setsid > /dev/null; then
        session=(setsid -w)
    else
        say "setsid not found: \`scancel --full\` would reach $1, which may kill the ranks before they save"
    fi
    # shellcheck disable=SC2016
    bash -c 'trap : TERM USR1; "$@"; echo $? > "$0"' "$status" ${session[@]+"${session[@]}"} "$@" &
    _child=$!
    if [[ -n "$signalled" ]]; then # the signal came while the launcher was being started
        if ! forward_signal "$signalled"; then _pending="$signalled"; fi
    fi
    while true; do
        wait "$_child"
        waited=$?
        if [[ -s "$status" ]]; then # the command ended: its exit status
            rc="$(< "$status")"
            break
        fi
        if ! kill -0 "$_child" 2>/dev/null; then # the wrapper ended without writing a status (killed)
            rc=$waited
            [[ "$rc" =~ ^[0-9]+$ ]] || rc=1
            break
        fi
        # A trap interrupted `wait`: the command goes on.
        while [[ -n "$_pending" ]] && kill -0 "$_child" 2>/dev/null; do
            sleep 1 # the training processes are not there yet: try again
            if forward_signal "$_pending"; then _pending=""; fi
        done
    done
    rm -f "$status"
}

_requeue() { # $1: exit code, $2: why
    # Nothing is left to pass a signal on to; and the SIGTERM that SLURM sends every process of the job once the
    # requeue takes effect must not end scontrol before it returns (its children inherit the ignored signals).
    trap '' TERM USR1
    if ((restarts >= MAX_RESTARTS)); then
        say "not requeued: $2, but the job has already been requeued $restarts times (MAX_RESTARTS=$MAX_RESTARTS);" \
            "resubmit it to go on from the newest complete checkpoint"
        exit "$1"
    fi
    # A preempted or signalled job is still RUNNING here. One that SLURM is already ending (COMPLETING) was cancelled
    # (a plain scancel also sends SIGTERM, and SLURM would accept the requeue) or hit its time limit: only the latter
    # goes on.
    local job state reason
    job="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null)"
    state="$(sed -n 's/^ *JobState=\([A-Z_]*\).*/\1/p' <<< "$job")"
    reason="$(sed -n 's/^ *JobState=.* Reason=\([^ ]*\).*/\1/p' <<< "$job")"
    if [[ -n "$state" && "$state" != RUNNING && "$reason" != TimeLimit ]]; then
        say "not requeued: $2, but SLURM is already ending the job (JobState=$state Reason=$reason: cancelled with" \
            "scancel?); resubmit it to go on from the newest complete checkpoint"
        exit "$1"
    fi
    say "requeueing job $SLURM_JOB_ID ($2, requeue $((restarts + 1)) of at most $MAX_RESTARTS); it resumes from the" \
        "newest complete checkpoint"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        say "scontrol requeue failed (job cancelled, or submitted without --requeue?): resubmit to resume"
        exit "$1"
    fi
    exit 0
}

# The requeue decision for the launcher's exit status $1, printed with its reason; exits the batch shell.
slurm_finish() {
    local rc="$1"
    case "$rc" in
        0)
            say "training finished (exit 0); not requeued"
            exit 0
            ;;
        "$EXIT_PREEMPTED")
            _requeue "$rc" "checkpoint saved after ${signalled:+SIG}${signalled:-a signal} (exit $rc)"
            ;;
        "$EXIT_CONFIG")
            say "configuration or data error (exit $rc, message above); not requeued"
            ;;
        *)
            if [[ -n "$signalled" ]]; then
                _requeue "$rc" "SIG$signalled, then the run ended with exit code $rc before it could save (a signal during start-up ends the ranks)"
            fi
            # 128 + SIGTERM: a rank was ended by a SIGTERM sent to the steps only (a preemption, `scancel
            # --signal=TERM`) before its handlers were installed; this shell saw no signal. Requeued like a preemption
            # (a cancelled job refuses the requeue: see _requeue).
            if ((rc == 128 + 15)); then
                _requeue "$rc" "the ranks were ended by SIGTERM (exit $rc) before they could save: a preemption or scancel during start-up"
            fi
            if [[ "$REQUEUE_ON_CRASH" == 1 ]]; then
                _requeue "$rc" "crash with exit code $rc, REQUEUE_ON_CRASH=1"
            fi
            say "training failed with exit code $rc; not requeued (set REQUEUE_ON_CRASH=1 to requeue crashes)"
            ;;
    esac
    exit "$rc"
}
