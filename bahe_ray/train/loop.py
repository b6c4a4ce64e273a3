"""The training loop, one plain function that runs alone in one process (`fit`) or inside each Ray
Train worker (`bahe_ray.train.ray_run`).

Each epoch: train on shuffled sample rows (the step of `train.step.TrainStep`: AdamW, backbone lr
`train.lr`, head lr `train.head_lr`, bf16 autocast on GPU when precision is auto, compiled or captured
as `train.*` says), then validation AUC / logloss / GAUC, eager; early stopping on validation AUC
after `train.patience` epochs without gain. `TrainState` is what resuming needs besides weights and
optimizer state.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor, nn

from bahe_ray.checkpoint import unwrap
from bahe_ray.config import Config, TrainConfig
from bahe_ray.features import ModelBatch, ModelKind, SampleArrays
from bahe_ray.runtime import peak_memory_mb, reset_peak_memory, to_device
from bahe_ray.train.evaluation import score
from bahe_ray.train.inputs import BatchInputs, batch_inputs, training_inputs
from bahe_ray.train.metrics import Scored
from bahe_ray.train.sources import BatchSource, Stopwatch, prefetched
from bahe_ray.train.step import TrainStep, autocast_dtype, initial_model, make_optimizer, train_device

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    """One epoch's record in metrics.json (times in seconds, memory in MiB)."""

    epoch: int
    train_loss: float
    train_samples: int
    train_seconds: float
    train_cpu_seconds: float  # CPU time of the training part (all threads); steadier than wall time on a shared machine
    data_wait_seconds: float  # of train_seconds, the time the loop waited for its next batch (input-bound if large)
    epoch_seconds: float  # train + validation
    samples_per_s: float  # training samples per second of training time
    peak_memory_mb: float  # GPU: max allocated; CPU: process peak RSS during the epoch
    val_auc: float
    val_logloss: float
    val_gauc: float
    val_samples: int


@dataclass
class TrainState:
    """What resuming needs besides weights and optimizer: progress, best epoch, patience, history."""

    epoch: int = 0  # epochs completed
    best_epoch: int = 0
    best_auc: float | None = None
    since_best: int = 0
    stopped_early: bool = False
    restarts: int = 0  # resumes after failures
    history: list[dict[str, Any]] = field(default_factory=list)

    def record(self, stats: EpochStats, tc: TrainConfig) -> None:
        """Append an epoch; track the best validation AUC and decide early stopping."""
        self.epoch = stats.epoch
        self.history.append(asdict(stats))
        improved = not math.isnan(stats.val_auc) and (self.best_auc is None or stats.val_auc > self.best_auc)
        if improved or self.best_epoch == 0:
            self.best_epoch, self.since_best = stats.epoch, 0
            self.best_auc = None if math.isnan(stats.val_auc) else stats.val_auc
        else:
            self.since_best += 1
        self.stopped_early = 0 < tc.patience <= self.since_best and stats.epoch < tc.max_epochs

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(**data)

    def best_metrics(self) -> dict[str, float | None]:
        row = self.history[self.best_epoch - 1]
        return {k: row[k] for k in ("val_auc", "val_logloss", "val_gauc")}


EpochCallback = Callable[[TrainState, EpochStats], None]
"""Called after each epoch with the state (that epoch recorded) and the epoch's stats."""


def _single(obj: Any) -> list[Any]:
    return [obj]


