#!/usr/bin/env bash
# The released QDrop code's ms/iteration on ResNet-18 units at 224x224 (bench/imagenet/released_qdrop.py), in its own
# venv under /tmp beside a checkout of github.com/wimh966/QDrop (QDROP_GIT: a git dir or URL to clone; never vendored).
# Usage: bash bench/imagenet/released_qdrop.sh [CALIB] [ITERS_PAIR]   e.g. bash bench/imagenet/released_qdrop.sh 64 2,12
# Writes bench/imagenet/released_qdrop.json; compare with metaaug's per-unit ms/iter from memory.sh (tables.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
calib=${1:-64} iters=${2:-2,12}
ROOT=${QDROP_ROOT:-/tmp/qdrop-released}
QDROP_GIT=${QDROP_GIT:-https://github.com/wimh966/QDrop}
mkdir -p "$ROOT"
if [ ! -d "$ROOT/src/qdrop" ]; then
    if [ -d "$QDROP_GIT" ]; then
        mkdir -p "$ROOT/src" && git --git-dir="$QDROP_GIT" archive HEAD | tar -x -C "$ROOT/src"
    else
        git clone -q "$QDROP_GIT" "$ROOT/src"
    fi
fi
if [ ! -x "$ROOT/venv/bin/python" ]; then
    python3 -m venv "$ROOT/venv"
    "$ROOT/venv/bin/pip" install -q "torch==2.13.0" scipy pyyaml easydict numpy
fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$ROOT/venv/bin/python" bench/imagenet/released_qdrop.py --qdrop "$ROOT/src" \
    --calib "$calib" --iters "$iters" --out bench/imagenet/released_qdrop.json
