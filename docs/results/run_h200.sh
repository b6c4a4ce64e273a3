#!/bin/bash
# BAHE vs ID vs token-level on the full MovieLens-100K split, one H200, no Ray (see configs/ml100k_h200.yaml).
# Everything it writes is packed into $OUT/results$TAG.tgz (logs, reports and training curves per model).
set -u
start=$(date +%s); budget=${BUDGET:-370}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
C=configs/ml100k_h200.yaml; R=$OUT/results${TAG:-}; mkdir -p $R
read -ra S <<< "${SETS:---set train.max_train_samples=20000 --set train.max_epochs=2}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
python3 -c "import torch,transformers,sys;print(sys.version.split()[0],torch.__version__,transformers.__version__)" > $R/versions.txt
timeout 90 python3 -m bahe_ray.cli encode --no-ray --config $C --summary-json $R/encode.json > $R/encode.log 2>&1
tail -3 $R/encode.log
for kind in ${KINDS:-bahe id token}; do
  left=$(( budget - ($(date +%s) - start) ))
  [ $kind = bahe ] && left=$(( left < ${BAHE_LIMIT:-120} ? left : ${BAHE_LIMIT:-120} ))
  [ $kind = id ] && left=$(( left < 60 ? left : 60 ))
  echo "== $kind (limit ${left}s)"
  timeout $left python3 -m bahe_ray.cli train --no-ray --config $C "${S[@]}" --set train.model_kind=$kind \
    --set train.output_dir=outputs/ml100k_h200/train/$kind --report-json $R/$kind.json > $R/$kind.log 2>&1
  echo "rc $?"; grep -E "epoch [0-9]|test" $R/$kind.log | tail -4
  find outputs/ml100k_h200/train/$kind -name "*.png" -exec cp {} $R/$kind-curves.png \;
done
echo "total $(( $(date +%s) - start ))s"
tar czf $R.tgz -C $OUT $(basename $R) && rm -rf $R
