#!/usr/bin/env bash
# Set everything up, lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest "$@"
