"""Benchmarks: BAHE against the token-level baseline, the shallow encoder, the Ray encode pipeline.

  bench train     training-step time (forward + backward + AdamW step), samples/s and peak memory of
                  BaheCTR and TokenCTR over N behaviours of T tokens in F fields: both sides at one
                  batch size, and each side at its best batch within a memory budget. BAHE's step
                  includes the embedding lookup (atom ids -> stored vectors) from a real store.
  bench encode    the shallow encoder's atoms/s and achieved TFLOP/s against a bf16 matmul peak
                  measured in the same run; through `TransformersEncoder.encode` on texts; on real
                  atoms (MovieLens-100K, synthetic events) unique atoms/s and events/s.
  bench serve     p50 / p99 latency and requests/s of POST /v1/score from concurrent clients on
                  loopback (`bench_serve.run_serve_benchmark`), against the profile's scorer.
  bench pipeline  the Ray Data encode job (`run_encode`) against a plain loop over the same encoder.

Models are random-weight presets of real shapes (`preset_config`), "minilm-shape" (a random BERT of
all-MiniLM-L6-v2's shape) or real checkpoints (MINILM, a local folder); speed does not depend on
the weights. Inputs have no padding, so sdpa gets no mask and picks flash kernels on both sides
(the models are told so: no step waits for the GPU to check the masks); BAHE's length-1 item pass
needs no attention kernel (`split.sdpa_or_single`).
Every timing is the median over timed steps after warm-up steps (CUDA events on GPU). Peak memory:
`max_memory_allocated` / `max_memory_reserved` on GPU; on CPU the peak resident set during the
timed steps above the resident set before the model was built. FLOPs follow the PaLM convention:
2 x layer parameters x tokens + 4 x T^2 x attention width per layer and sequence (no causal
discount), training = 3 x forward. Model-level parts need only torch and transformers; Ray,
pyarrow and the data adapters are imported where used.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PretrainedConfig

from bahe_ray.config import MINILM, Config, EncoderConfig, ModelConfig
from bahe_ray.models.backbone import Backbone, pool_hidden, positions_from_mask
from bahe_ray.models.ctr import BaheCTR, TokenCTR
from bahe_ray.models.registry import PRESETS, load_backbone, model_config, model_label, weights_kind
from bahe_ray.runtime import GB, PeakRSS, default_dtype, environment, resolve_device, setup_device, to_device

Side = Literal["bahe", "token"]
Lookup = Literal["device", "host"]
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


# ---- the embedding store on the training path -------------------------------------------------


def random_store(path: str | Path, dim: int, n_atoms: int, seed: int = 0) -> Any:
    """A real EmbeddingStore at `path` holding `n_atoms` random vectors under random ids."""
    from bahe_ray.encoders.base import EncoderFingerprint
    from bahe_ray.store import EmbeddingStore

    fingerprint = EncoderFingerprint(
        model_name="bench-random", weights_sha256="0" * 64, k=0, pooling="mean", dtype="float32", max_tokens=0
    )
    store = EmbeddingStore.open(str(path), fingerprint, dim)
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(-(2**62), 2**62, size=n_atoms))
    for chunk in np.array_split(ids, max(1, len(ids) // 50_000)):
        store.add(chunk, rng.standard_normal((len(chunk), dim), dtype=np.float32))
    store.commit()
    return store


class DeviceTable:
    """A store's committed vectors resident on one device, gathered by atom id (sorted-id search)."""

    def __init__(self, store: Any, device: str, dtype: torch.dtype) -> None:
        ids = store.ids()
        self.ids = torch.from_numpy(ids).to(device)
        self.vectors = torch.from_numpy(store.lookup(ids)).to(device, dtype)

    def lookup(self, ids: Tensor) -> Tensor:
        """Vectors of `ids` (any shape, all present) -> ids.shape + (dim,)."""
        return self.vectors[torch.searchsorted(self.ids, ids)]


def host_lookup(store: Any, ids: Tensor, device: str) -> Tensor:
    """The host path: EmbeddingStore.lookup on the CPU, then one copy to the device."""
    return torch.from_numpy(store.lookup(ids.numpy())).to(device)


# ---- one side of the training benchmark ------------------------------------------------------


@functools.cache
def capture_stream(device: int) -> torch.cuda.Stream:
    """The side stream of every GraphedStep's warm-up and capture on a device. cuBLAS keeps a
    workspace per stream for the life of the process: a new stream per graph kept 68 MB each (H200)."""
    return torch.cuda.Stream(device)


class GraphedStep:
    """A training step of fixed shapes captured once as one CUDA graph, then replayed.

    A replay is a single launch, so the step's Python, autograd and per-kernel launch costs are
    gone: what small batches are bound by. The step must not read device values on the host, and
    its optimizer must be capturable. `warmup` eager steps run first on a side stream (lazy state
    such as the optimizer's moments must exist before capture); each call copies its inputs into
    the graph's buffers. What the step allocates stays in the graph's private pool while it lives.
    """

    def __init__(self, step: Callable[[dict[str, Tensor]], None], inputs: dict[str, Tensor], warmup: int = 3) -> None:
        self.inputs = {key: value.clone() for key, value in inputs.items()}
        side = capture_stream(torch.cuda.current_device())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.empty_cache()  # the warm-up's cached blocks: reserved memory is then the graph's own
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            step(self.inputs)

    def __call__(self, inputs: dict[str, Tensor]) -> None:
        for key, value in inputs.items():
            self.inputs[key].copy_(value, non_blocking=True)
        self.graph.replay()


