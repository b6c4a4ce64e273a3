#!/bin/bash
# Issue 21's quality runs on ONE GPU without Ray (docs/quality.md): MovieLens-100K under ReLLa's protocol
# (configs/ml100k_rella.yaml), BAHE, BAHE hybrid, DIN, ID and token level, 3 seeds, early stopping on
# validation AUC, test AUC per slice with bootstrap intervals. Everything runs through `bahe` (--no-ray).
#
# Carry .carry (made by scripts/quality_carry.sh: MiniLM fp16, ML-100K tables, the rella sample table, the
# pydantic wheels; < 60 MiB). From the repository root:
#   OUT=outputs/gpu-quality bash scripts/gpu_quality.sh
# A CPU run of the plumbing on a subset (a few minutes):
#   OUT=/tmp/gq DEVICE=cpu SETS="--set samples.path=SMALL_TABLE ... --set train.max_train_samples=128 --set train.max_epochs=2" \
#   bash scripts/gpu_quality.sh
#
# Order: a: id, din, bahe, bahe_hybrid for seeds 0 1 2, three seeds of a kind at once (--parallel 3: these
# small models leave most of the GPU idle); b: + token, seed 0; c: + token seeds 1 and 2 (two at once). Every
# compare reuses the runs done before (--reuse), so a part cut short by its timeout loses only its unfinished
# runs, and each finished part leaves a table. $OUT gets at most 8 files: gpu.txt, run.log, compare_a.md,
# compare_b.md, compare_c.md (where those parts finished), compare.json (of the last part that finished),
# runs.json (every run's report, bundled), curves.png.
set -u
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
CARRY=${CARRY:-.carry}
CONFIG=${CONFIG:-configs/ml100k_rella.yaml}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-510}  # seconds for the whole script (the device call's limit is 600)
SETS=${SETS:-}
PY=${PYTHON:-python3}
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
LOG="$OUT/run.log"
: > "$LOG"

if ! "$PY" -c "import pydantic" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/gq-site "$CARRY"/wheels/*.whl >> "$LOG" 2>&1
  export PYTHONPATH=$PYTHONPATH:/tmp/gq-site
fi
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
[ "$DEVICE" = cuda ] || SETS="$SETS --set train.use_gpu=false --set train.device_table_gb=0"
"$PY" -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)" \
  >> "$OUT/gpu.txt"
BAHE="$PY -m bahe_ray.cli"
WORK=${WORK:-outputs/ml100k_rella/train}  # the compare folder (train.output_dir)
SETS="$SETS --set train.output_dir=$WORK"

echo "== encode ($(left) s left)" | tee -a "$LOG"
timeout 120 $BAHE encode --no-ray --config "$CONFIG" $SETS >> "$LOG" 2>&1 || echo "encode rc $?" | tee -a "$LOG"

part() {  # part NAME KINDS... : one bahe compare over seeds 0 1 2 (or SEEDS), reusing earlier runs
  local name=$1; shift
  local limit; limit=$(( $(left) - 30 ))  # 30 s kept for the bundle
  [ "$limit" -le 20 ] && { echo "== part $name: no time left" | tee -a "$LOG"; return; }
  echo "== part $name: $* (${limit} s left)" | tee -a "$LOG"
  timeout "$limit" $BAHE compare --no-ray --config "$CONFIG" $SETS --reuse --kinds "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== part $name rc $rc at $((SECONDS - START)) s" | tee -a "$LOG"
  [ $rc -eq 0 ] || return
  cp "$WORK/compare.json" "$OUT/compare.json"
  cp "$WORK/compare.md" "$OUT/compare_$name.md"
}
CHEAP="id din bahe bahe_hybrid"
part a $CHEAP --seeds 0 1 2 --parallel 3
part b $CHEAP token --seeds 0
part c $CHEAP token --seeds 0 1 2 --parallel 2

echo "== bundle ($(left) s left)" | tee -a "$LOG"
timeout 60 "$PY" scripts/quality_bundle.py "$WORK" "$OUT" >> "$LOG" 2>&1 || echo "bundle rc $?" | tee -a "$LOG"
grep "^== \|rc " "$LOG"
ls -la "$OUT"
