#!/usr/bin/env bash
# The GPU check of issue #32, for a CUDA machine (the tests never need one). In order of what matters most:
#   resnet20      the bundled ResNet-20, QDrop W2A4, 1024 images, 2000 iterations, seed 0 (accuracy and time)
#   resnet18      a ResNet-18 (bench/imagenet/models.py) at 224x224, QDrop W4A4, 256 images: ms/iteration per unit
#   cuda_tests    tests/test_cuda.py (every command on the GPU, and the CPU reproduces what it made)
#   reference / metaaug_ref   the plain-PyTorch reference loop (bench/speed/reference.py) and metaaug's QDrop with
#                 the same recipe (lr_weight_scale=0), one after the other on the GPU: the reconstruction-time ratio
#   resnet18_bf16 / resnet18_fast   the ResNet-18 timing with compute_dtype=bfloat16, and with --fast (bf16 + compile)
# Each step runs under its own time limit and inside BUDGET seconds in all; a failed or cut step is recorded and the
# rest still run. Writes bench/gpu/results.md (bench/gpu_results.py) with the GPU named.
#
#   bash scripts/setup.sh && bash bench/gpu.sh
#   PY=python3 PYTHONPATH=src bash bench/gpu.sh     # where the machine's own python has a CUDA torch (the device tool)
#   DEVICE=cpu R20_ITERS=4 R18_ITERS=4 REF_ITERS=4 OUT=/tmp/gpu-smoke bash bench/gpu.sh   # the script's smoke test
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench/gpu}
BUDGET=${BUDGET:-900}
R20_ITERS=${R20_ITERS:-2000}
R18_ITERS=${R18_ITERS:-200}
REF_ITERS=${REF_ITERS:-500}
RUNS=/tmp/metaaug-gpu
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
[ "$DEVICE" = cpu ] || "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device here')" || exit 2
rm -rf "$RUNS" "$OUT"/*.log "$OUT"/*.json "$OUT"/*.xml "$OUT/steps.tsv"
mkdir -p "$RUNS"
{
    "$PY" -c "import torch, platform; print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('python', platform.python_version())"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi /'
} > "$OUT/env.txt"
printf 'command\t%s\n' "R20_ITERS=$R20_ITERS R18_ITERS=$R18_ITERS REF_ITERS=$REF_ITERS BUDGET=$BUDGET bash bench/gpu.sh" >> "$OUT/env.txt"
began=$(date +%s)

# step NAME LIMIT CMD...: run CMD under min(LIMIT, what is left of BUDGET); log in $OUT/NAME.log; a row in steps.tsv
step() {
    local name=$1 limit=$2 left start rc
    shift 2
    left=$(( BUDGET - ($(date +%s) - began) ))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"; return; fi
    echo "== $name (limit ${limit}s)"
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$([ $rc = 0 ] && echo ok || { [ $rc = 124 ] && echo "cut at ${limit}s" || echo "exit $rc"; })" \
        "$(( $(date +%s) - start ))" >> "$OUT/steps.tsv"
    tail -2 "$OUT/$name.log"
}

# quantize NAME LIMIT ARGS...: a `metaaug quantize` step whose report is kept as $OUT/NAME.json
quantize() {
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PY" -m metaaug quantize --device "$DEVICE" --out "$RUNS/$name" "$@"
    [ -f "$RUNS/$name/report.json" ] && cp "$RUNS/$name/report.json" "$OUT/$name.json"
}

DATA=$RUNS/in224
R18=(--model bench/imagenet/models.py:resnet18 --weights "$DATA/resnet18.safetensors" --data-dir "$DATA" --method qdrop
     --wbits 4 --abits 4 --calib-size 256 --iters "$R18_ITERS" --seed 0)
quantize resnet20 240 --model resnet20 --method qdrop --wbits 2 --abits 4 --calib-size 1024 --iters "$R20_ITERS" --seed 0
step data 60 "$PY" bench/imagenet/make_data.py "$DATA" --train 256 --test 32 --model resnet18
quantize resnet18 120 "${R18[@]}"
step cuda_tests 200 env METAAUG_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py --junitxml="$OUT/cuda_tests.xml"
step reference 90 "$PY" bench/speed/reference.py --device "$DEVICE" --iters "$REF_ITERS" --seed 0 --out "$OUT/reference.json"
quantize metaaug_ref 90 --model resnet20 --method qdrop --wbits 2 --abits 4 --calib-size 1024 --iters "$REF_ITERS" --seed 0 \
    --set lr_weight_scale=0
quantize resnet18_bf16 90 "${R18[@]}" --set compute_dtype=bfloat16
quantize resnet18_fast 150 "${R18[@]}" --fast
printf 'total\t%s\n' "$(( $(date +%s) - began ))" >> "$OUT/env.txt"
"$PY" bench/gpu_results.py "$OUT"
