#!/usr/bin/env bash
# Install (with the demo extra: scikit-image's sample photos), pack the photos into webdataset shards, and run a
# small SimMIM pretraining on the CPU.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh training.max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --demo
if [[ ! -f data/sample_shards/sizes.json ]]; then
    .venv/bin/python -m pretrain.sample_data data/sample_shards
fi
exec .venv/bin/python -m pretrain --config configs/demo_cpu.yaml "$@"
