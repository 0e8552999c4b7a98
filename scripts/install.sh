#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project into it.
# Usage: bash scripts/install.sh [--dev]
#   --dev  also installs the test/benchmark extras (pytest, ruff, timm and transformers as reference implementations).
# torch and torchvision are pinned to the builds on this project's machines and installed first, so that no other
# dependency can pull a different torch.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
python_bin="${PYTHON:-python3}"

if [[ ! -x .venv/bin/python ]]; then
    echo "[install] creating .venv with $($python_bin --version)"
    "$python_bin" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
echo "[install] torch==2.14.1 torchvision==0.29.1"
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
echo "[install] swinv2-pretrain${extras}"
.venv/bin/python -m pip install --quiet -e ".${extras}"
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.14.1"), f"unexpected torch {torch.__version__}: the install pulled another build"
print(f"[install] ok: torch {torch.__version__}")
PY
