#!/usr/bin/env bash
# A real SLURM cluster on this machine, from Debian's packages, for the tests (and CI).
#   bash tests/slurm/cluster.sh start DIR [NODES]   # NODES = 1 (default) or 2 slurmd daemons on this host
#   bash tests/slurm/cluster.sh stop DIR
# start installs slurm-wlm and munge when missing (root; apt-get), writes DIR/slurm.conf, starts munged (if not
# running), slurmctld and one slurmd per node, waits until every node is idle and prints `export SLURM_CONF=...`.
# stop kills exactly the daemons it started, by the pids recorded in DIR (never by process name).
set -euo pipefail

cmd="${1:?usage: cluster.sh start|stop DIR [NODES]}"
dir="${2:?usage: cluster.sh start|stop DIR [NODES]}"
nodes="${3:-1}"
host="$(hostname)"

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
    pgrep -u munge -n munged > "$dir/munged.pid" || true
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
CONF
    if (( nodes == 1 )); then
        echo "NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN" >> "$dir/slurm.conf"
        echo "PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >> "$dir/slurm.conf"
    else
        local names=()
        for i in $(seq 1 "$nodes"); do
            names+=("n$i")
            echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$(( 17000 + i )) CPUs=$cpus RealMemory=$mem State=UNKNOWN" >> "$dir/slurm.conf"
            grep -qE "^127\.0\.0\.1.*\bn$i\b" /etc/hosts || echo "127.0.0.1 n$i" >> /etc/hosts
        done
        local joined
        joined=$(IFS=,; echo "${names[*]}")
        echo "PartitionName=debug Nodes=$joined Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >> "$dir/slurm.conf"
    fi
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

stop() {
    [[ -d "$dir" ]] || return 0
    for pidfile in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid; do
        [[ -f "$pidfile" ]] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
    log "stopped the daemons recorded in $dir"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: cluster.sh start|stop DIR [NODES]" >&2; exit 2 ;;
esac