class TrainSide:
    """BaheCTR or TokenCTR with fused (GPU) AdamW, timed at any N behaviours and batch size."""

    def __init__(
        self, side: Side, model: str | PretrainedConfig, k: int, n_fields: int, tokens: int, device: str,
        store: Any = None, lookup: Lookup = "device", compile: bool = False, compile_mode: str | None = None,
        compile_backend: str = "inductor", cuda_graph: bool = False,
    ) -> None:
        if cuda_graph and not device.startswith("cuda"):
            raise ValueError(f"cuda_graph: the whole-step CUDA graph needs a CUDA device, not {device!r}")
        self.side, self.k, self.n_fields, self.tokens, self.device = side, k, n_fields, tokens, device
        self.rss_at_build = PeakRSS.current()
        dtype = default_dtype(device)
        backbone = load_backbone(model, dtype, device)
        self.config = backbone.config
        cfg = ModelConfig()
        self.model: BaheCTR | TokenCTR = (
            BaheCTR(backbone, k, n_fields, cfg) if side == "bahe" else TokenCTR(backbone, n_fields, cfg)
        ).to(device)
        self.model.train()
        self.layer_graphs = compile and (compile_mode == "reduce-overhead" or compile_backend == "cudagraphs")
        if cuda_graph and self.layer_graphs:
            raise ValueError("cuda_graph: the step is captured whole; compile without CUDA graphs of its own")
        self.cuda_graph = cuda_graph
        if compile:
            self.model.backbone.compile_layers(compile_mode, compile_backend)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.startswith("cuda"), capturable=cuda_graph)
        self.store, self.lookup = store, lookup
        self.table = DeviceTable(store, device, dtype) if side == "bahe" and lookup == "device" else None
        self.atom_ids = torch.from_numpy(store.ids()) if side == "bahe" else None
        self.layer_params = layer_parameters(self.model.backbone)
        self.n_layers = len(self.model.backbone.layers)
        self.vocab = self.config.vocab_size

    def sequence_tokens(self, n: int) -> int:
        """Positions per field sequence: N behaviours (BAHE), or N*T tokens capped at the model's positions."""
        return n if self.side == "bahe" else min(n * self.tokens, self.model.backbone.max_positions)

    def item_tokens(self) -> int:
        return 1 if self.side == "bahe" else self.tokens

    def flops_per_sample(self, n: int) -> float:
        width = attention_width(self.config)
        fwd = forward_flops(self.layer_params, self.n_layers, width, self.sequence_tokens(n), self.n_fields)
        fwd += forward_flops(self.layer_params, self.n_layers, width, self.item_tokens(), 1)
        return 3.0 * fwd

    def inputs(self, batch: int, n: int, seed: int) -> dict[str, Tensor]:
        """Random atom ids (BAHE: looked up inside the step) or token ids, no padding."""
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 2, (batch,), generator=g).float().to(self.device)
        if self.side == "bahe":
            assert self.atom_ids is not None
            pick = torch.randint(0, len(self.atom_ids), (batch, self.n_fields, n + 1), generator=g)
            ids = self.atom_ids[pick]
            ids = ids.to(self.device) if self.lookup == "device" else ids
            # contiguous slices: searchsorted would copy (and warn) inside every step
            return {"hist_ids": ids[..., :n].contiguous(), "item_ids": ids[:, 0, n].contiguous(), "labels": labels}
        t = self.sequence_tokens(n)
        hist = torch.randint(0, self.vocab, (batch, self.n_fields, t), generator=g)
        item = torch.randint(0, self.vocab, (batch, self.tokens), generator=g)
        return {
            "hist_input_ids": hist.to(self.device),
            "hist_attention_mask": torch.ones(batch, self.n_fields, t, dtype=torch.bool, device=self.device),
            "item_input_ids": item.to(self.device),
            "item_attention_mask": torch.ones(batch, self.tokens, dtype=torch.bool, device=self.device),
            "labels": labels,
        }

    def batch(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The model's batch; for BAHE the embedding lookup (on the device, or host store + copy)."""
        if self.side == "token":
            return inputs
        hist_ids, item_ids = inputs["hist_ids"], inputs["item_ids"]
        if self.table is not None:
            hist, item = self.table.lookup(hist_ids), self.table.lookup(item_ids)
        else:
            hist, item = host_lookup(self.store, hist_ids, self.device), host_lookup(self.store, item_ids, self.device)
        mask = torch.ones(hist.shape[:-1], dtype=torch.bool, device=self.device)
        return {"hist": hist, "hist_mask": mask, "item": item}

    def step(self, inputs: dict[str, Tensor]) -> None:
        if self.layer_graphs:  # a new step: the graphs may reuse the previous step's memory
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.model(self.batch(inputs), padded=False)  # see inputs(): no padding
        loss = F.binary_cross_entropy_with_logits(logits, inputs["labels"])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def measure(self, batch: int, n: int, warmup: int, steps: int, budget_gb: float = math.inf) -> Result:
        """Median step time, samples/s, achieved TFLOP/s and peak memory; {"oom": True} when it does not fit."""
        row: Result = {"batch": batch, "n": n, "tokens": self.sequence_tokens(n)}
        sets = [self.inputs(batch, n, seed) for seed in range(2)]
        free_memory(self.device)
        cuda = self.device.startswith("cuda")
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)  # the peak includes the graph's capture
                step = GraphedStep(self.step, sets[0], warmup) if self.cuda_graph else self.step
                times = time_calls(lambda i: step(sets[i % 2]), self.device, warmup, steps)
                peak, reserved = torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
            else:
                with PeakRSS() as rss:
                    times = time_calls(lambda i: self.step(sets[i % 2]), self.device, warmup, steps)
                peak = reserved = rss.peak - self.rss_at_build
        except torch.cuda.OutOfMemoryError:
            times = []
        if not times:
            self.optimizer.zero_grad(set_to_none=True)
            free_memory(self.device)
            return row | {"oom": True, "fits": False}
        ms = statistics.median(times)
        return row | {
            "oom": False,
            "fits": reserved / GB <= budget_gb,
            "step_ms": round(ms, 3),
            "step_ms_runs": [round(t, 3) for t in times],
            "samples_per_s": round(batch / ms * 1e3, 2),
            "tflops": round(self.flops_per_sample(n) * batch / ms * 1e3 / 1e12, 2),
            "peak_gb": round(peak / GB, 3),
            "reserved_gb": round(reserved / GB, 3),
        }


