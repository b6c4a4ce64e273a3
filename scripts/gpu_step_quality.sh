#!/bin/bash
# Issue 17's quality check on ONE GPU without Ray: BAHE trained with the GPU profile's fast step options (fp32
# weights under bf16 autocast, fused AdamW, compiled layers, the whole step as one CUDA graph, the store's vectors
# on the GPU) on the full MovieLens-100K, MiniLM k = 2, N = 50, seeds 0 1 2, to early stopping; compare the mean
# test AUC with docs/results_gpu.md's 0.7399 (the same runs with the old step).
#
# The carry, .device-carry/ (git-ignored, about 58 MiB), made here from the repository root with the venv:
#   bahe data --config configs/local.yaml --set data.movielens_users=null --set data.prepared_path=.device-carry/ml100k/data
#   bahe samples --config configs/ml100k_h200.yaml
#   MiniLM as fp16 safetensors with its tokenizer files in .device-carry/minilm-fp16 (scripts/quality_carry.sh shows how)
#   the pydantic wheels in .device-carry/whl (from .raybundle/wheels: pydantic, pydantic_core, annotated_types,
#   typing_inspection), and the code of the commit to measure: git archive HEAD bahe_ray configs | tar -x -C .device-carry/src
# Then, on the GPU machine (carry [".device-carry"]):
#   BUDGET=500 bash scripts/gpu_step_quality.sh      ($OUT: q17.log and bahe-seed{0,1,2}.json, the runs' metrics.json)
#   KIND=token BUDGET=560 bash scripts/gpu_step_quality.sh   (the token level with the same step options, against
#   results_gpu.md's 0.7397; it reads the atoms' texts from the store the encode step fills: $OUT/token-seed{0,1,2}.json)
set -u
: "${OUT:?set OUT to the folder for the results}"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device-carry/whl/*.whl >/dev/null 2>&1
export PYTHONPATH=.device-carry/src:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
C=.device-carry/src/configs/ml100k_h200.yaml
BAHE="python3 -m bahe_ray.cli"
KIND=${KIND:-bahe}
S=$SECONDS
timeout 120 $BAHE encode --no-ray --config $C > "$OUT/q17.log" 2>&1; echo "encode rc $? $((SECONDS - S)) s"
FAST="--set train.optimizer=fused --set train.compile=true --set train.cuda_graph=true --set train.device_table_gb=16"
for s in 0 1 2; do
  left=$((${BUDGET:-500} - (SECONDS - S))); [ $left -le 20 ] && break
  timeout $left $BAHE train --no-ray --config $C --set train.model_kind=$KIND --set train.max_epochs=10 \
    --set train.patience=1 --set train.seed=$s $FAST --set train.output_dir=outputs/q17/$KIND-$s >> "$OUT/q17.log" 2>&1
  echo "seed $s rc $? at $((SECONDS - S)) s"
  cp outputs/q17/$KIND-$s/*/metrics.json "$OUT/$KIND-seed$s.json" 2>/dev/null
done
nvidia-smi --query-gpu=name --format=csv,noheader
