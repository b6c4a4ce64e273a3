#!/bin/bash
# The scorer on one GPU (issue 19): `bench serve --model` writes a random-weight BAHE checkpoint of the
# Qwen2.5-0.5B shape split at k = 6 and a store of random texts encoded by its first 6 layers, starts the
# scorer app on local Ray (Scorer and AtomEncoder on the GPU, bf16 autocast) and loads it from concurrent
# clients on the same machine: 100 candidates x 100 behaviours x 2 fields, warm (state caches on, every
# body sent once first) and cold (caches off). Capped by LIMIT seconds (380; with the tests under 8 min); a run cut short keeps its log.
# Results: $OUT/serve-h200.json and .png (p99 against requests/s), $OUT/serve-h200.log, $OUT/gpu.txt, and
# $OUT/gpu-tests.log (the GPU test of the state caches under bf16 autocast, first).
#
# On the GPU machine, from the repository root (Ray from the carried bundle, no network):
#   OUT=$OUT bash scripts/h200_serve.sh                                     carry [".raybundle"]
# A quick run of the plumbing on CPU (tiny Qwen2 shape; no GPU, so no use_gpu):
#   OUT=/tmp/serve-cpu RAYBUNDLE= PYTHON=.venv/bin/python DEVICE=cpu MODEL=/tmp/tiny-qwen2 K=1 BEHAVIORS=8 \
#   CANDIDATES=10 CLIENTS="1 2" REQUESTS=3 ATOMS=500 GPU_SETS= CPUS=3 bash scripts/h200_serve.sh
# (MODEL: a Qwen2 preset or a folder with a Qwen2 config.json.)
set -u
: "${OUT:?set OUT to the folder for the results}"
BUNDLE=${RAYBUNDLE-.raybundle/install.sh}  # RAYBUNDLE= (empty): Ray is installed already
if [ -n "$BUNDLE" ] && [ -f "$BUNDLE" ]; then source "$BUNDLE" || exit 1; fi
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}; DEVICE=${DEVICE:-cuda}; MODEL=${MODEL:-qwen2.5-0.5b}; K=${K:-6}; LIMIT=${LIMIT:-380}
BEHAVIORS=${BEHAVIORS:-100}; CANDIDATES=${CANDIDATES:-100}; CLIENTS=${CLIENTS:-"8 32"}; REQUESTS=${REQUESTS:-60}
ATOMS=${ATOMS:-20000}; CPUS=${CPUS:-16}
# The Scorer and the AtomEncoder share the GPU (the store was encoded there: same encoder fingerprint);
# 32 requests per model call, two batches in flight per replica, two Ingress replicas for the parsing.
GPU_SETS=${GPU_SETS-"--set serve.use_gpu=true --set serve.scorer_gpus=0.5 --set serve.encoder_gpus=0.25"}
SETS="--set ray.num_cpus=$CPUS --set serve.batch_max_size=32 --set serve.max_ongoing_requests=64 \
  --set serve.max_queued_requests=256 --set serve.ingress_replicas=2 --set serve.port=8011 $GPU_SETS"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"

[ "$DEVICE" = cuda ] && { timeout 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_serve_cache.py \
  > "$OUT/gpu-tests.log" 2>&1; echo "gpu tests rc $?"; }
timeout $LIMIT $PY -m bahe_ray.bench --config configs/local.yaml $SETS serve --model $MODEL --k $K --fields 2 \
  --atoms $ATOMS --candidates $CANDIDATES --behaviors $BEHAVIORS --clients $CLIENTS --requests $REQUESTS \
  --modes warm cold --time-limit 45 --device $DEVICE --out "$OUT" --name serve-h200 > "$OUT/serve-h200.log" 2>&1
echo "bench serve rc $?"
$PY - "$OUT/serve-h200.json" <<'PY'
import json, sys
try:
    runs = json.load(open(sys.argv[1]))["runs"]
except OSError:
    sys.exit("no result (see serve-h200.log)")
print(f"{'mode':6} {'clients':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'req/s':>8} {'scores/s':>9}  breakdown (median ms)")
for r in runs:
    parts = " ".join(f"{k.removesuffix('_ms')}={v:g}" for k, v in r["breakdown_ms"].items())
    print(f"{r['mode']:6} {r['clients']:>7} {r['p50_ms']:>7} {r['p90_ms']:>7} {r['p99_ms']:>7} "
          f"{r['requests_per_s']:>8} {r['scores_per_s']:>9}  {parts}")
PY