# ---- bench train -----------------------------------------------------------------------------


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


def host_lookup_ms(store: Any, batch: int, n_fields: int, n: int, device: str, repeats: int = 3) -> float:
    """Median ms of the host path for one batch: EmbeddingStore.lookup of B*F*N+B ids, copy to the device."""
    ids = torch.from_numpy(np.random.default_rng(0).choice(store.ids(), size=(batch, n_fields * n + 1)))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        host_lookup(store, ids, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times[1:]), 3)


def bench_train(
    model: str | PretrainedConfig,
    *,
    k: int,
    tokens: int = 32,
    fields: int = 1,
    ns: list[int],
    equal_batch: int = 8,
    best_ns: list[int] | None = None,
    budget_gb: float = 80.0,
    max_batch: int = 4096,
    warmup: int = 3,
    steps: int = 10,
    lookup: Lookup | None = None,
    atoms: int = 100_000,
    compile: bool = False,
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
    cuda_graph: bool = False,
    sides: tuple[Side, ...] = ("bahe", "token"),
    device: str = "auto",
    progress: Callable[[Result], None] | None = None,
) -> Result:
    """Both sides at `equal_batch` for every N in `ns`, then each at its best batch within `budget_gb`
    for every N in `best_ns` (search trials use the same warm-up and step counts). `progress`
    gets the partial result after every measurement (a killed run keeps what it measured)."""
    device = resolve_device(device)
    setup_device(device)
    lookup = lookup or ("device" if device.startswith("cuda") else "host")
    config = model_config(model)
    per_side: dict[str, Result] = {}
    result: Result = {
        "bench": "train",
        "env": environment(device),
        "model": model_label(model),
        "weights": weights_kind(model),
        "k": k,
        "tokens_per_behavior": tokens,
        "fields": fields,
        "dtype": str(default_dtype(device)).removeprefix("torch."),
        "optimizer": "AdamW fused" if device.startswith("cuda") else "AdamW foreach",
        "compile": compile,
        "compile_mode": compile_mode,
        "compile_backend": compile_backend,
        "cuda_graph": cuda_graph,
        "lookup": lookup,
        "store_atoms": atoms,
        "budget_gb": budget_gb,
        "warmup": warmup,
        "steps": steps,
        "sides": per_side,
    }

    def update() -> None:
        result["equal_batch"] = {"batch": equal_batch, "rows": compare_equal(per_side)}
        result["best_batch"] = compare_best(per_side)
        if progress is not None:
            progress(result)

    with tempfile.TemporaryDirectory() as tmp:
        store = random_store(Path(tmp) / "store", config.hidden_size, atoms) if "bahe" in sides else None
        for side in sides:
            ts = TrainSide(side, model, k, fields, tokens, device, store, lookup, compile, compile_mode, compile_backend,
                           cuda_graph)
            data: Result = {"layer_params": ts.layer_params, "layers": ts.n_layers, "equal": [], "best": []}
            per_side[side] = data
            for n in ns:
                data["equal"].append(ts.measure(equal_batch, n, warmup, steps, budget_gb))
                update()
            for n in best_ns or []:
                trials = search_batch(lambda b: ts.measure(b, n, warmup, steps, budget_gb), 1, max_batch)
                row: Result = {"n": n, "best": best_trial(trials), "trials": trials}
                if side == "bahe" and device.startswith("cuda") and row["best"]:
                    row["host_lookup_ms"] = host_lookup_ms(store, row["best"]["batch"], fields, n, device)
                data["best"].append(row)
                update()
            del ts
            free_memory(device)
    update()
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def compare_equal(per_side: dict[str, Result]) -> list[Result]:
    """Per N at the equal batch: token/BAHE step time (speedup) and peak memory (memory_ratio)."""
    if len(per_side) < 2:
        return []
    rows = []
    for bahe, token in zip(per_side["bahe"]["equal"], per_side["token"]["equal"], strict=False):
        rows.append({
            "n": bahe["n"], "bahe_ms": bahe.get("step_ms"), "token_ms": token.get("step_ms"),
            "bahe_gb": bahe.get("peak_gb"), "token_gb": token.get("peak_gb"),
            "speedup": _ratio(token.get("step_ms"), bahe.get("step_ms")),
            "memory_ratio": _ratio(token.get("peak_gb"), bahe.get("peak_gb")),
        })
    return rows


