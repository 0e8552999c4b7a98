#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project into it, with the exact
# versions of constraints.txt (the builds this project tests with; pyproject.toml itself only has lower bounds, so
# that `pip install -e .` on a cluster keeps the site's torch).
# Usage: bash scripts/install.sh [--dev] [--demo] [--extras NAME[,NAME...]]
#   --dev     what scripts/test.sh needs: pytest, ruff, the reference implementations (timm, transformers), the demo
#             photos and both trackers
#   --demo    what scripts/demo.sh needs: the sample photos (scikit-image)
#   --extras  other extras of pyproject.toml, e.g. --extras wandb or --extras wandb,mlflow
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dev) extras+=(dev) ;;
        --demo) extras+=(demo) ;;
        --extras)
            if [[ $# -lt 2 || -z "$2" ]]; then
                echo "install.sh: --extras needs a value, e.g. --extras wandb,mlflow" >&2
                exit 2
            fi
            IFS=, read -ra named <<< "$2"
            extras+=("${named[@]}")
            shift
            ;;
        *)
            echo "install.sh: unknown option '$1'; accepted: --dev, --demo, --extras NAME[,NAME...]" >&2
            exit 2
            ;;
    esac
    shift
done
for name in "${extras[@]}"; do
    # pip only warns about an extra the project does not have: refuse it here instead.
    if ! sed -n '/^\[project.optional-dependencies\]/,/^\[/p' pyproject.toml | grep -qE "^${name} = \["; then
        known=$(sed -n '/^\[project.optional-dependencies\]/,/^\[/p' pyproject.toml | sed -nE 's/^([a-z0-9_-]+) = \[.*/\1/p')
        echo "install.sh: unknown extra '${name}'; accepted: $(echo "$known" | paste -sd, -)" >&2
        exit 2
    fi
done
spec="."
if [[ ${#extras[@]} -gt 0 ]]; then
    spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
python_bin="${PYTHON:-python3}"

if [[ ! -x .venv/bin/python ]]; then
    echo "[install] creating .venv with $($python_bin --version)"
    "$python_bin" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -c constraints.txt --upgrade pip
echo "[install] swinv2-pretrain${spec#.} with the versions of constraints.txt"
.venv/bin/python -m pip install --quiet -c constraints.txt -e "${spec}"
torch_pin=$(sed -nE 's/^torch==([^ ;#]+).*/\1/p' constraints.txt)
.venv/bin/python - "$torch_pin" <<'PY'
import sys

import torch

pin = sys.argv[1]
assert torch.__version__.split("+")[0] == pin, f"torch {torch.__version__} in .venv, not {pin} (constraints.txt)"
print(f"[install] ok: torch {torch.__version__}")
PY
