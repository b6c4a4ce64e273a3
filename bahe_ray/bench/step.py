"""The training benchmark's own step: BaheCTR or TokenCTR with AdamW on random inputs, eager, compiled
or captured whole as one CUDA graph, with BAHE's embedding lookup from a real store inside the step.

It stays here, apart from `bahe_ray.train`'s step, until the product's step is the benchmarked one.
Inputs have no padding, so sdpa gets no mask and picks flash kernels on both sides (the models are
told so: no step waits for the GPU to check the masks); BAHE's length-1 item pass needs no attention
kernel (`models.backbone.sdpa_or_single`). Peak memory: `max_memory_allocated` /
`max_memory_reserved` on GPU; on CPU the peak resident set during the timed steps above the
resident set before the model was built.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PretrainedConfig

from bahe_ray.bench.harness import Result, attention_width, forward_flops, free_memory, layer_parameters, time_calls
from bahe_ray.config import ModelConfig
from bahe_ray.models.ctr import BaheCTR, TokenCTR
from bahe_ray.models.registry import load_backbone
from bahe_ray.runtime import GB, PeakRSS, default_dtype

Side = Literal["bahe", "token"]
Lookup = Literal["device", "host"]

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