def compare_best(per_side: dict[str, Result]) -> list[Result]:
    """Per N at each side's best batch: samples/s of both and their ratio."""
    if len(per_side) < 2:
        return []
    rows = []
    for bahe, token in zip(per_side["bahe"]["best"], per_side["token"]["best"], strict=False):
        b, t = bahe["best"] or {}, token["best"] or {}
        rows.append({
            "n": bahe["n"],
            "bahe_batch": b.get("batch"), "bahe_samples_per_s": b.get("samples_per_s"), "bahe_gb": b.get("reserved_gb"),
            "token_batch": t.get("batch"), "token_samples_per_s": t.get("samples_per_s"), "token_gb": t.get("reserved_gb"),
            "speedup": _ratio(b.get("samples_per_s"), t.get("samples_per_s")),
        })
    return rows


def plot_train(result: Result, path: str | Path) -> None:
    """Step time and peak memory against N at the equal batch, and best-batch samples/s against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = result["sides"]
    has_best = any(s["best"] for s in sides.values())
    fig, axes = plt.subplots(1, 3 if has_best else 2, figsize=(15 if has_best else 10, 4))
    batch = result["equal_batch"]["batch"]
    for side, data in sides.items():
        rows = [r for r in data["equal"] if not r["oom"]]
        ns = [r["n"] for r in rows]
        axes[0].plot(ns, [r["step_ms"] for r in rows], "o-", label=side)
        axes[1].plot(ns, [r["peak_gb"] for r in rows], "o-", label=side)
        if has_best:
            best = [r for r in data["best"] if r["best"]]
            axes[2].plot([r["n"] for r in best], [r["best"]["samples_per_s"] for r in best], "o-", label=side)
    axes[0].set(title=f"step time, batch {batch}", ylabel="ms per step (median)", yscale="log")
    axes[1].set(title=f"peak memory, batch {batch}", ylabel="GB", yscale="log")
    if has_best:
        axes[2].set(title=f"best batch within {result['budget_gb']:g} GB", ylabel="samples/s", yscale="log")
    for ax in axes:
        ax.set_xlabel("behaviours per sample N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"{result['model']} ({result['weights']} weights), k={result['k']}, T={result['tokens_per_behavior']}, "
        f"F={result['fields']}, {result['dtype']}{', compiled' if result['compile'] else ''}"
        f"{', CUDA graph' if result['cuda_graph'] else ''}, "
        f"{result['env'].get('gpu') or '{cpu} CPU, {cpu_count} cores'.format(**result['env'])}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_result(result: Result, out_dir: str | Path, name: str, plot: Callable[[Result, Path], None] | None = None) -> Path:
    """Write NAME.json (and NAME.png) under out_dir; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    if plot is not None:
        plot(result, out / f"{name}.png")
    return path


# ---- bench encode ----------------------------------------------------------------------------


@torch.inference_mode()
def encode_ids(backbone: Backbone, k: int, input_ids: Tensor, mask: Tensor, device: str) -> Tensor:
    """TransformersEncoder's work on one padded micro-batch: embed, layers [0, k), final norm, mean, to host."""
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = positions_from_mask(mask)
    hidden = backbone.embed(input_ids, positions)
    hidden = backbone.run_layers(hidden, mask, 0, k, positions)
    return pool_hidden(backbone.final_norm(hidden), mask, "mean").cpu()


def bench_encode_model(
    model: str | PretrainedConfig, *, k: int, tokens: int, batch_atoms: list[int], device: str = "auto",
    warmup: int = 3, steps: int = 10, compile: bool = False,
) -> Result:
    """Shallow-encoder atoms/s and TFLOP/s on random token ids of exactly `tokens` tokens, per micro-batch size."""
    device = resolve_device(device)
    setup_device(device)
    env = environment(device)
    backbone = load_backbone(model, default_dtype(device), device)
    backbone.keep_layers(0, k)
    backbone.eval()
    if compile:
        backbone.compile_layers()
    params, width = layer_parameters(backbone), attention_width(backbone.config)
    peak = matmul_peak_tflops(device)
    rows: list[Result] = []
    for atoms in batch_atoms:
        ids = torch.randint(0, backbone.config.vocab_size, (atoms, tokens))
        mask = torch.ones(atoms, tokens, dtype=torch.bool)
        try:
            times = time_calls(lambda i: encode_ids(backbone, k, ids, mask, device), device, warmup, steps)
        except torch.cuda.OutOfMemoryError:
            times = []
        if not times:
            free_memory(device)
            rows.append({"atoms_per_batch": atoms, "oom": True})
            continue
        ms = statistics.median(times)
        tflops = forward_flops(params, k, width, tokens, atoms) / ms * 1e3 / 1e12
        rows.append({
            "atoms_per_batch": atoms, "oom": False, "batch_tokens": atoms * tokens, "ms": round(ms, 3),
            "atoms_per_s": round(atoms / ms * 1e3, 1), "tflops": round(tflops, 2), "of_peak": round(tflops / peak, 3),
        })
    done = [r for r in rows if not r["oom"]]
    return {
        "bench": "encode-model", "env": env, "model": model_label(model), "weights": weights_kind(model),
        "k": k, "tokens": tokens, "dtype": str(default_dtype(device)).removeprefix("torch."), "compile": compile,
        "matmul_peak_tflops": round(peak, 1), "layer_params": params,
        "flops_per_atom": forward_flops(params, k, width, tokens, 1),
        "rows": rows, "best": max(done, key=lambda r: r["atoms_per_s"]) if done else None,
    }


