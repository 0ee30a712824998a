#!/usr/bin/env bash
# Idempotent set-up: Fashion-MNIST from Debian, a virtualenv in .venv, metaaug installed with its dev extras.
# Re-running is cheap: each step checks whether it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
FMNIST=/usr/share/datasets/fashion-mnist

if [ ! -f "$FMNIST/t10k-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing dataset-fashion-mnist"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST missing; run as root: apt-get install -y dataset-fashion-mnist" >&2
    exit 1
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.metaaug-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing metaaug into .venv (torch 2.13.0 CPU wheel)"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
  echo "$want" > "$stamp"
fi
