#!/usr/bin/env bash
# Consolidate a run's newest complete checkpoint into one weights file, and extract the backbone for fine-tuning.
# Runs as a small CPU job after training, typically as a dependent job:
#   jid=$(sbatch --parsable slurm/pretrain.sh --config configs/simmim_swinv2_base_192_w12.yaml)
#   sbatch --dependency=afterok:$jid slurm/convert.sh runs/simmim_swinv2_base_192_w12
# or directly on a login node: bash slurm/convert.sh RUN_DIR
# Writes RUN_DIR/export/simmim-step-<N>.safetensors (encoder + decoder) and RUN_DIR/export/backbone-step-<N>.safetensors.
# Set DTYPE=bf16 for half-size files, FORCE=1 to replace existing outputs.
#
#SBATCH --job-name=swinv2-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.out
set -euo pipefail
run_dir="${1:?usage: convert.sh RUN_DIR}"
PYTHON="${PYTHON:-python}"  # e.g. PYTHON=/path/to/.venv/bin/python
latest=$(find "$run_dir/checkpoints" -mindepth 2 -maxdepth 2 -name COMPLETE -printf '%h\n' 2>/dev/null \
    | sed -E 's/.*step-([0-9]+)$/\1 &/' | sort -n | tail -n 1 | cut -d' ' -f2)
if [[ -z "$latest" ]]; then
    echo "[slurm/convert.sh] no complete checkpoint under $run_dir/checkpoints" >&2
    exit 2
fi
step="${latest##*step-}"
mkdir -p "$run_dir/export"
force=()
[[ "${FORCE:-0}" == 1 ]] && force=(--force)
full="$run_dir/export/simmim-step-$step.safetensors"
echo "[slurm/convert.sh] consolidating $latest -> $full"
"$PYTHON" -m pretrain.convert consolidate "$latest" -o "$full" --dtype "${DTYPE:-fp32}" "${force[@]}"
echo "[slurm/convert.sh] extracting the backbone -> $run_dir/export/backbone-step-$step.safetensors"
"$PYTHON" -m pretrain.convert backbone "$full" -o "$run_dir/export/backbone-step-$step.safetensors" "${force[@]}"
"$PYTHON" -m pretrain.convert inspect "$run_dir/export/backbone-step-$step.safetensors"