def random_checkpoint(model: str | PretrainedConfig, layers: int | None, out_dir: str | Path) -> Path:
    """A random-weight decoder checkpoint of a model's first `layers` layers (None: all), with a byte-level
    tokenizer without merges (one token per ASCII character), so it loads like a real one."""
    from tokenizers import pre_tokenizers
    from transformers import AutoModel, Qwen2Tokenizer

    config = model_config(model)
    if config.model_type != "qwen2":
        raise ValueError(f"random_checkpoint builds Qwen2 shapes, not {config.model_type!r}")
    config = config.__class__(**{**config.to_dict(), "num_hidden_layers": layers or config.num_hidden_layers,
                                 "layer_types": None})
    AutoModel.from_config(config, dtype=torch.bfloat16).save_pretrained(out_dir)
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    Qwen2Tokenizer(vocab=vocab, merges=[]).save_pretrained(out_dir)
    return Path(out_dir)


def random_texts(n: int, chars: int, seed: int = 0) -> list[str]:
    """n texts of `chars` random lowercase letters."""
    letters = np.random.default_rng(seed).integers(ord("a"), ord("z") + 1, size=(n, chars), dtype=np.uint8)
    return [row.tobytes().decode() for row in letters]


def bench_encode_texts(encoder: Any, texts: list[str], batch_size: int) -> Result:
    """`encoder.encode` over `texts` in calls of `batch_size` atoms, as the encode job's actors call it;
    tokenisation alone is timed too (it runs on the host inside encode)."""
    encoder.encode(texts[:batch_size])  # warm-up: the calls' shapes (a compiled encoder compiles them here)
    if len(texts) % batch_size:
        encoder.encode(texts[-(len(texts) % batch_size):])
    start = time.perf_counter()
    n_tokens = sum(len(ids) for ids in encoder.atoms.ids(texts))
    tokenize_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        encoder.encode(texts[i : i + batch_size])
    seconds = time.perf_counter() - start
    return {
        "atoms": len(texts), "tokens": n_tokens, "batch_size": batch_size,
        "max_batch_tokens": encoder.max_batch_tokens, "seconds": round(seconds, 3),
        "atoms_per_s": round(len(texts) / seconds, 1), "tokenize_atoms_per_s": round(len(texts) / tokenize_s, 1),
        "compile": encoder.cfg.compile,
    }


def source_atoms(cfg: Config, source: str, events: int, workdir: str | Path) -> tuple[list[str], int, int, float]:
    """(unique atom texts, behaviour events, impressions, dedup seconds) of MovieLens or synthetic logs.

    Dedup is what the encode job does per atom: normalise, hash to an id, keep one text per id.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bahe_ray.atoms import atom_ids, normalize_column

    if source == "movielens":
        from bahe_ray.data import movielens

        ev, imp = movielens.to_tables(movielens.load_ratings(cfg.data.movielens_path, Path(cfg.data.cache_dir)))
    else:
        from bahe_ray.data import synthetic

        synth = cfg.data.synthetic.model_copy(update={"n_events": events})
        ev_dir, imp_dir = synthetic.generate(synth, str(Path(workdir) / "synthetic"))
        ev, imp = pq.read_table(ev_dir), pq.read_table(imp_dir)
    start = time.perf_counter()
    texts = normalize_column(pa.chunked_array([*ev.column("text").chunks, *imp.column("item_text").chunks]))
    _, first = np.unique(atom_ids(texts.to_pylist()), return_index=True)
    unique = texts.take(pa.array(first)).to_pylist()
    return unique, ev.num_rows, imp.num_rows, time.perf_counter() - start


def bench_encode_source(cfg: Config, source: str, events: int, workdir: str | Path, device: str, backend: str) -> Result:
    """Unique atoms/s and events/s of dedup + encoding (cfg.encoder on `backend`) of a source's atoms."""
    from bahe_ray.encoders.throughput import encode_throughput

    texts, n_events, n_impressions, dedup_s = source_atoms(cfg, source, events, workdir)
    encoded = encode_throughput(cfg.encoder, texts, backend, resolve_device(device))  # type: ignore[arg-type]
    total = dedup_s + encoded["seconds"]
    return {
        "source": source, "events": n_events, "impressions": n_impressions, "unique_atoms": len(texts),
        "dedup_s": round(dedup_s, 3), "encode": encoded,
        "unique_atoms_per_s": encoded["atoms_per_s"],
        "events_per_s": round(n_events / total, 1),
        "occurrences_per_s": round((n_events + n_impressions) / total, 1),
    }


# ---- bench pipeline --------------------------------------------------------------------------


def bench_pipeline(cfg: Config, source: str, events: int, workdir: str | Path) -> Result:
    """The Ray Data encode job (`run_encode`, local Ray) against the same job in this process
    without Ray (`run_encode_local`: read, validate, dedup, encode in calls of encoder.batch_size,
    write parts, commit)."""
    from bahe_ray.encode import prepare_inputs, run_encode, run_encode_local
    from bahe_ray.runtime import init_ray

    work = Path(workdir)
    cfg = cfg.model_copy(deep=True)
    cfg.data.source = source  # type: ignore[assignment]
    cfg.data.synthetic.n_events = events
    cfg.data.prepared_path = str(work / "data")
    events_path, impressions_path, _ = prepare_inputs(cfg)
    cfg.data.source, cfg.data.events_path, cfg.data.impressions_path = "files", events_path, impressions_path
    cfg.store.path, cfg.rejects_path = str(work / "ray-store"), str(work / "rejects")
    init_ray(cfg)
    summary = run_encode(cfg)

    plain_cfg = cfg.model_copy(deep=True)
    plain_cfg.store.path = str(work / "plain-store")
    plain = run_encode_local(plain_cfg, device="cpu")
    return {
        "bench": "pipeline", "env": environment("cpu"), "source": source, "unique_atoms": summary.unique_atoms,
        "encoder": cfg.encoder.model_dump(mode="json"),
        "ray": {"seconds": summary.seconds, "encoded": summary.encoded,
                "atoms_per_s": round(summary.encoded / summary.seconds, 1)},
        "plain": {"seconds": plain.seconds, "encoded": plain.encoded,
                  "atoms_per_s": round(plain.encoded / plain.seconds, 1), "torch_threads": torch.get_num_threads()},
        "ray_over_plain_time": round(summary.seconds / plain.seconds, 2),
    }


