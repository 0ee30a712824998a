#!/usr/bin/env bash
# Peak RSS (/usr/bin/time -v) and time of QDrop on ImageNet-sized CNNs at 224x224, per cache setting.
# Usage: bash bench/imagenet/memory.sh LABEL MODEL CALIB ITERS [extra metaaug quantize args...]
#   e.g. bash bench/imagenet/memory.sh r50-1024-budget6 resnet50 1024 1 --cache-budget 6GB
# Env: DATA (default /tmp/in224, made by make_data.py), RUNS (default /tmp/in224-runs), PYTHONPATH_OVERRIDE to run
# another checkout's src (the "before" column). Appends one JSON line per run to bench/imagenet/memory.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
label=$1 model=$2 calib=$3 iters=$4
shift 4
DATA=${DATA:-/tmp/in224}
RUNS=${RUNS:-/tmp/in224-runs}
.venv/bin/python bench/imagenet/make_data.py "$DATA" --model "$model"
mkdir -p "$RUNS"
out="$RUNS/$label"
rm -rf "$out"
cmd=(.venv/bin/python -m metaaug quantize --model "bench/imagenet/models.py:$model" --weights "$DATA/$model.safetensors"
     --data-dir "$DATA" --method qdrop --wbits 4 --abits 4 --calib-size "$calib" --iters "$iters" --device cpu --out "$out" "$@")
PYTHONPATH=${PYTHONPATH_OVERRIDE:-} /usr/bin/time -v "${cmd[@]}" > "$out.log" 2> "$out.time" || { tail -5 "$out.time"; exit 1; }
.venv/bin/python - "$label" "$out" "${cmd[*]}" "${PYTHONPATH_OVERRIDE:-}" <<'PY'
import json, re, sys
label, out, cmd, override = sys.argv[1:5]
t = open(out + ".time").read()
rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", t).group(1)
secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
rep = json.load(open(out + "/report.json"))
units = [{"unit": u["name"], "ms_per_iter": u["ms_per_iter"], "steady_ms_per_iter": u.get("extra", {}).get("steady_ms_per_iter")}
         for u in rep["units"]]
row = {"label": label, "code": override or "this checkout", "peak_rss_gb": round(rss_kb / 2**20, 2),
       "wall_s": round(secs, 1), "recon_s": rep.get("recon_seconds"), "cache": rep.get("cache"),
       "calib_size": rep["calib_size"], "iters": rep["iters"], "units": units, "command": cmd}
with open("bench/imagenet/memory.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
print(json.dumps({k: row[k] for k in ("label", "peak_rss_gb", "wall_s", "cache")}))
PY
