#!/usr/bin/env bash
# The bundled ViT benchmark (2 CPU cores: two runs at once, one thread each). Test top-1 is on every 5th test image
# (2,000), made by bench/subset_data.py; reconstruction uses 200 iterations per unit (the CLI default is 2000).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
DATA=${DATA:-/tmp/fmnist_every5}
[ -d "$DATA" ] || $PY bench/subset_data.py --every 5 --out "$DATA"
export OMP_NUM_THREADS=1
common=(--models vit --data-dir "$DATA" --jobs 2 --iters 200)
$PY bench/grid.py --out bench/vit/rtn "${common[@]}" --methods rtn --settings W8A8,W4A8,W4A4,W3A3 --calib-sizes 1024 --seeds 0,1,2
$PY bench/grid.py --out bench/vit/qdrop "${common[@]}" --methods qdrop --settings W4A4,W3A3 --calib-sizes 1024 --seeds 0,1,2
$PY bench/grid.py --out bench/vit/options "${common[@]}" --methods qdrop --variant log2=qdrop:softmax_grid=log2 \
  --variant ln_reparam=qdrop:ln_reparam=true --settings W4A4 --calib-sizes 1024 --seeds 0
$PY bench/grid.py --out bench/vit/scarce "${common[@]}" --methods qdrop,metaaug --settings W4A4 --calib-sizes 128 --seeds 0
# MetaAug: 50 meta steps per unit with the 200 reconstruction steps (its default 500 takes ~6 min per block here).
meta=(--variant metaaug=metaaug:meta_iters=50)
$PY bench/grid.py --out bench/vit/scarce "${common[@]}" --methods qdrop "${meta[@]}" --settings W4A4 --calib-sizes 32,128 --seeds 0,1,2
$PY bench/grid.py --out bench/vit/recon "${common[@]}" --methods adaround,brecq --settings W4A4,W3A3 --calib-sizes 1024 --seeds 0,1,2
$PY bench/grid.py --out bench/vit/options3 "${common[@]}" --methods "" --variant log2=qdrop:softmax_grid=log2 \
  --variant ln_reparam=qdrop:ln_reparam=true --settings W4A4 --calib-sizes 1024 --seeds 0,1,2
$PY bench/grid.py --out bench/vit/metaaug "${common[@]}" --methods "" "${meta[@]}" --settings W4A4,W3A3 --calib-sizes 1024 --seeds 0,1,2
$PY bench/grid.py --out bench/vit/eight "${common[@]}" --methods adaround,brecq,qdrop --settings W8A8,W4A8 --calib-sizes 1024 --seeds 0,1,2
$PY bench/grid.py --out bench/vit/eight_metaaug "${common[@]}" --methods "" "${meta[@]}" --settings W8A8,W4A8 --calib-sizes 1024 --seeds 0
