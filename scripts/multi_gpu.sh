#!/bin/bash
# Issue 23 on one host with several GPUs: `bahe bench loop` under Ray Train DDP over NCCL with 1, 2, 4 and 8 GPU
# workers (those up to `nvidia-smi -L | wc -l`), one GPU per worker. Each JSON row: total and per-worker
# samples/s, samples/day and the scaling efficiency rate(N) / (N x rate(1)).
# Qwen2.5-0.5B shape (random weights), k = 6, N = 100, one field, a synthetic log (1,500 users, 600,000 events,
# 80 impressions a user: about 96,000 training samples). `--batch` is per worker (train.batch_size), so the
# global batch grows with N (768 x N; at 8 GPUs an epoch is about 15 steps). Step options: the GPU profile's
# fastest with DDP (bf16 autocast over fp32 weights, fused AdamW, compiled layers, the store's vectors on each
# GPU); the whole step as one CUDA graph is one worker only, so the scaling runs go without it and part g
# measures 1 GPU with it, the best 1-GPU step as the reference. NVLink multicast stays off (NCCL_NVLS_ENABLE=0
# and its PyTorch/NVSHMEM siblings, as the device docs require); the local Ray instance that bench loop starts
# hands this environment to its workers.
#
# Device kind: nvidia-h200-x8 (or -x4, -x2; an H100 kind of several GPUs runs it too). Carry: nothing beyond the
# working tree and the slim Ray bundle `.raybundle/` (../shared/tools/device-ray-bundle), sourced below.
# Parts, one device call each (each fits the 10-minute limit of a call; PART_LIMIT, 570 s, caps it; the JSON is
# rewritten after every worker count, so a cut part keeps the rows it finished):
#   a  1 GPU and the most GPUs (the target's efficiency), ~8 min: data, encode and samples ~1.5 min, model level
#      ~1 min, then per worker count ~20 s start, ~45 s compiling, 2 epochs, a ~6 GB checkpoint each, the test split
#   b  the counts in between (2, 4), ~7 min; the table at the end takes their efficiency against part a's 1 GPU
#   g  1 GPU with the whole step as one CUDA graph, ~6 min
#   OUT=outputs/multi-gpu PARTS=a bash scripts/multi_gpu.sh   (then PARTS=b, then PARTS=g; same OUT)
# Results: $OUT/loop-multi-a.json, -b.json, loop-graph-1.json (+ a .log each), $OUT/gpu.txt, a table at the end.
# A dry run of the plumbing on CPU (2 gloo workers, tiny shapes, no compile, no graph; ~3 min on 2 cores):
#   OUT=/tmp/mg RAYBUNDLE= DEVICE=cpu GPUS=2 LOOP_MODEL=/tmp/tiny-qwen2 K=1 N=8 BATCH=16 USERS=20 EVENTS=3000 \
#   IMPRESSIONS=8 ATOMS=300 COMPILE= CPUS_PER_WORKER=1 WARMUP=0 STEPS=1 PARTS=a bash scripts/multi_gpu.sh
# (LOOP_MODEL: a Qwen2 preset or a folder with a Qwen2 config.json; bench loop builds random weights of it.)
source "$(dirname "$0")/device_env.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}; LIMIT=${PART_LIMIT:-570}; PARTS=${PARTS:-a}
if [ "$DEVICE" = cuda ]; then
  GPUS=$(nvidia-smi -L | wc -l)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
  nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1
else
  GPUS=${GPUS:-2}
