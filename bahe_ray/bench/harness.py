"""What every benchmark shares: timing, memory release, the matmul peak, FLOP counts, the batch search,
writing a result.

Every timing is the median over timed calls after warm-up calls (CUDA events on GPU). FLOPs follow
the PaLM convention: 2 x layer parameters x tokens + 4 x T^2 x attention width per layer and
sequence (no causal discount); training = 3 x forward.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from bahe_ray.models.backbone import Backbone
from bahe_ray.runtime import default_dtype

Result = dict[str, Any]

# ---- FLOPs -----------------------------------------------------------------------------------


def attention_width(config: PretrainedConfig) -> int:
    """Query heads x head dim: the width of QK^T and AV."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def forward_flops(layer_params: int, n_layers: int, width: int, tokens: int, sequences: int) -> float:
    """Forward FLOPs of `sequences` sequences of `tokens` through `n_layers` layers holding `layer_params`."""
    return sequences * (2.0 * layer_params * tokens + n_layers * 4.0 * tokens**2 * width)


def layer_parameters(backbone: Backbone) -> int:
    """Parameters of the layers the backbone holds (embeddings and final norm excluded)."""
    return sum(p.numel() for p in backbone.layers.parameters())


# ---- timing and memory -----------------------------------------------------------------------


def time_calls(fn: Callable[[int], None], device: str, warmup: int, steps: int) -> list[float]:
    """Milliseconds of each of `steps` calls fn(i) after `warmup` calls (CUDA events on GPU)."""
    for i in range(warmup):
        fn(i)
    if not device.startswith("cuda"):
        times = []
        for i in range(steps):
            start = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - start) * 1e3)
        return times
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(i)
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def matmul_peak_tflops(device: str, steps: int = 20) -> float:
    """Median TFLOP/s of a square matmul on random data: 8192^3 bf16 on GPU, 2048^3 fp32 on CPU."""
    dtype = default_dtype(device)
    size = 2048 if device == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = time_calls(lambda i: torch.mm(a, b), device, warmup=3, steps=steps)
    return 2.0 * size**3 / (statistics.median(times) / 1e3) / 1e12


# ---- the best batch within a memory budget ---------------------------------------------------


def search_batch(measure: Callable[[int], Result], start: int, max_batch: int, resolution: int = 8) -> list[Result]:
    """Every trial of `measure(batch)`, in order: doubling from `start` while the batch fits (and stays
    <= max_batch), then bisecting between the largest fit and the first misfit down to 1/resolution
    of the fit. A trial fits when its "fits" is true (false on OOM or over the memory budget)."""
    trials: list[Result] = []
    fit, misfit = 0, 0
    batch = start
    while batch <= max_batch:
        trials.append(measure(batch))
        if not trials[-1]["fits"]:
            misfit = batch
            break
        fit, batch = batch, batch * 2
    step = max(1, fit // resolution)
    while fit and misfit - fit > step:
        mid = fit + max(step, (misfit - fit) // 2 // step * step)
        trials.append(measure(mid))
        fit, misfit = (mid, misfit) if trials[-1]["fits"] else (fit, mid)
    return trials


def best_trial(trials: list[Result]) -> Result | None:
    """The fitting trial with the most samples/s."""
    fitting = [t for t in trials if t["fits"]]
    return max(fitting, key=lambda t: t["samples_per_s"]) if fitting else None


# ---- results ---------------------------------------------------------------------------------


def write_result(result: Result, out_dir: str | Path, name: str, plot: Callable[[Result, Path], None] | None = None) -> Path:
    """Write NAME.json (and NAME.png) under out_dir; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    if plot is not None:
        plot(result, out / f"{name}.png")
    return path