# ---- bench loop ------------------------------------------------------------------------------


def bench_loop(cfg: Config, model: str | PretrainedConfig, k: int, n: int, batch: int, epochs: int,
               workdir: str | Path, device: str, use_ray: bool, warmup: int, steps: int) -> Result:
    """BAHE's training loop end to end against the model alone, same model, optimizer and precision.

    A synthetic log (`data.synthetic`, one behaviour field per `data.synthetic.fields`) is encoded
    by a random-weight checkpoint of `model` (`run_encode_local`) and turned into samples (Ray
    Data). Then: `model`: `train.train_step` on one batch already on the device; `local`:
    `train_local` (sample table, prefetched batches, store lookup, step); `ray`: `train_ray` with
    one worker (Ray Data shard, Ray Train). End-to-end figures are the last epoch's (the first
    carries the warm-up); the ratio is end-to-end over model-level samples/s.
    """
    from bahe_ray.encode import prepare_inputs, run_encode_local
    from bahe_ray.runtime import init_ray
    from bahe_ray.samples import build_configured_samples, read_split_table
    from bahe_ray.train import (
        autocast_dtype,
        batch_inputs,
        initial_model,
        make_optimizer,
        train_local,
        train_ray,
        train_step,
    )

    work = Path(workdir)
    cfg = cfg.model_copy(deep=True)
    cfg.data.source, cfg.data.prepared_path = "synthetic", str(work / "data")  # type: ignore[assignment]
    checkpoint = random_checkpoint(model, None, work / "model")
    cfg.encoder.model, cfg.encoder.k, cfg.encoder.backend = str(checkpoint), k, "transformers"
    cfg.store.path, cfg.rejects_path = str(work / "store"), str(work / "rejects")
    cfg.samples.path, cfg.samples.fields, cfg.samples.max_behaviors = str(work / "samples"), cfg.data.synthetic.fields, n
    tc = cfg.train
    tc.model_kind, tc.batch_size, tc.max_epochs, tc.patience = "bahe", batch, epochs, 0
    tc.use_gpu, tc.num_workers, tc.max_train_samples = device.startswith("cuda"), 1, None
    events_path, impressions_path, _ = prepare_inputs(cfg)
    cfg.data.source = "files"  # type: ignore[assignment]
    cfg.data.events_path, cfg.data.impressions_path = events_path, impressions_path
    encoded = run_encode_local(cfg, device=device)
    init_ray(cfg)
    samples = build_configured_samples(cfg)

    net = initial_model("bahe", cfg).to(device)
    optimizer = make_optimizer(net, tc)
    inputs = batch_inputs("bahe", cfg, net)
    arrays = inputs.arrays(read_split_table(cfg.samples.path, "train", cfg.storage).slice(0, batch))
    ready, labels = inputs.batch(arrays, device), to_device(arrays.labels, device)
    params = [p for p in net.parameters() if p.requires_grad]
    dtype = autocast_dtype(tc.precision, device)
    times = time_calls(lambda i: train_step(net, optimizer, ready, labels, params, tc.grad_clip, dtype), device,
                       warmup, steps)
    step_ms = statistics.median(times)
    model_level = {"step_ms": round(step_ms, 3), "samples_per_s": round(batch / step_ms * 1e3, 1),
                   "step_ms_runs": [round(t, 3) for t in times]}
    del net, optimizer, ready
    free_memory(device)

    def end_to_end(train: Callable[[Config], Result], name: str) -> Result:
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.train.output_dir = str(work / f"train-{name}")
        report = train(run_cfg)
        last = report["epochs"][-1]
        free_memory(device)
        keys = ("train_seconds", "data_wait_seconds", "samples_per_s", "train_samples")
        return {"epochs": [{key: e[key] for key in keys} for e in report["epochs"]],
                "samples_per_s": last["samples_per_s"],
                "of_model_level": round(last["samples_per_s"] / model_level["samples_per_s"], 3)}

    result: Result = {
        "bench": "loop", "env": environment(device), "model": model_label(model), "k": k, "n": n, "batch": batch,
        "fields": list(cfg.samples.fields), "precision": tc.precision, "unique_atoms": encoded.unique_atoms,
        "samples": samples.counts, "model_level": model_level, "local": end_to_end(train_local, "local"),
    }
    if use_ray:
        result["ray"] = end_to_end(train_ray, "ray")
    return result


