#!/usr/bin/env bash
# Install from scratch (if needed, with the exact versions of constraints.txt and the dev extra) and run the whole
# test suite: lint, then pytest.
# The SLURM tests bring up real slurmctld/slurmd/munge daemons from Debian packages (installed on demand, root needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -ra "$@"
