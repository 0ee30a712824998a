#!/usr/bin/env bash
# Cache storage dtype (issue #32): QDrop with the unit caches stored in float32 (the default), bfloat16 and float16,
# on the bundled ResNet-20 at W2A4, 1024 calibration images, 500 iterations per unit, 3 seeds (two runs at once,
# one thread each).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
.venv/bin/python bench/grid.py --out bench/cache_dtype --models resnet20 --methods qdrop \
  --variant bf16=qdrop:cache_dtype=bfloat16 --variant fp16=qdrop:cache_dtype=float16 \
  --settings W2A4 --calib-sizes 1024 --seeds 0,1,2 --iters 500 --jobs 2