# ---- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bahe bench", description="benchmarks (see bahe_ray.bench)")
    sub = parser.add_subparsers(dest="what", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="cuda, cpu or auto")
        p.add_argument("--out", default="docs/bench", help="folder for NAME.json (and NAME.png)")
        p.add_argument("--name", default=None, help="output name (default: derived from the run)")

    t = sub.add_parser("train", help="training steps: BAHE against the token-level baseline")
    t.add_argument("--model", action="append", default=None,
                   help=f"preset ({', '.join(PRESETS)}), minilm-shape, {MINILM} or a folder (repeatable; "
                        "default qwen2.5-0.5b)")
    t.add_argument("--k", type=int, default=6, help="BAHE split layer")
    t.add_argument("--tokens", type=int, default=32, help="tokens per behaviour (token-level side)")
    t.add_argument("--fields", type=int, default=1, help="behaviour fields per sample, N behaviours each")
    t.add_argument("--n", type=int, nargs="+", default=[20, 50, 100, 200], help="behaviours per field")
    t.add_argument("--batch", type=int, default=8, help="the equal batch size")
    t.add_argument("--best-n", type=int, nargs="*", default=None,
                   help="N values for the best-batch search (default: --n on GPU, none on CPU)")
    t.add_argument("--budget-gb", type=float, default=80.0, help="memory budget of the best-batch search")
    t.add_argument("--max-batch", type=int, default=4096)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--lookup", choices=["device", "host"], default=None,
                   help="BAHE's embedding lookup: store table on the device, or host store + copy "
                        "(default: device on GPU, host on CPU)")
    t.add_argument("--atoms", type=int, default=100_000, help="atoms in the benchmark's embedding store")
    t.add_argument("--compile", action="store_true", help="torch.compile every transformer layer (both sides)")
    t.add_argument("--compile-mode", choices=["default", "reduce-overhead"], default=None,
                   help="torch.compile mode with --compile; reduce-overhead replays each layer as a CUDA graph")
    t.add_argument("--compile-backend", choices=["inductor", "cudagraphs"], default="inductor",
                   help="torch.compile backend with --compile; cudagraphs replays the eager kernels as CUDA graphs")
    t.add_argument("--cuda-graph", action="store_true",
                   help="capture each side's whole training step as one CUDA graph and replay it (GPU)")
    t.add_argument("--sides", nargs="+", choices=["bahe", "token"], default=["bahe", "token"])
    common(t)

    e = sub.add_parser("encode", help="shallow encoder throughput")
    e.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                   help="encoder backend of the --data runs (encoders.throughput.encode_throughput)")
    e.add_argument("--model", default=None, help="model-level run: preset, minilm-shape, MINILM or a folder")
    e.add_argument("--k", type=int, default=6)
    e.add_argument("--tokens", type=int, default=32, help="tokens per atom (model-level and random texts)")
    e.add_argument("--batch-atoms", type=int, nargs="+", default=[256, 1024, 4096, 16384],
                   help="micro-batch sizes (atoms) of the model-level run")
    e.add_argument("--texts", type=int, default=0,
                   help="also run TransformersEncoder.encode over this many random texts (random checkpoint)")
    e.add_argument("--max-batch-tokens", type=int, nargs="+", default=[16384],
                   help="TransformersEncoder max_batch_tokens values for --texts")
    e.add_argument("--data", nargs="*", choices=["movielens", "synthetic"], default=[],
                   help="also encode these sources' unique atoms with the configured encoder")
    e.add_argument("--events", type=int, default=1_000_000, help="synthetic events")
    e.add_argument("--warmup", type=int, default=3)
    e.add_argument("--steps", type=int, default=10)
    e.add_argument("--compile", action="store_true", help="torch.compile the k layers (model level and --texts)")
    common(e)

    v = sub.add_parser("serve", help="latency and throughput of POST /v1/score from concurrent clients")
    v.add_argument("--url", default=None,
                   help="a running scorer on loopback (default: start the profile's scorer, serve.checkpoint, on local Ray)")
    v.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent clients, one run each")
    v.add_argument("--requests", type=int, default=10, help="timed requests per client")
    v.add_argument("--candidates", type=int, default=100)
    v.add_argument("--behaviors", type=int, default=50, help="behaviours per field")
    v.add_argument("--time-limit", type=float, default=300.0, help="seconds per run at most")
    common(v)

    lp = sub.add_parser("loop", help="BAHE's training loop end to end (local and Ray Train) against the model alone")
    lp.add_argument("--model", default="qwen2.5-0.5b", help="random-weight preset (a Qwen2 shape)")
    lp.add_argument("--k", type=int, default=6)
    lp.add_argument("--n", type=int, default=100, help="behaviours per field")
    lp.add_argument("--batch", type=int, default=256)
    lp.add_argument("--epochs", type=int, default=2)
    lp.add_argument("--no-ray", action="store_true", help="skip the Ray Train run")
    lp.add_argument("--warmup", type=int, default=3)
    lp.add_argument("--steps", type=int, default=10)
    common(lp)
    p = sub.add_parser("pipeline", help="the Ray Data encode job against a plain loop (local Ray)")
    p.add_argument("--data", choices=["movielens", "synthetic"], default="movielens")
    p.add_argument("--events", type=int, default=1_000_000, help="synthetic events")
    common(p)
    return parser


def run_train(args: argparse.Namespace) -> list[Path]:
    device = resolve_device(args.device)
    best_n = args.best_n if args.best_n is not None else (args.n if device.startswith("cuda") else [])
    written = []
    for model in args.model or ["qwen2.5-0.5b"]:
        variant = ("-compiled" if args.compile else "") + ("-graph" if args.cuda_graph else "")
        name = args.name or f"train-{Path(model).name}-{device.split(':')[0]}{variant}"
        result = bench_train(
            model, k=args.k, tokens=args.tokens, fields=args.fields, ns=args.n, equal_batch=args.batch,
            best_ns=best_n, budget_gb=args.budget_gb, max_batch=args.max_batch, warmup=args.warmup,
            steps=args.steps, lookup=args.lookup, atoms=args.atoms, compile=args.compile, compile_mode=args.compile_mode,
            compile_backend=args.compile_backend, cuda_graph=args.cuda_graph,
            sides=tuple(args.sides), device=device, progress=lambda partial: write_result(partial, args.out, name),
        )
        written.append(write_result(result, args.out, name, plot_train))
        print(format_train(result))
    return written


