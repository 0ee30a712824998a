#!/usr/bin/env bash
# metaaug's QDrop (CLI, the paper's recipe: --set lr_weight_scale=0) against the plain-PyTorch reference
# (bench/speed/reference.py), side by side: per seed both run at once, one thread each, on the same 1024 stratified
# calibration images (metaaug.data.calibration_split with the seed). Writes bench/speed/results.json and results.md.
#
#   bash bench/speed/run.sh                                   # W2A4, 1024 images, 2000 iterations, seed 0
#   ITERS=20 CALIB=64 SEEDS=0 bash bench/speed/run.sh         # smoke test
#
#   SET=compile_fake_quant=true OUT=bench/speed/compiled bash bench/speed/run.sh   # metaaug with a speed option
#   ALONE=1 SET=... OUT=... bash bench/speed/run.sh     # one after the other, each alone on the machine
#
# Side by side, the two processes share the machine only while both run: the one that ends first leaves the other
# alone for the rest of its run, which flatters whichever is slower. ALONE=1 runs them one after the other instead.
#
# Overrides: ITERS, CALIB, SEEDS (comma or space separated), WBITS, ABITS, MODEL, WEIGHTS, SET (extra `--set` options
# for metaaug, comma separated), OUT (results folder), ALONE (1: one after the other). Per-run folders, logs and the reference's JSON go to $OUT/runs/
# (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/../.."

ITERS=${ITERS:-2000}
CALIB=${CALIB:-1024}
SEEDS=${SEEDS:-0}
WBITS=${WBITS:-2}
ABITS=${ABITS:-4}
MODEL=${MODEL:-bench/renamed_models.py:resnet20_renamed}  # the bundled ResNet-20 with its block class renamed
WEIGHTS=${WEIGHTS:-src/metaaug/models/weights/resnet20_fmnist.safetensors}
PY=.venv/bin/python
SET=${SET:-}
ALONE=${ALONE:-0}
how="side by side" alone_cmd="" alone_flag=()
if [ "$ALONE" = 1 ]; then how="one after the other" alone_cmd=" ALONE=1" alone_flag=(--alone); fi
OUT=${OUT:-bench/speed}
RUNS=$OUT/runs
COMMAND="ITERS=$ITERS CALIB=$CALIB SEEDS=$SEEDS WBITS=$WBITS ABITS=$ABITS MODEL=$MODEL WEIGHTS=$WEIGHTS${SET:+ SET=$SET}$alone_cmd OUT=$OUT bash bench/speed/run.sh"
extra=()
for kv in ${SET//,/ }; do extra+=(--set "$kv"); done
mkdir -p "$RUNS"

# run NAME CMD...: run CMD with one thread, its output in $RUNS/NAME.log and its wall time (ms) in $RUNS/NAME.wall_ms
run() {
    local name=$1 start
    shift
    start=$(date +%s%N)
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$@" >"$RUNS/$name.log" 2>&1
    echo $(( ($(date +%s%N) - start) / 1000000 )) >"$RUNS/$name.wall_ms"
}

for seed in ${SEEDS//,/ }; do
    echo "seed $seed: metaaug qdrop and the reference, $how ($ITERS iterations, $CALIB images)"
    run "metaaug-s$seed" "$PY" -m metaaug quantize --model "$MODEL" --weights "$WEIGHTS" --method qdrop \
        --wbits "$WBITS" --abits "$ABITS" --calib-size "$CALIB" --iters "$ITERS" --seed "$seed" --device cpu \
        --set lr_weight_scale=0 "${extra[@]}" --out "$RUNS/metaaug-s$seed" --restart &
    m=$!
    status=0
    if [ "$ALONE" = 1 ]; then
        wait "$m" || { echo "metaaug run failed (exit $?), see $RUNS/metaaug-s$seed.log"; exit 1; }
    fi
    run "reference-s$seed" "$PY" bench/speed/reference.py --model "$MODEL" --weights "$WEIGHTS" \
        --wbits "$WBITS" --abits "$ABITS" --calib "$CALIB" --iters "$ITERS" --seed "$seed" --out "$RUNS/reference-s$seed.json" &
    r=$!
    if [ "$ALONE" != 1 ]; then
        wait "$m" || { status=$?; echo "metaaug run failed (exit $status), see $RUNS/metaaug-s$seed.log"; }
    fi
    wait "$r" || { status=$?; echo "reference run failed (exit $status), see $RUNS/reference-s$seed.log"; }
    [ "$status" -eq 0 ] || exit "$status"
done

"$PY" bench/speed/summarise.py --runs "$RUNS" --out "$OUT" --seeds "$SEEDS" --command "$COMMAND" "${alone_flag[@]}"
