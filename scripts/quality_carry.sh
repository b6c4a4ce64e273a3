#!/bin/bash
# What scripts/gpu_quality.sh needs on a GPU machine without network or Ray, made here in .carry/ (git-ignored,
# < 60 MiB): MiniLM's weights as fp16 safetensors with its tokenizer, the full MovieLens-100K as input tables,
# the sample table of configs/ml100k_rella.yaml (`bahe samples` needs Ray, so it is built here), and the
# pydantic wheels the GPU image lacks. From the repository root, with the venv (`make setup`):
#   bash scripts/quality_carry.sh
# (LOCK="flock /tmp/bahe-heavy.lock nice -n 5" runs the Ray step under a shared machine's lock.)
set -euo pipefail
CARRY=${CARRY:-.carry}
PY=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-configs/ml100k_rella.yaml}
grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
mkdir -p "$CARRY"

echo "== MiniLM as fp16 safetensors -> $CARRY/minilm"
"$PY" - "$CARRY/minilm" <<'PYEOF'
import shutil, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bahe_ray.config import MINILM
from bahe_ray.models.registry import resolve_model_path

source, target = resolve_model_path(MINILM), Path(sys.argv[1])
target.mkdir(parents=True, exist_ok=True)
weights = load_file(source / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, target / "model.safetensors")
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(source / name, target / name)
print(f"{len(weights)} tensors")
PYEOF

echo "== MovieLens-100K input tables -> $CARRY/ml100k/data"
"$PY" - "$CARRY/ml100k/data" <<'PYEOF'
import sys
from pathlib import Path

import pyarrow.parquet as pq

from bahe_ray.data import movielens

root = Path(sys.argv[1])
events, impressions = movielens.to_tables(movielens.load_ratings(None, Path("outputs/cache")))
for name, table in (("events", events), ("impressions", impressions)):
    (root / name).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / name / "part-0.parquet")
    print(name, table.num_rows)
PYEOF

echo "== samples (rella protocol) with Ray -> $(grep -A1 '^samples:' "$CONFIG" | tail -1)"
${LOCK:-} .venv/bin/bahe samples --config "$CONFIG" --set ray.num_cpus=2

echo "== pydantic wheels (cp312, manylinux) -> $CARRY/wheels"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d "$CARRY/wheels" pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
du -sh "$CARRY"
