#!/usr/bin/env bash
# Peer-toolkit comparison: the bundled ViT quantized with Brevitas' own PTQ recipe (bench/vit/peer/peer.py).
# Brevitas lives in its own venv under /tmp (never in the project): torch pinned to the project's 2.13.0 (CPU wheel),
# no torchvision. The project venv draws the calibration sets and test split and saves them with the model weights;
# the Brevitas venv quantizes, evaluates and writes results.json / results.md here. One thread throughout.
#   PEER=/tmp/peer-brevitas  DATA=/tmp/fmnist_every5  CALIB=1024  SEEDS=0,1,2  SETTINGS=W8A8,W4A4  bash bench/vit/peer/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1
PEER=${PEER:-/tmp/peer-brevitas}
DATA=${DATA:-/tmp/fmnist_every5}
CALIB=${CALIB:-1024}
SEEDS=${SEEDS:-0,1,2}
SETTINGS=${SETTINGS:-W8A8,W4A4}
TEST_LIMIT=${TEST_LIMIT:-0}
OUT=${OUT:-bench/vit/peer}
BREVITAS=${BREVITAS:-brevitas==0.13.4}
VENV=$PEER/venv
mkdir -p "$PEER"

# the Brevitas venv (idempotent): torch first, exactly the pin (a local CPU wheel), then brevitas constrained to it
if ! "$VENV/bin/python" -c "import brevitas, torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
  python3 -m venv "$VENV"
  echo "torch==2.13.0" > "$PEER/constraints.txt"
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -c "$PEER/constraints.txt" "$BREVITAS"
fi

[ -d "$DATA" ] || .venv/bin/python bench/subset_data.py --every 5 --out "$DATA"
.venv/bin/python bench/vit/peer/peer.py prepare --out "$PEER/data.pt" --data-dir "$DATA" --calib-size "$CALIB" \
  --seeds "$SEEDS" --test-limit "$TEST_LIMIT"
"$VENV/bin/python" -W ignore::UserWarning bench/vit/peer/peer.py quantize --data "$PEER/data.pt" --settings "$SETTINGS" \
  --out-dir "$OUT" ${VARIANTS:+--variants "$VARIANTS"} ${ATTENTION:+--attention "$ATTENTION"}
"$VENV/bin/pip" freeze | grep -iE "^(torch|brevitas|numpy|unfoldnd|dependencies)==" > "$PEER/versions.txt" || true
cat "$PEER/versions.txt"
