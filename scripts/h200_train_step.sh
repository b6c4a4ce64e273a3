#!/bin/bash
# The product's training step (train.TrainStep, issue 17) on one GPU: (a) BAHE against the token level with
# the fast options, (b) an ablation of BAHE's step option by option, (c) `bench loop` with the fast options
# (model level, train_local, train_ray). Each part is capped (PART_LIMIT seconds, ~8 min); a part cut short
# keeps what it wrote. Results: $OUT/*.json, logs $OUT/*.log, then a short table.
#
# On the H200, from the repository root (Ray from the carried bundle, no network):
#   OUT=outputs/h200-step bash scripts/h200_train_step.sh
# A quick run of the plumbing on CPU (tiny shapes; no CUDA graph there):
#   OUT=/tmp/step RAYBUNDLE= DEVICE=cpu MODEL=minilm-shape K=2 N=4 BEST_N=3 MAX_BATCH=4 BATCH=4 WARMUP=0 STEPS=1 \
#   GRAPH= COMPILE= LOOP_MODEL=/tmp/tiny-qwen2 LOOP_K=1 USERS=20 EVENTS=3000 ATOMS=300 CPUS_PER_WORKER=1 \
#   bash scripts/h200_train_step.sh
# (LOOP_MODEL: a Qwen2 preset or a folder with a Qwen2 config.json; bench loop builds random weights of it.)
# PARTS=bc runs only parts b and c (the table reads whatever $OUT holds); ABL_ONLY=NAME only the ablation rows matching NAME.
source "$(dirname "$0")/device_env.sh"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}; MODEL=${MODEL:-qwen2.5-0.5b}; K=${K:-6}; LIMIT=${PART_LIMIT:-480}
N=${N:-200}; BEST_N=${BEST_N:-100}; MAX_BATCH=${MAX_BATCH:-2048}; BATCH=${BATCH:-256}
WARMUP=${WARMUP:-3}; STEPS=${STEPS:-10}; ATOMS=${ATOMS:-100000}
GRAPH=${GRAPH---cuda-graph}  # GRAPH= (empty) on CPU
COMPILE=${COMPILE---compile}  # COMPILE= (empty): no torch.compile (a quick CPU run)
BENCH="$PY -m bahe_ray.bench"
COMMON="--device $DEVICE --out $OUT --atoms $ATOMS"
PARTS=${PARTS:-abc}
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"

# (a) both sides, both modes, every fast option: pure bf16 weights (as the headline), fused AdamW, compiled
# layers, the whole step as one CUDA graph, the store's table on the device.
FAST="--weights-dtype bfloat16 --precision float32 --optimizer fused $COMPILE $GRAPH --lookup device"
if [[ $PARTS == *a* ]]; then
  timeout $LIMIT $BENCH train --model $MODEL --k $K --n $N --best-n $BEST_N --warmup $WARMUP --steps $STEPS \
    --max-batch $MAX_BATCH $FAST $COMMON --name a-fast > "$OUT/a-fast.log" 2>&1
  echo "(a) rc $?"
fi

