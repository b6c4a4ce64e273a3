#!/bin/bash
# `bahe bench loop` (Qwen2.5-0.5B shape, k=6, N=100, batch 256, synthetic log) on one GPU while py-spy samples
# the Ray Train worker (collapsed stacks of the GIL holder), and, if TEXTS is set, `bench encode --texts` first.
# Needs: a CUDA GPU, this project installed with Ray, and py-spy. Run from the repository root:
#   USERS=1500 EVENTS=600000 LOOP_SETS="--set train.cpus_per_worker=3" bash scripts/loop_profile.sh
# Writes under $OUT (default outputs/loop) and packs it into $OUT/loop$TAG.tgz.
# LOOP_SETS: extra --set options for bench loop. On the lent H200 (no Ray installed) a slim Ray bundle was
# carried as .raybundle/; its install.sh is sourced when present.
set -u
[ -f .raybundle/install.sh ] && { source .raybundle/install.sh || exit 1; }
OUT=${OUT:-outputs/loop}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=$OUT/loop${TAG:-}; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
if [ -n "${TEXTS:-}" ]; then
  timeout 200 python3 -m bahe_ray.cli bench --set encoder.batch_size=${ENCODE_BATCH:-65536} encode \
    --model qwen2.5-0.5b --k 6 --batch-atoms 4096 --steps 5 --texts $TEXTS --max-batch-tokens 131072 \
    --out $R --name encode-cuda-texts${TAG:-} > $R/encode.log 2>&1
  echo "encode rc $?"; grep -a -E '"atoms_per_s"|"batch_size"|"tokenize_atoms_per_s"' $R/encode.log | head -20
fi
(  # profile the Ray Train worker's later epochs (stopped with the loop)
  for _ in $(seq 900); do pid=$(pgrep -f "ray::RayTrainWorker" | head -1); [ -n "$pid" ] && break; sleep 1; done
  sleep ${PROFILE_AFTER:-45}
  py-spy record -p $pid -d ${PROFILE_S:-20} -r 200 -f raw -t --gil -o $R/worker.raw --nonblocking > $R/pyspy.log 2>&1
  py-spy dump -p $pid > $R/worker-dump.txt 2>&1
) &
read -ra S <<< "${LOOP_SETS:-}"
timeout ${LOOP_LIMIT:-420} python3 -m bahe_ray.cli bench --set data.synthetic.n_events=${EVENTS:-800000} \
  --set data.synthetic.n_users=${USERS:-2000} --set "data.synthetic.fields=[purchase]" \
  --set train.eval_batch_size=512 "${S[@]}" loop --model qwen2.5-0.5b --k 6 --n 100 --batch 256 \
  --epochs ${EPOCHS:-3} --out $R --name loop-qwen2.5-0.5b-cuda${TAG:-} > $R/loop.log 2>&1
echo "loop rc $?"; grep -a -E "epoch [0-9]:" $R/loop.log | sed 's/.*\(epoch [0-9]\)/\1/'
grep -a -A3 '"of_model_level"\|"model_level"' $R/loop.log | head -20
kill %1 2>/dev/null; wait
tar czf $R.tgz -C $OUT $(basename $R) && rm -rf $R
