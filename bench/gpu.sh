#!/usr/bin/env bash
# The GPU check of issue #32, for a CUDA machine (never needed by the tests): the CUDA tests, QDrop ms/iteration
# per unit of a ResNet-18 at 224x224, and the bundled ResNet-20 W2A4 QDrop run; writes bench/gpu/results.md.
#   bash scripts/setup.sh && bash bench/gpu.sh        (on the GPU machine; commit bench/gpu/ with the GPU named)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=bench/gpu
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device here')"
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
start=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -3 > "$OUT/cuda_tests.txt"
DATA=/tmp/in224-gpu
"$PY" bench/imagenet/make_data.py "$DATA" --train 256 --test 32 --model resnet18
rm -rf /tmp/gpu-r18 /tmp/gpu-r20
"$PY" -m metaaug quantize --model bench/imagenet/models.py:resnet18 --weights "$DATA/resnet18.safetensors" --data-dir "$DATA" \
  --method qdrop --wbits 4 --abits 4 --calib-size 256 --iters 200 --device cuda --out /tmp/gpu-r18 > "$OUT/resnet18.log" 2>&1
"$PY" -m metaaug quantize --model resnet20 --method qdrop --wbits 2 --abits 4 --calib-size 1024 --iters 2000 --seed 0 \
  --device cuda --out /tmp/gpu-r20 > "$OUT/resnet20.log" 2>&1
cp /tmp/gpu-r18/report.json "$OUT/resnet18_report.json"
cp /tmp/gpu-r20/report.json "$OUT/resnet20_report.json"
"$PY" - "$gpu" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
gpu, secs = sys.argv[1], sys.argv[2]
r18 = json.load(open("bench/gpu/resnet18_report.json"))
r20 = json.load(open("bench/gpu/resnet20_report.json"))
lines = [f"# GPU check ({gpu})", "", "Command: `bash bench/gpu.sh` (total %s s)." % secs, "",
         "CUDA tests: " + open("bench/gpu/cuda_tests.txt").read().strip().splitlines()[-1], "",
         "## ResNet-18 224x224, QDrop W4A4, 256 images, 200 iterations (random weights: time only)", "",
         "| unit | ms/iter |", "|---|---|"]
lines += [f"| {u['name']} | {u['ms_per_iter']} |" for u in r18["units"]]
lines += ["", "## Bundled ResNet-20, QDrop W2A4, 1024 images, 2000 iterations, seed 0", "",
          "| FP top-1 | W2A4 top-1 | recon s | total s |", "|---|---|---|---|",
          f"| {r20['fp_top1']} | {r20['quant_top1']} | {r20['recon_seconds']} | {r20['seconds']} |"]
open("bench/gpu/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
