#!/usr/bin/env bash
# Each speed option on and off on the bench's ImageNet-sized CNNs at 224x224 (issue #32): one memory.sh run per model
# and variant, labelled opt-MODEL-VARIANT; tables.py turns them into a table per model (peak RSS, ms/iteration per unit).
# Usage: bash bench/imagenet/options.sh [CALIB] [ITERS] [MODELS...]
#   e.g. bash bench/imagenet/options.sh 64 6 resnet18 efficientnet_b0 regnetx_400mf resnet50
# Variants: float32 (the default), bf16 (compute_dtype=bfloat16), compiled (compile_fake_quant=true), both, and
# "before" (the code before issue #32's work, c7963f4^, checked out to /tmp/metaaug-before) where BEFORE=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
calib=${1:-64} iters=${2:-6}
shift 2 || true
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(resnet18 efficientnet_b0 regnetx_400mf resnet50)
if [ "${BEFORE:-0}" = 1 ] && [ ! -d /tmp/metaaug-before ]; then
    mkdir -p /tmp/metaaug-before && git archive c7963f4^ src | tar -x -C /tmp/metaaug-before
fi
for m in "${models[@]}"; do
    if [ "${BEFORE:-0}" = 1 ]; then
        PYTHONPATH_OVERRIDE=/tmp/metaaug-before/src bash bench/imagenet/memory.sh "opt-$m-before" "$m" "$calib" "$iters"
    fi
    bash bench/imagenet/memory.sh "opt-$m-float32" "$m" "$calib" "$iters"
    bash bench/imagenet/memory.sh "opt-$m-bf16" "$m" "$calib" "$iters" --set compute_dtype=bfloat16
    bash bench/imagenet/memory.sh "opt-$m-compiled" "$m" "$calib" "$iters" --set compile_fake_quant=true
    bash bench/imagenet/memory.sh "opt-$m-both" "$m" "$calib" "$iters" --set compute_dtype=bfloat16 --set compile_fake_quant=true
done
.venv/bin/python bench/imagenet/tables.py > /dev/null
