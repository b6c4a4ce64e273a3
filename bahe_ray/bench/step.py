"""One side of the training benchmark: BaheCTR or TokenCTR of a random-weight shape, trained by the
product's step (`bahe_ray.train.TrainStep`) with the options of a `TrainConfig`, on random inputs.

Model, optimizer, device table and batches come from the public training API (`cast_weights`,
`make_optimizer`, `training_inputs`, `BatchInputs.batch`), so the benchmark times what `bahe train`
runs. BAHE's inputs are random atom ids of a real store, looked up as training looks them up (rows
of the device table, gathered inside the step, or the host path's vectors, looked up before it);
the token side's are random token ids. Inputs have no padding, so sdpa gets no mask and picks flash
kernels on both sides (the batches say so: no step waits for the GPU to check the masks); BAHE's
length-1 item pass needs no attention kernel (`models.backbone.sdpa_or_single`). Peak memory:
`max_memory_allocated` / `max_memory_reserved` on GPU; on CPU the peak resident set during the
timed steps above the resident set before the model was built.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from transformers import PretrainedConfig

from bahe_ray.bench.harness import Result, attention_width, forward_flops, free_memory, layer_parameters, time_calls
from bahe_ray.config import ModelConfig, TrainConfig
from bahe_ray.features import ModelBatch, SampleArrays
from bahe_ray.models.ctr import BaheCTR, TokenCTR
from bahe_ray.models.registry import load_backbone
from bahe_ray.runtime import GB, PeakRSS
from bahe_ray.store import EmbeddingStore
from bahe_ray.train import BatchInputs, TrainStep, cast_weights, make_optimizer, training_inputs

Side = Literal["bahe", "token"]


def random_store(path: str | Path, dim: int, n_atoms: int, seed: int = 0) -> EmbeddingStore:
    """A real EmbeddingStore at `path` holding `n_atoms` random vectors under random ids."""
    from bahe_ray.encoders.base import EncoderFingerprint

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


class TrainSide:
    """BaheCTR or TokenCTR and the product's training step with `train`'s options, timed at any N and batch."""

    def __init__(self, side: Side, model: str | PretrainedConfig, k: int, n_fields: int, tokens: int, device: str,
                 train: TrainConfig, store: EmbeddingStore | None = None) -> None:
        self.side, self.k, self.n_fields, self.tokens, self.device = side, k, n_fields, tokens, device
        self.rss_at_build = PeakRSS.current()
        backbone = load_backbone(model, torch.float32, device)
        self.config = backbone.config
        cfg = ModelConfig()
        net = BaheCTR(backbone, k, n_fields, cfg) if side == "bahe" else TokenCTR(backbone, n_fields, cfg)
        self.model: BaheCTR | TokenCTR = cast_weights(net, train.weights_dtype).to(device)
        self.model.train()
        self.optimizer = make_optimizer(self.model, train)
        self.inputs: BatchInputs | None = None
        if side == "bahe":
            if store is None:
                raise ValueError("the BAHE side needs an embedding store")
            self.inputs = training_inputs(BatchInputs("bahe", [f"f{i}" for i in range(n_fields)], 0, store.dim,
                                                      store=store), train, device)
        self.step = TrainStep(self.model, self.optimizer, train, device, self.inputs.table if self.inputs else None)
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

    def arrays(self, batch: int, n: int, seed: int) -> SampleArrays:
        """BAHE's sample ids: random atoms of the store, every history full (no padding)."""
        assert self.inputs is not None and self.inputs.store is not None
        rng = np.random.default_rng(seed)
        ids = rng.choice(self.inputs.store.ids(), size=(batch, self.n_fields, n + 1))
        return SampleArrays(hist_ids=ids[..., :n], hist_mask=np.ones((batch, self.n_fields, n), bool),
                            item_ids=ids[:, 0, n], labels=rng.integers(0, 2, batch).astype(np.float32),
                            user_ids=[str(i) for i in range(batch)])

    def batch(self, batch: int, n: int, seed: int) -> tuple[ModelBatch, Tensor]:
        """One batch on the device and its labels: BAHE's built as training builds them, the token side's
        random token ids."""
        if self.inputs is not None:
            arrays = self.arrays(batch, n, seed)
            return self.inputs.batch(arrays, self.device), torch.from_numpy(arrays.labels).to(self.device)
        g = torch.Generator().manual_seed(seed)
        t = self.sequence_tokens(n)
        tensors = {
            "hist_input_ids": torch.randint(0, self.vocab, (batch, self.n_fields, t), generator=g),
            "hist_attention_mask": torch.ones(batch, self.n_fields, t, dtype=torch.bool),
            "item_input_ids": torch.randint(0, self.vocab, (batch, self.tokens), generator=g),
            "item_attention_mask": torch.ones(batch, self.tokens, dtype=torch.bool),
        }
        labels = torch.randint(0, 2, (batch,), generator=g).float()
        return ModelBatch({key: value.to(self.device) for key, value in tensors.items()}, False), labels.to(self.device)

    def batch_ms(self, batch: int, n: int, repeats: int = 3) -> float | None:
        """BAHE: median ms to build one batch from sample ids on the host and put it on the device (the loop
        overlaps this with the step); with the device table, rows instead of vectors. None for the token side."""
        if self.inputs is None:
            return None
        arrays = self.arrays(batch, n, 0)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            self.inputs.batch(arrays, self.device)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)
            times.append((time.perf_counter() - start) * 1e3)
        return round(statistics.median(times[1:]), 3)

    def measure(self, batch: int, n: int, warmup: int, steps: int, budget_gb: float = math.inf) -> Result:
        """Median step time, samples/s, achieved TFLOP/s and peak memory; {"oom": True} when it does not fit.
        A captured step's own warm-up and capture come before the `warmup` calls."""
        row: Result = {"batch": batch, "n": n, "tokens": self.sequence_tokens(n)}
        sets = [self.batch(batch, n, seed) for seed in range(2)]
        free_memory(self.device)
        warmup += self.step.capture_calls
        try:
            if self.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(self.device)  # the peak includes the graph's capture
                times = time_calls(lambda i: self.step(*sets[i % 2]), self.device, warmup, steps)
                peak, reserved = torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
            else:
                with PeakRSS() as rss:
                    times = time_calls(lambda i: self.step(*sets[i % 2]), self.device, warmup, steps)
                peak = reserved = rss.peak - self.rss_at_build
        except torch.cuda.OutOfMemoryError:
            times = []
        finally:
            self.step.release_graphs()  # each shape measured once: its graph's memory goes back
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
            "batch_ms": self.batch_ms(batch, n),
        }
