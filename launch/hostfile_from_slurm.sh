#!/usr/bin/env bash
# Write a DeepSpeed hostfile ("host slots=N" per line) for the current SLURM allocation.
# Usage: bash launch/hostfile_from_slurm.sh OUTPUT [SLOTS_PER_NODE]
#   SLOTS_PER_NODE defaults to SLURM_GPUS_ON_NODE, then SLURM_NTASKS_PER_NODE, then 1.
set -euo pipefail
out="${1:?usage: hostfile_from_slurm.sh OUTPUT [SLOTS_PER_NODE]}"
nodelist="${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set: run inside a SLURM allocation}"
slots="${2:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}"
if [[ ! "$slots" =~ ^[1-9][0-9]*$ ]]; then
    echo "hostfile_from_slurm.sh: SLOTS_PER_NODE must be a positive number, not '$slots'" >&2
    exit 2
fi
if ! hosts="$(scontrol show hostnames "$nodelist")" || [[ -z "$hosts" ]]; then
    echo "hostfile_from_slurm.sh: \`scontrol show hostnames '$nodelist'\` failed or printed nothing" >&2
    exit 1
fi
tmp="$out.partial"
awk -v s="$slots" 'NF {print $1 " slots=" s}' <<< "$hosts" > "$tmp"
mv "$tmp" "$out"
echo "hostfile $out: $(wc -l < "$out") nodes x $slots slots"