def run_encode(cfg: Config, args: argparse.Namespace) -> list[Path]:
    if args.backend == "vllm" and (args.model or args.texts):
        raise ValueError("bench encode --backend vllm measures --data sources only (--model and --texts are transformers)")
    device = resolve_device(args.device)
    result: Result = {"bench": "encode", "env": environment(device), "backend": args.backend}
    if args.model:
        result["model_level"] = bench_encode_model(
            args.model, k=args.k, tokens=args.tokens, batch_atoms=args.batch_atoms, device=device,
            warmup=args.warmup, steps=args.steps, compile=args.compile,
        )
    with tempfile.TemporaryDirectory() as tmp:
        if args.texts:
            from bahe_ray.encoders.hf import TransformersEncoder

            path = random_checkpoint(args.model or "qwen2.5-0.5b", args.k, Path(tmp) / "ckpt")
            enc_cfg = EncoderConfig(model=str(path), k=args.k, max_tokens=args.tokens,
                                    compile=args.compile or cfg.encoder.compile)
            texts = random_texts(args.texts, args.tokens)
            result["texts"] = []
            for max_tokens in args.max_batch_tokens:
                encoder = TransformersEncoder(enc_cfg, device=device, max_batch_tokens=max_tokens)
                for batch_size in sorted({cfg.encoder.batch_size, max(1, max_tokens // args.tokens)}):
                    result["texts"].append(bench_encode_texts(encoder, texts, batch_size))
                del encoder
                free_memory(device)
        result["sources"] = [
            bench_encode_source(cfg, source, args.events, tmp, device, args.backend) for source in args.data
        ]
        result["encoder"] = cfg.encoder.model_dump(mode="json") if args.data else None
    name = args.name or f"encode-{device.split(':')[0]}"
    path = write_result(result, args.out, name)
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
    return [path]


def run_serve(cfg: Config, args: argparse.Namespace) -> list[Path]:
    """One load run per --clients value against --url, or against the profile's scorer started here."""
    from bahe_ray.bench_serve import run_serve_benchmark

    def runs(url: str) -> list[dict[str, Any]]:
        rows = []
        for clients in args.clients:
            rows.append(run_serve_benchmark(cfg, url, clients, clients * args.requests, args.candidates,
                                            args.behaviors, args.time_limit))
            print(json.dumps({k: rows[-1][k] for k in ("clients", "requests", "p50_ms", "p99_ms", "requests_per_s")}))
        return rows

    result: Result = {"bench": "serve", "env": environment("cpu"), "serve": cfg.serve.model_dump(mode="json")}
    if args.url:
        result["runs"] = runs(args.url)
    else:
        from bahe_ray.runtime import init_ray
        from bahe_ray.serve import running_scorer

        init_ray(cfg)
        with running_scorer(cfg) as url:
            result["runs"] = runs(url)
    return [write_result(result, args.out, args.name or "serve-cpu")]


def format_train(result: Result) -> str:
    """The equal-batch and best-batch tables as text."""
    lines = [f"{result['model']} k={result['k']} T={result['tokens_per_behavior']} F={result['fields']} "
             f"{result['dtype']} lookup={result['lookup']} compile={result['compile']} cuda_graph={result['cuda_graph']}"]
    lines.append(f"equal batch {result['equal_batch']['batch']}:  N  bahe_ms  token_ms  speedup  bahe_gb  token_gb  mem_ratio")
    for r in result["equal_batch"]["rows"]:
        lines.append(f"  {r['n']:>5} {r['bahe_ms']} {r['token_ms']} {r['speedup']} {r['bahe_gb']} {r['token_gb']} {r['memory_ratio']}")
    if result["best_batch"]:
        lines.append("best batch:  N  bahe(batch, samples/s, GB)  token(batch, samples/s, GB)  speedup")
        for r in result["best_batch"]:
            lines.append(f"  {r['n']:>5} ({r['bahe_batch']}, {r['bahe_samples_per_s']}, {r['bahe_gb']}) "
                         f"({r['token_batch']}, {r['token_samples_per_s']}, {r['token_gb']}) {r['speedup']}")
    return "\n".join(lines)


def main(cfg: Config, argv: list[str]) -> int:
    """`bahe bench WHAT ...` (cfg from bahe's --config/--set)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.what == "train" and args.cuda_graph and not resolve_device(args.device).startswith("cuda"):
        parser.error("--cuda-graph: the whole-step CUDA graph needs a CUDA device")
    if args.what == "train":
        run_train(args)
    elif args.what == "encode":
        run_encode(cfg, args)
    elif args.what == "serve":
        run_serve(cfg, args)
    elif args.what == "loop":
        device = resolve_device(args.device)
        with tempfile.TemporaryDirectory() as tmp:
            result = bench_loop(cfg, args.model, args.k, args.n, args.batch, args.epochs, tmp, device,
                                not args.no_ray, args.warmup, args.steps)
        write_result(result, args.out, args.name or f"loop-{args.model}-{device.split(':')[0]}")
        print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = bench_pipeline(cfg, args.data, args.events, tmp)
        write_result(result, args.out, args.name or f"pipeline-{args.data}")
        print(json.dumps({k: v for k, v in result.items() if k not in ("env", "encoder")}, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    from bahe_ray.cli import main as cli_main

    sys.exit(cli_main(["bench", *sys.argv[1:]]))
