#!/usr/bin/env bash
# A real SLURM cluster on this machine, from Debian's packages, for the tests (and CI).
#   bash tests/slurm/cluster.sh start DIR [NODES]   # NODES = 1 (default) or 2 slurmd daemons on this host
#   bash tests/slurm/cluster.sh stop DIR
# start installs slurm-wlm and munge when missing (root; apt-get), writes DIR/slurm.conf, starts munged (if not
# running), slurmctld and one slurmd per node, waits until every node is idle and prints `export SLURM_CONF=...`.
# Two partitions on the same nodes: `debug` (the default) and `urgent`, whose jobs preempt debug's (partition priority)
# with PreemptMode=REQUEUE and a grace time of $GRACE_TIME s (env, default 60): the processes of the preempted job's
# steps get SIGCONT + SIGTERM at once (on SLURM 22.05 not the batch shell), everything left is killed at the end of
# the grace time, and the job is requeued.
# With 2 nodes it adds `127.0.0.1 nN` lines to /etc/hosts for the node names that do not resolve there yet.
# Everything it starts or adds is recorded in DIR: the pid files of the daemons (munged.pid only when it started
# munged) and DIR/hosts.added. stop undoes exactly that: it stops those daemons by pid (never by process name; a pid
# whose process is no longer the daemon is left alone) and removes the /etc/hosts lines it added.
set -euo pipefail

cmd="${1:?usage: cluster.sh start|stop DIR [NODES]}"
dir="${2:?usage: cluster.sh start|stop DIR [NODES]}"
nodes="${3:-1}"
host="$(hostname)"
hosts_file="${HOSTS_FILE:-/etc/hosts}" # another file only to test this script
grace="${GRACE_TIME:-60}"
if [[ ! "$grace" =~ ^[0-9]+$ ]]; then
    echo "[slurm-cluster] GRACE_TIME must be a whole number of seconds, not '$grace'" >&2
    exit 2
fi

log() { echo "[slurm-cluster] $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    if [[ "$(id -u)" != 0 ]]; then
        log "slurm-wlm and munge are not installed and this is not root: cannot install them"
        exit 3
    fi
    log "installing slurm-wlm and munge (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if command -v runuser >/dev/null; then
        runuser -u munge -- /usr/sbin/munged
    else
        su -s /bin/sh munge -c /usr/sbin/munged
    fi
    # munged has daemonized and written its own pid file (default /run/munge/munged.pid): stop reads our copy.
    cp /run/munge/munged.pid "$dir/munged.pid" || log "munged wrote no pid file: stop will leave it running"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "munged did not come up"
    exit 1
}

write_conf() {
    local mem cpus
    mem=$(( $(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo) / (nodes + 1) ))
    cpus=$(nproc)
    mkdir -p "$dir/state"
    cat > "$dir/slurm.conf" <<CONF
ClusterName=swinv2test
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmctldPort=$(( 16800 + RANDOM % 100 ))
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmdSpoolDir=$dir/spool-%n
SlurmdLogFile=$dir/slurmd-%n.log
SchedulerParameters=batch_sched_delay=0
MinJobAge=600
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
CONF
    if (( nodes == 1 )); then
        echo "NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN" >> "$dir/slurm.conf"
        partitions "$host"
    else
        local names=()
        for i in $(seq 1 "$nodes"); do
            names+=("n$i")
            echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$(( 17000 + i )) CPUs=$cpus RealMemory=$mem State=UNKNOWN" >> "$dir/slurm.conf"
            if ! grep -qE "^127\.0\.0\.1.*\bn$i\b" "$hosts_file"; then
                echo "127.0.0.1 n$i" >> "$hosts_file"
                echo "127.0.0.1 n$i" >> "$dir/hosts.added"
                echo "$hosts_file" > "$dir/hosts.file"
            fi
        done
        local joined
        joined=$(IFS=,; echo "${names[*]}")
        partitions "$joined"
    fi
}

# $1: the nodes. A job in `urgent` that needs resources held by a `debug` job preempts it (see the header).
partitions() {
    cat >> "$dir/slurm.conf" <<CONF
PartitionName=debug Nodes=$1 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=$grace
PartitionName=urgent Nodes=$1 MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
CONF
}

start() {
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    install_packages
    start_munge
    write_conf
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -c -f "$SLURM_CONF"
    if (( nodes == 1 )); then
        mkdir -p "$dir/spool-$host"
        slurmd -f "$SLURM_CONF"
    else
        for i in $(seq 1 "$nodes"); do
            mkdir -p "$dir/spool-n$i"
            slurmd -f "$SLURM_CONF" -N "n$i"
        done
    fi
    for _ in $(seq 100); do
        local idle
        idle=$(sinfo -h -o "%T %D" 2>/dev/null | awk '$1 == "idle" {n += $2} END {print n + 0}')
        if (( idle == nodes )); then
            log "cluster up: $nodes node(s) idle, SLURM_CONF=$SLURM_CONF"
            echo "export SLURM_CONF=$SLURM_CONF"
            return
        fi
        sleep 0.3
    done
    log "nodes did not become idle:"; sinfo >&2 || true
    tail -n 20 "$dir"/*.log >&2 || true
    exit 1
}

# Stop the daemon whose pid is in $1 if that process is still $2 (a pid can be reused once the daemon is gone).
stop_pid() {
    local pidfile="$1" name="$2" pid comm
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ && "$comm" == "$name" ]]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        log "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

# Remove from /etc/hosts the lines listed in DIR/hosts.added, one occurrence each (the last one: start appended it).
# /etc/hosts is rewritten in place: it can be a bind mount, which cannot be replaced by a rename.
remove_hosts() {
    local added="$dir/hosts.added" kept hosts_file
    [[ -f "$added" ]] || return 0
    hosts_file="$(cat "$dir/hosts.file")"
    kept="$(awk 'NR == FNR {drop[$0]++; next} {lines[++n] = $0}
        END {for (i = n; i > 0; i--) if (drop[lines[i]] > 0) {drop[lines[i]]--; lines[i] = "\001"}
             for (i = 1; i <= n; i++) if (lines[i] != "\001") print lines[i]}' "$added" "$hosts_file")"
    printf '%s\n' "$kept" > "$hosts_file"
    log "removed from $hosts_file: $(paste -sd, "$added")"
    rm -f "$added" "$dir/hosts.file"
}

stop() {
    [[ -d "$dir" ]] || return 0
    local pidfile
    for pidfile in "$dir"/slurmd-*.pid; do
        stop_pid "$pidfile" slurmd
    done
    stop_pid "$dir/slurmctld.pid" slurmctld
    stop_pid "$dir/munged.pid" munged
    remove_hosts
    log "stopped the daemons recorded in $dir"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: cluster.sh start|stop DIR [NODES]" >&2; exit 2 ;;
esac
