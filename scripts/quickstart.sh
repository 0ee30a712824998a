#!/usr/bin/env bash
# Set everything up, then quantize the bundled ResNet-20 on Fashion-MNIST with the embedded default (W2A4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/metaaug quantize "$@"