# (b) BAHE alone, N = BEST_N, one batch, a fresh process per configuration, one option added each time.
ABL=(
  "1-eager-autocast|--precision auto --weights-dtype float32 --optimizer foreach --lookup host"
  "2-fused|--precision auto --weights-dtype float32 --optimizer fused --lookup host"
  "3-compile|--precision auto --weights-dtype float32 --optimizer fused --lookup host $COMPILE"
  "4-graph|--precision auto --weights-dtype float32 --optimizer fused --lookup host $COMPILE $GRAPH"
  "5-device-table|--precision auto --weights-dtype float32 --optimizer fused --lookup device $COMPILE $GRAPH"
  "6-bf16-weights|--precision float32 --weights-dtype bfloat16 --optimizer fused --lookup device $COMPILE $GRAPH"
)
START=$SECONDS
[[ $PARTS == *b* ]] || ABL=()
ONLY=${ABL_ONLY:-}  # e.g. ABL_ONLY=5-device-table: only the rows whose name matches
for row in "${ABL[@]}"; do
  name=${row%%|*}; flags=${row#*|}
  [[ -n $ONLY && $name != *$ONLY* ]] && continue
  left=$((LIMIT - (SECONDS - START))); [ $left -le 10 ] && { echo "(b) $name: no time left"; continue; }
  timeout $left $BENCH train --model $MODEL --k $K --sides bahe --n $BEST_N --batch $BATCH --best-n \
    --warmup $WARMUP --steps $STEPS $flags $COMMON --name b-$name > "$OUT/b-$name.log" 2>&1
  echo "(b) $name rc $?"
done

# (c) the loop end to end with the fast options of the GPU profile (fp32 weights), against its own step.
LOOP_SETS=(--set data.synthetic.n_events=${EVENTS:-600000} --set data.synthetic.n_users=${USERS:-1500}
  --set "data.synthetic.fields=[purchase]" --set train.eval_batch_size=512 --set train.cpus_per_worker=${CPUS_PER_WORKER:-3}
  --set train.optimizer=fused --set train.device_table_gb=${TABLE_GB:-40})
[ -n "$COMPILE" ] && LOOP_SETS+=(--set train.compile=true)
[ -n "$GRAPH" ] && LOOP_SETS+=(--set train.use_gpu=true --set train.cuda_graph=true)
if [[ $PARTS == *c* ]]; then
  timeout $LIMIT $BENCH "${LOOP_SETS[@]}" loop --model ${LOOP_MODEL:-$MODEL} --k ${LOOP_K:-$K} --n $BEST_N \
    --batch $BATCH --epochs ${EPOCHS:-2} --warmup $WARMUP --steps $STEPS --device $DEVICE --out $OUT --name c-loop \
    > "$OUT/c-loop.log" 2>&1
  echo "(c) rc $?"
fi

$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None

a = load("a-fast")
print("\n(a) fast options:", a and f"{a['optimizer']}, weights {a['dtype']}, lookup {a['lookup']}, "
      f"compile {a['compile']}, cuda_graph {a['cuda_graph']}")
for r in (a or {}).get("equal_batch", {}).get("rows", []):
    print(f"  batch {a['equal_batch']['batch']}, N {r['n']}: BAHE {r['bahe_ms']} ms / token {r['token_ms']} ms "
          f"= {r['speedup']}x time; {r['bahe_gb']} / {r['token_gb']} GB = {r['memory_ratio']}x memory")
for r in (a or {}).get("best_batch", []):
    print(f"  best batch, N {r['n']}: BAHE {r['bahe_samples_per_s']} samples/s (batch {r['bahe_batch']}), "
          f"token {r['token_samples_per_s']} (batch {r['token_batch']}): {r['speedup']}x")
print("\n(b) BAHE, one batch:  configuration  step ms  samples/s  peak GB  host batch ms")
for path in sorted(out.glob("b-*.json")):
    b = json.loads(path.read_text())
    for r in b["sides"]["bahe"]["equal"]:
        cells = ["OOM"] if r["oom"] else [r["step_ms"], r["samples_per_s"], r["peak_gb"], r["batch_ms"]]
        print(f"  {path.stem[2:]:18s} batch {r['batch']} N {r['n']}: " + "  ".join(map(str, cells)))
c = load("c-loop")
if c:
    print(f"\n(c) loop, {c['model']} k={c['k']} N={c['n']} batch {c['batch']}, step {c['step']}")
    print(f"  model level {c['model_level']['samples_per_s']} samples/s")
    runs = [("local", c["local"])] if "local" in c else []
    for mode, run in runs + [(f"ray, {r['workers']} worker(s)", r) for r in c.get("ray", [])]:
        last = run["epochs"][-1]
        print(f"  train_{mode}: {run['samples_per_s']:.1f} samples/s (last epoch), "
              f"{run['of_model_level']:.1%} of the model level, data wait "
              f"{last['data_wait_seconds'] / last['train_seconds']:.1%} of the epoch")
else:
    print("\n(c) no result (see c-loop.log)")
EOF
