#!/bin/bash
# On one H200 without Ray (pydantic from .whl/, carry .whl). Packs what it writes into $OUT/$PART.tgz.
#   PART=encode: `bench encode --texts` with the compiled encoder (runs $RUNS), then one eager run.
#   PART=train:  equal batch 8, N=200, compiled (runs $RUNS, each a fresh process measuring only N=200, as
#                a training job runs one shape), then one eager run; ALL_N=1 first runs N=20..200 in one process.
#   PART=graph:  the same with the whole step as one CUDA graph (--cuda-graph, runs $RUNS), then eager runs
#                ($EAGER_RUNS); ALL_N=1 first runs N=20..200 with the graph (and the best-batch search at
#                N in $BEST_N). TESTS=1 first runs the GPU tests
#                (pytest and its wheels in .whl/).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=$OUT/$PART; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> $R/gpu.txt
encode() {  # NAME [--compile]
  timeout ${RUN_LIMIT:-150} python3 -m bahe_ray.bench --set encoder.batch_size=65536 encode --model qwen2.5-0.5b \
    --k 6 --batch-atoms 4096 --steps 5 --texts 200000 --max-batch-tokens 131072 "${@:2}" \
    --out $R --name $1 > $R/$1.log 2>&1
  echo "$1 rc $?"; grep -a -E '"atoms_per_s"|"batch_size"' $R/$1.log | tr -d ' \n'; echo
}
train() {  # NAME N... [--compile]
  timeout ${RUN_LIMIT:-150} python3 -m bahe_ray.bench train --model qwen2.5-0.5b --best-n --warmup 3 --steps 10 \
    --n "${@:2}" --out $R --name $1 > $R/$1.log 2>&1
  echo "$1 rc $?"; grep -a -A6 "equal batch" $R/$1.log
}
[ "${TESTS:-0}" = 1 ] && { timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_bench.py \
  tests/test_model.py tests/test_encoders.py > $R/gpu-tests.log 2>&1; echo "gpu tests rc $?"; tail -3 $R/gpu-tests.log; }
if [ "$PART" = encode ]; then
  for i in ${RUNS:-1 2 3}; do encode encode-cuda-texts-compiled-run$i --compile; done
  encode encode-cuda-texts-eager
elif [ "$PART" = graph ]; then
  [ "${ALL_N:-0}" = 1 ] && train train-qwen2.5-0.5b-cuda-graph-equal 20 50 100 200 --cuda-graph --best-n ${BEST_N:-}
  for i in ${RUNS:-1 2 3}; do train train-qwen2.5-0.5b-cuda-graph-n200-run$i 200 --cuda-graph; done
  for i in ${EAGER_RUNS:-1}; do train train-qwen2.5-0.5b-cuda-eager-n200-run$i 200; done
else
  [ "${ALL_N:-0}" = 1 ] && train train-qwen2.5-0.5b-cuda-compiled-equal 20 50 100 200 --compile
  for i in ${RUNS:-1 2}; do train train-qwen2.5-0.5b-cuda-compiled-n200-run$i 200 --compile; done
  train train-qwen2.5-0.5b-cuda-eager-n200 200
fi
tar czf $OUT/$PART.tgz -C $OUT $PART && rm -rf $R
