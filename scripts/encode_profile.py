"""Where `TransformersEncoder.encode` spends its time beyond the layers (compiled, calls of 65,536 texts).

On a GPU, from the repository root: `PYTHONPATH=. python3 scripts/encode_profile.py` (figures: docs/benchmarks.md).
"""
import collections
import tempfile
import time
from pathlib import Path

import torch

from bahe_ray.bench import random_checkpoint, random_texts
from bahe_ray.config import EncoderConfig
from bahe_ray.encoders.hf import TransformersEncoder
from bahe_ray.runtime import setup_device

setup_device("cuda")
with tempfile.TemporaryDirectory() as tmp:
    path = random_checkpoint("qwen2.5-0.5b", 6, Path(tmp) / "ckpt")
    enc = TransformersEncoder(EncoderConfig(model=str(path), k=6, max_tokens=32, compile=True), "cuda", 131072)
    texts = random_texts(200_000, 32)
    calls = [texts[i : i + 65536] for i in range(0, len(texts), 65536)]
    for c in calls[:1] + calls[-1:]:
        enc.encode(c)
    stats = collections.defaultdict(float)
    tok, chunk = enc._tokenize, enc._encode_chunk
    def timed(name, fn):
        def run(*a):
            t = time.perf_counter(); r = fn(*a); stats[name] += time.perf_counter() - t; return r
        return run
    enc._tokenize, enc._encode_chunk = timed("tokenize (helper thread)", tok), timed("_encode_chunk (main)", chunk)
    for rep in range(2):
        stats.clear()
        torch.cuda.synchronize(); t = time.perf_counter()
        for c in calls:
            enc.encode(c)
        torch.cuda.synchronize(); total = time.perf_counter() - t
        print(f"pass {rep}: {total:.3f} s, {len(texts)/total:.0f} atoms/s", {k: round(v, 3) for k, v in stats.items()})
    start = time.perf_counter(); ids = [enc.atoms.matrix(c[i:i+8192]) for c in calls for i in range(0, len(c), 8192)]
    print("tokenize + pad alone, main thread:", round(time.perf_counter() - start, 3))
    start = time.perf_counter()
    with torch.inference_mode():  # as in encode(); the stored log's 9.9 s came from a run without it
        for m in ids:
            enc._encode_chunk(m)
    torch.cuda.synchronize(); print("chunks alone (pre-tokenised):", round(time.perf_counter() - start, 3))
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        enc.encode(calls[0])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
