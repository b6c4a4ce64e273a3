"""Where BAHE's peak memory sits in one training step (batch 8, N=200, Qwen2.5-0.5B shape, k=6), per phase.

On a GPU, from the repository root: `PYTHONPATH=. python3 scripts/memory_phases.py [--compile]` (figures: docs/benchmarks.md).
"""
import collections
import gc
import sys
import tempfile

import torch
import torch.nn.functional as F

from bahe_ray.bench import TrainSide, random_store
from bahe_ray.config import TrainConfig
from bahe_ray.runtime import setup_device

GB = 1e9
setup_device("cuda")
compile = "--compile" in sys.argv
with tempfile.TemporaryDirectory() as tmp:
    store = random_store(tmp + "/s", 896, 100_000)
    train = TrainConfig(use_gpu=True, weights_dtype="bfloat16", precision="float32", compile=compile, device_table_gb=80.0)
    ts = TrainSide("bahe", "qwen2.5-0.5b", 6, 1, 32, "cuda", train, store)
    batch, labels = ts.batch(8, 200, 0)
    table = ts.inputs.table
    params = {p.data_ptr() for p in ts.model.parameters()}
    print("bahe compile", compile, "param GB", sum(p.numel() * p.element_size() for p in ts.model.parameters()) / GB,
          "table GB", table.vectors.numel() * table.vectors.element_size() / GB)
    for step in range(4):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = F.binary_cross_entropy_with_logits(ts.model(table.expand(batch.tensors), padded=False), labels)  # as TrainStep
        torch.cuda.synchronize()
        fwd_peak, after_fwd = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        if step == 3:
            live = collections.Counter()
            for o in gc.get_objects():
                if torch.is_tensor(o) and o.is_cuda and o.data_ptr() not in params:
                    live[(tuple(o.shape), str(o.dtype))] += o.numel() * o.element_size()
            print("live tensors after forward (python-visible, not params):",
                  [(k, round(v / GB, 3)) for k, v in live.most_common(8)])
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        bwd_peak, after_bwd = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ts.optimizer.step()
        torch.cuda.synchronize()
        opt_peak = torch.cuda.max_memory_allocated()
        ts.optimizer.zero_grad(set_to_none=True)
        del loss
        print(f"step {step}: start {base/GB:.3f} | fwd peak {fwd_peak/GB:.3f} end {after_fwd/GB:.3f} | "
              f"bwd peak {bwd_peak/GB:.3f} end {after_bwd/GB:.3f} | opt peak {opt_peak/GB:.3f} | "
              f"after step {torch.cuda.memory_allocated()/GB:.3f}")
    print(torch.cuda.memory_summary(abbreviated=True)[:3000])