fi
COUNTS=(); for n in 1 2 4 8; do [ "$n" -le "$GPUS" ] && COUNTS+=($n); done
MOST=${COUNTS[${#COUNTS[@]}-1]}
WORKERS_A="1"; [ "$MOST" -gt 1 ] && WORKERS_A="1 $MOST"
WORKERS_B=""; for n in "${COUNTS[@]}"; do [ "$n" -gt 1 ] && [ "$n" -lt "$MOST" ] && WORKERS_B="$WORKERS_B $n"; done
echo "devices: $GPUS ($DEVICE); part a: $WORKERS_A; part b:${WORKERS_B:- none}; NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
COMPILE=${COMPILE-1}  # COMPILE= (empty): no torch.compile (the CPU dry run)
LOOP_SETS=(--set data.synthetic.n_events=${EVENTS:-600000} --set data.synthetic.n_users=${USERS:-1500}
  --set data.synthetic.impressions_per_user=${IMPRESSIONS:-80} --set "data.synthetic.fields=[purchase]"
  --set train.eval_batch_size=512 --set train.cpus_per_worker=${CPUS_PER_WORKER:-3} --set train.optimizer=fused
  --set train.device_table_gb=${TABLE_GB:-40})
[ -n "${ATOMS:-}" ] && LOOP_SETS+=(--set data.synthetic.n_atoms=$ATOMS)
[ -n "$COMPILE" ] && LOOP_SETS+=(--set train.compile=true)
LOOP=(loop --model ${LOOP_MODEL:-qwen2.5-0.5b} --k ${K:-6} --n ${N:-100} --batch ${BATCH:-768} --epochs ${EPOCHS:-2}
  --warmup ${WARMUP:-3} --steps ${STEPS:-10} --device $DEVICE --out $OUT --no-local)

# (a), (b) the scaling runs, no CUDA graph (DDP cannot be captured)
for part in a b; do
  [[ $PARTS == *$part* ]] || continue
  [ $part = a ] && workers=$WORKERS_A || workers=$WORKERS_B
  [ -z "$workers" ] && { echo "($part) no worker counts for $GPUS devices"; continue; }
  timeout $LIMIT $PY -m bahe_ray.bench "${LOOP_SETS[@]}" "${LOOP[@]}" --workers $workers --name loop-multi-$part \
    > "$OUT/loop-multi-$part.log" 2>&1
  echo "($part) workers $workers: rc $?"
done
# (g) the reference: one GPU with the whole step as one CUDA graph (GPU only)
if [[ $PARTS == *g* && $DEVICE == cuda ]]; then
  timeout $LIMIT $PY -m bahe_ray.bench "${LOOP_SETS[@]}" --set train.use_gpu=true --set train.cuda_graph=true \
    "${LOOP[@]}" --workers 1 --name loop-graph-1 > "$OUT/loop-graph-1.log" 2>&1
  echo "(g) rc $?"
fi

$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
names = ("loop-multi-a", "loop-multi-b", "loop-graph-1")
runs = {name: json.loads((out / f"{name}.json").read_text()) for name in names if (out / f"{name}.json").is_file()}
single = next((row["samples_per_s"] for row in runs.get("loop-multi-a", {}).get("ray", []) if row["workers"] == 1), None)
for name, r in runs.items():
    print(f"\n{name}: {r['model']} k={r['k']} N={r['n']} batch {r['batch']} per worker, {r['samples']['train']} "
          f"training samples, step {r['step']}; model level {r['model_level']['samples_per_s']} samples/s (1 device)")
    print("  workers  global batch  samples/s  per worker  of model level  efficiency  samples/day  data wait")
    for row in r.get("ray", []):
        last = row["epochs"][-1]
        eff = row["scaling_efficiency"]
        if eff is None and single and name == "loop-multi-b":  # part b against part a's 1-GPU rate
            eff = row["samples_per_s"] / (row["workers"] * single)
        print(f"  {row['workers']:7d}  {row['global_batch']:12d}  {row['samples_per_s']:9.1f}  "
              f"{row['samples_per_s_per_worker']:10.1f}  {row['of_model_level']:14.1%}  "
              f"{'-' if eff is None else f'{eff:.1%}':>10s}  {row['samples_per_day'] / 1e6:10.1f}M  "
              f"{last['data_wait_seconds'] / last['train_seconds']:9.1%}")
for name in names:
    if name not in runs:
        print(f"\n{name}: no result (see {name}.log if that part ran)")
EOF