def full_batches(tables: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """The tables of `size` rows; a smaller one (an epoch's last) is dropped and logged: a captured step
    (`train.cuda_graph`) replays one shape."""
    for table in tables:
        if table.num_rows == size:
            yield table
        else:
            log.info("dropped a partial batch of %d rows (train.cuda_graph: one batch shape)", table.num_rows)


def run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: BatchInputs,
    train: BatchSource,
    val: BatchSource,
    cfg: Config,
    device: str | torch.device,
    state: TrainState,
    on_epoch: EpochCallback,
    gather: Callable[[Any], list[Any]] = _single,
    world_size: int = 1,
) -> TrainState:
    """Epochs `state.epoch + 1 ..` until max_epochs or early stopping; `on_epoch` runs after each.

    `gather(obj)` returns every rank's obj (one process: [obj]); it merges validation scores and
    training counts, so every rank computes the same metrics and stops at the same epoch.
    The dropout seed of epoch e is `seed + e`, so a resumed epoch draws what it would have.
    BAHE's vectors move to the device here when they fit `train.device_table_gb`.
    """
    tc = cfg.train
    raw = unwrap(model)
    dtype = autocast_dtype(tc.precision, device)
    per_rank = None if tc.max_train_samples is None else math.ceil(tc.max_train_samples / world_size)
    max_batches = None if per_rank is None else math.ceil(per_rank / tc.batch_size)
    train_inputs = training_inputs(inputs, tc, device)
    val_inputs = replace(train_inputs, fixed_shape=False)
    step = TrainStep(model, optimizer, tc, device, train_inputs.table)

    def assemble(table: pa.Table) -> tuple[SampleArrays, ModelBatch, Tensor]:
        arrays = train_inputs.arrays(table)
        return arrays, train_inputs.batch(arrays, device), to_device(arrays.labels, device)

    for epoch in range(state.epoch + 1, tc.max_epochs + 1):
        torch.manual_seed(tc.seed + epoch)
        reset_peak_memory(device)
        model.train()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0  # on the device: no sync per step
        tables = islice(train.batches(epoch), max_batches)
        if train_inputs.fixed_shape:
            tables = full_batches(tables, tc.batch_size)
        batches = (assemble(table) for table in tables)
        with closing(prefetched(batches, tc.prefetch_batches)) as ready:
            waited = Stopwatch()
            for arrays, batch, labels in waited.iterate(ready):
                loss_sum += step(batch, labels) * len(arrays)
                seen += len(arrays)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        scored = score(raw, val_inputs, val, device, dtype)
        epoch_seconds = time.perf_counter() - start
        ranks = gather((scored, loss_sum.item(), seen, train_seconds, epoch_seconds, peak_memory_mb(device), train_cpu,
                        waited.seconds))
        val_metrics = Scored.concat(r[0] for r in ranks).metrics()
        total = sum(r[2] for r in ranks)
        slowest = max(r[3] for r in ranks)
        stats = EpochStats(
            epoch=epoch,
            train_loss=sum(r[1] for r in ranks) / max(total, 1),
            train_samples=total,
            train_seconds=slowest,
            train_cpu_seconds=sum(r[6] for r in ranks),
            data_wait_seconds=max(r[7] for r in ranks),
            epoch_seconds=max(r[4] for r in ranks),
            samples_per_s=total / slowest if slowest > 0 else 0.0,
            peak_memory_mb=max(r[5] for r in ranks),
            val_auc=val_metrics["auc"],
            val_logloss=val_metrics["logloss"],
            val_gauc=val_metrics["gauc"],
            val_samples=int(val_metrics["samples"]),
        )
        state.record(stats, tc)
        log.info("epoch %d: loss %.4f, val auc %.4f gauc %.4f, %.1f s train (%.1f samples/s, %.1f s waiting for data)",
                 epoch, stats.train_loss, stats.val_auc, stats.val_gauc, stats.train_seconds, stats.samples_per_s,
                 stats.data_wait_seconds)
        on_epoch(state, stats)
        if state.stopped_early:
            log.info("early stop: no validation AUC gain for %d epoch(s)", state.since_best)
            break
    return state


@dataclass
class FitResult:
    """A plain `fit`: the final training state (history, best epoch) and the best epoch's weights (CPU)."""

    state: TrainState
    best_state: dict[str, Tensor]

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state.history


def fit(
    cfg: Config,
    model_kind: ModelKind,
    train_source: BatchSource,
    val_source: BatchSource,
    *,
    model: nn.Module | None = None,
    inputs: BatchInputs | None = None,
    device: str | None = None,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train `model_kind` in this process (no Ray). Same config and seed, same metrics (on CPU).

    `model` defaults to `initial_model(model_kind, cfg)`, `inputs` to its `batch_inputs`.
    """
    device = device or train_device(cfg)
    model = model if model is not None else initial_model(model_kind, cfg)
    inputs = inputs or batch_inputs(model_kind, cfg, model)
    model.to(device)
    optimizer = make_optimizer(model, cfg.train)
    best: dict[str, Tensor] = {}

    def keep_best(state: TrainState, stats: EpochStats) -> None:
        if state.best_epoch == stats.epoch:
            best.clear()
            best.update({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        if on_epoch is not None:
            on_epoch(state, stats)

    state = run_epochs(model, optimizer, inputs, train_source, val_source, cfg, device, TrainState(), keep_best)
    return FitResult(state, best)
