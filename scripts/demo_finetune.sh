#!/usr/bin/env bash
# Install (with the demo and finetune extras: scikit-image's images, timm's augmentations and losses), write
# scikit-image's lfw_subset (face / non-face) as labelled class folders, and fine-tune the demo backbone on the CPU.
# Fine-tunes from runs/demo_cpu (scripts/demo.sh) when that run has a checkpoint; `--scratch` starts from random
# initialisation instead (into runs/demo_finetune_scratch), with the same recipe and budget, for comparison.
# Other arguments are config overrides, e.g. `bash scripts/demo_finetune.sh schedule.epochs=10`.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=0
if [[ "${1:-}" == "--scratch" ]]; then
    scratch=1
    shift
fi
bash scripts/install.sh --demo --extras finetune
if [[ ! -d data/lfw_faces/train || ! -d data/lfw_faces/val ]]; then
    .venv/bin/python -m pretrain.sample_data --labelled data/lfw_faces
fi
init=()
if [[ $scratch == 1 ]]; then
    init=(training.output_dir=runs/demo_finetune_scratch)
elif compgen -G "runs/demo_cpu/checkpoints/step-*/COMPLETE" > /dev/null; then
    init=(finetune.init=runs/demo_cpu)
else
    echo "[demo_finetune] runs/demo_cpu has no complete checkpoint (run scripts/demo.sh first): random initialisation" >&2
fi
exec .venv/bin/python -m pretrain.finetune --config configs/demo_finetune_cpu.yaml "${init[@]}" "$@"
