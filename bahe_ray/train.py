"""Training and evaluation of the CTR models: BAHE, the token-level baseline and the ID baseline.

One plain loop, `run_epochs`, does the work; it runs alone in one process (`fit`, `train_local`:
no Ray needed, as on the GPU machine) or inside Ray Train workers (`train_ray`). Each epoch:
train on shuffled sample rows (AdamW, backbone lr `train.lr`, head lr `train.head_lr`; bf16
autocast on GPU when precision is auto), then validation AUC / logloss / GAUC; early stopping
on validation AUC after `train.patience` epochs without gain.

Vectors (BAHE) and texts (token baseline) are looked up from the embedding store where the
batch is built (`bahe_ray.features`); the sample table carries ids only.

Ray Train (`train_ray`): TorchTrainer over `train.num_workers` workers (gloo on CPU, NCCL on
GPU); the splits are read into the object store once (`train.materialize_splits`), the train
split is sharded with `get_dataset_shard`, validation rows are split between ranks by a row key
and gathered. Every epoch rank 0 writes a checkpoint folder (model,
optimizer state as safetensors, checkpoint.json with the training state) and all ranks report
it. After a worker failure Ray restarts the group and `get_checkpoint()` restores model,
optimizer and training state; the epoch then re-runs with the same per-epoch seed.
Each run writes `<output_dir>/<run>/metrics.json` and `training_curves.png`, and exports its
best epoch to `<output_dir>/best` (checkpoint format of `bahe_ray.checkpoint`).

Fault drill: if the file named by BAHE_FAIL_ONCE_FILE exists on the driver of `train_ray`,
rank 0 deletes it and raises after its first epoch checkpoint (tests the resume path).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, closing, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from io import BytesIO
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss, roc_auc_score
from torch import Tensor, nn

from bahe_ray.checkpoint import (
    CheckpointMeta,
    build_model,
    export_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    load_weights,
    read_meta,
    save_checkpoint,
    unwrap,
)
from bahe_ray.config import Config, StorageConfig, TrainConfig
from bahe_ray.encoders import encoder_fingerprint
from bahe_ray.encoders.base import ensure_compatible
from bahe_ray.features import MODEL_KINDS, ModelKind, SampleArrays, TokenCache, make_batch, sample_arrays
from bahe_ray.fs import arrow_filesystem, filesystem, is_remote, join, write_bytes_atomic
from bahe_ray.models.registry import resolve_model_path
from bahe_ray.runtime import environment, peak_memory_mb, reset_peak_memory, to_device
from bahe_ray.samples import read_split_table, read_summary
from bahe_ray.store import EmbeddingStore

log = logging.getLogger(__name__)
T = TypeVar("T")

FAIL_ONCE_ENV = "BAHE_FAIL_ONCE_FILE"
METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"
SCORE_COLUMNS = ["user_id", "ts", "item_id", "item_atom_id", "label"]


# ---- metrics -------------------------------------------------------------------------------


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray | list[str]) -> float:
    """Impression-weighted mean of per-user AUC over users with both labels (NaN if none).

    Vectorised: per-user average ranks of the scores (ties share their mean rank), then the
    Mann-Whitney form of AUC per user.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    _, codes = np.unique(np.asarray(users), return_inverse=True)
    order = np.lexsort((scores, codes))
    user, score, label = codes[order], scores[order], labels[order]
    n = len(user)
    position = np.arange(n)
    user_start = np.r_[True, user[1:] != user[:-1]]
    tie_start = user_start | np.r_[True, score[1:] != score[:-1]]
    tie = np.cumsum(tie_start) - 1
    tie_first = position[tie_start][tie]
    tie_size = np.bincount(tie)[tie]
    first_of_user = position[user_start][np.cumsum(user_start) - 1]
    rank = tie_first - first_of_user + (tie_size + 1) / 2.0  # 1-based, within the user
    count = np.bincount(user)
    positives = np.bincount(user, weights=label)
    negatives = count - positives
    pos_rank_sum = np.bincount(user, weights=rank * label)
    valid = (positives > 0) & (negatives > 0)
    if not valid.any():
        return float("nan")
    auc = (pos_rank_sum[valid] - positives[valid] * (positives[valid] + 1) / 2) / (positives[valid] * negatives[valid])
    return float(np.average(auc, weights=count[valid]))


def ctr_metrics(labels: np.ndarray, scores: np.ndarray, users: np.ndarray | list[str]) -> dict[str, float]:
    """AUC, logloss (sklearn), GAUC and the sample count; AUC and GAUC are NaN without both labels."""
    labels = np.asarray(labels)
    both = len(np.unique(labels)) == 2
    return {
        "auc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "logloss": float(log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1])) if len(labels) else float("nan"),
        "gauc": gauc(labels, scores, users) if len(labels) else float("nan"),
        "samples": float(len(labels)),
    }


# ---- batch sources -------------------------------------------------------------------------


class BatchSource(Protocol):
    """Batches of sample rows (pyarrow tables, columns of `bahe_ray.samples`) for one epoch."""

    def batches(self, epoch: int) -> Iterable[pa.Table]: ...


@dataclass
class TableSource:
    """In-memory sample rows in batches, in table order or shuffled with `seed + epoch`."""

    table: pa.Table
    batch_size: int
    seed: int | None = None

    def __post_init__(self) -> None:
        # A table read from many files has many chunks; a take over them costs ~20x more per batch.
        self.table = self.table.combine_chunks()

    def batches(self, epoch: int) -> Iterator[pa.Table]:
        n = self.table.num_rows
        order = None if self.seed is None else np.random.default_rng(self.seed + epoch).permutation(n)
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self.table.slice(start, self.batch_size)
            else:
                yield self.table.take(pa.array(order[start : start + self.batch_size]))


@dataclass
class ShardSource:
    """A Ray Train dataset shard, locally shuffled per epoch when `shuffle_buffer` is set."""

    shard: Any  # ray.data.DataIterator
    batch_size: int
    seed: int | None = None
    shuffle_buffer: int | None = None

    def batches(self, epoch: int) -> Iterable[pa.Table]:
        return self.shard.iter_batches(
            batch_size=self.batch_size,
            batch_format="pyarrow",
            local_shuffle_buffer_size=self.shuffle_buffer,
            local_shuffle_seed=None if self.seed is None else self.seed + epoch,
        )


@dataclass
class RankRows:
    """The rows of `source` that belong to one rank, chosen by a row key so any read order splits them the same."""

    source: BatchSource
    rank: int
    world_size: int

    def batches(self, epoch: int) -> Iterator[pa.Table]:
        for table in self.source.batches(epoch):
            key = table.column("item_atom_id").to_numpy() ^ table.column("ts").to_numpy()
            mine = table.filter(pa.array(key % self.world_size == self.rank))
            if mine.num_rows:
                yield mine


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """`items`, produced by a background thread up to `depth` ahead (depth 0: inline).

    Batch assembly (row takes, id padding, vector lookups, host-to-device copies) then overlaps
    the training step, as Ray Data's `prefetch_batches` does for its batches. The producer's
    errors are raised here; closing the iterator stops the producer.
    """
    if depth == 0:
        yield from items
        return
    ready: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ready.put((True, item))
            ready.put((False, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            ready.put((False, error))

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            more, item = ready.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with suppress(queue.Empty):
                ready.get(timeout=0.05)
        thread.join()


# ---- model inputs --------------------------------------------------------------------------


@dataclass
class BatchInputs:
    """What turns sample rows into one model kind's batches: the store (vectors, texts) and tokenizer."""

    kind: ModelKind
    fields: list[str]
    max_behaviors: int
    dim: int
    store: EmbeddingStore | None = None
    tokens: TokenCache | None = None

    def arrays(self, table: pa.Table) -> SampleArrays:
        return sample_arrays(table, self.fields, self.max_behaviors)

    def batch(self, arrays: SampleArrays, device: str | torch.device) -> dict[str, Tensor]:
        return make_batch(self.kind, arrays, device, vectors=self.store, tokens=self.tokens)


def batch_inputs(
    kind: ModelKind, cfg: Config, model: nn.Module, store_path: str | None = None, storage: StorageConfig | None = None
) -> BatchInputs:
    """The batch inputs of `model`: opens the embedding store (bahe: vectors; token: texts) and the tokenizer."""
    fields, n = list(cfg.samples.fields), cfg.samples.max_behaviors
    if kind == "id":
        return BatchInputs(kind, fields, n, dim=cfg.model.id_embedding_dim)
    store = EmbeddingStore.read(store_path or cfg.store.path, storage or cfg.storage)
    hidden = unwrap(model).backbone.hidden_size
    if kind == "bahe":
        if store.dim != hidden:
            raise ValueError(f"store {store.path} holds {store.dim}-d vectors; the model's layers are {hidden}-d")
        return BatchInputs(kind, fields, n, dim=store.dim, store=store)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(cfg.encoder.model)))
    tokens = TokenCache(tokenizer, unwrap(model).max_length, store.texts)
    return BatchInputs(kind, fields, n, dim=hidden, store=store, tokens=tokens)


# ---- training state ------------------------------------------------------------------------


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


# ---- the loop ------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def train_device(cfg: Config) -> str:
    if cfg.train.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu is set but no CUDA device is visible")
    return "cuda" if cfg.train.use_gpu else "cpu"


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """bf16 when asked, or on GPU under "auto"; None means plain fp32."""
    if precision == "bfloat16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: str | torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW: pretrained transformer parameters (backbone, BERT positions) at `lr`, the rest at `head_lr`."""
    pretrained, new = [], []
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            (pretrained if name.startswith(("backbone.", "positions.")) else new).append(param)
    groups = [{"params": p, "lr": lr} for p, lr in ((pretrained, tc.lr), (new, tc.head_lr)) if p]
    return torch.optim.AdamW(groups, weight_decay=tc.weight_decay)


def initial_model(kind: ModelKind, cfg: Config) -> nn.Module:
    """A seeded fresh model, or the weights of `train.resume_from` (warm start, same architecture)."""
    seed_everything(cfg.train.seed)
    model = build_model(kind, cfg)
    if cfg.train.resume_from:
        previous = read_meta(cfg.train.resume_from, cfg.storage)
        if previous.model_kind != kind:
            raise ValueError(f"train.resume_from holds a {previous.model_kind!r} model, not {kind!r}")
        meta = load_weights(cfg.train.resume_from, model, cfg.storage)
        log.info("warm start from %s (epoch %d)", cfg.train.resume_from, meta.epoch)
    return model


@dataclass
class Scored:
    """Scores of sample rows, in the order the source gave them."""

    user_ids: list[str]
    labels: np.ndarray
    scores: np.ndarray

    @classmethod
    def concat(cls, parts: Iterable[Scored]) -> Scored:
        parts = list(parts)
        return cls(
            [u for p in parts for u in p.user_ids],
            np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.float32),
            np.concatenate([p.scores for p in parts]) if parts else np.zeros(0, np.float32),
        )

    def metrics(self) -> dict[str, float]:
        return ctr_metrics(self.labels, self.scores, self.user_ids)


def score(
    model: nn.Module, inputs: BatchInputs, source: BatchSource, device: str | torch.device, dtype: torch.dtype | None = None
) -> Scored:
    """Click probabilities of every row of `source`, model in eval mode (fp32 unless `dtype`)."""
    model.eval()
    parts = []
    with torch.inference_mode(), _autocast(device, dtype):
        for table in source.batches(0):
            arrays = inputs.arrays(table)
            probs = torch.sigmoid(model(inputs.batch(arrays, device)).float()).cpu().numpy()
            labels = arrays.labels if arrays.labels is not None else np.full(len(arrays), np.nan, np.float32)
            parts.append(Scored(arrays.user_ids, labels, probs))
    return Scored.concat(parts)


class Stopwatch:
    """Wall time spent inside `next()` of the iterables it wraps: how long a loop waited for its input."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        iterator = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            yield item


def _single(obj: Any) -> list[Any]:
    return [obj]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], labels: Tensor,
               params: list[nn.Parameter], grad_clip: float, dtype: torch.dtype | None) -> Tensor:
    """One optimisation step on a batch already on the model's device; the loss stays there (no sync)."""
    with _autocast(labels.device, dtype):
        logits = model(batch)
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach()


def run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: BatchInputs,
    train: BatchSource,
    val: BatchSource,
    cfg: Config,
    device: str | torch.device,
    state: TrainState,
    on_epoch: Callable[[TrainState, EpochStats], None],
    gather: Callable[[Any], list[Any]] = _single,
    world_size: int = 1,
) -> TrainState:
    """Epochs `state.epoch + 1 ..` until max_epochs or early stopping; `on_epoch` runs after each.

    `gather(obj)` returns every rank's obj (one process: [obj]); it merges validation scores and
    training counts, so every rank computes the same metrics and stops at the same epoch.
    The dropout seed of epoch e is `seed + e`, so a resumed epoch draws what it would have.
    """
    tc = cfg.train
    raw = unwrap(model)
    params = [p for p in raw.parameters() if p.requires_grad]
    dtype = autocast_dtype(tc.precision, device)
    per_rank = None if tc.max_train_samples is None else math.ceil(tc.max_train_samples / world_size)
    max_batches = None if per_rank is None else math.ceil(per_rank / tc.batch_size)

    def assemble(table: pa.Table) -> tuple[SampleArrays, dict[str, Tensor], Tensor]:
        arrays = inputs.arrays(table)
        return arrays, inputs.batch(arrays, device), to_device(arrays.labels, device)

    for epoch in range(state.epoch + 1, tc.max_epochs + 1):
        torch.manual_seed(tc.seed + epoch)
        reset_peak_memory(device)
        model.train()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0  # on the device: no sync per step
        batches = (assemble(table) for table in islice(train.batches(epoch), max_batches))
        with closing(prefetched(batches, tc.prefetch_batches)) as ready:
            waited = Stopwatch()
            for arrays, batch, labels in waited.iterate(ready):
                loss_sum += train_step(model, optimizer, batch, labels, params, tc.grad_clip, dtype) * len(arrays)
                seen += len(arrays)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        scored = score(raw, inputs, val, device, dtype)
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
    on_epoch: Callable[[TrainState, EpochStats], None] | None = None,
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


# ---- runs ----------------------------------------------------------------------------------


def new_run_name(kind: ModelKind) -> str:
    """Unique per run, so Ray Train never mistakes a new run for the restart of an old one."""
    return f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def check_samples(cfg: Config) -> dict[str, int]:
    """The sample table must exist with the configured fields and N; returns its split counts."""
    summary = read_summary(cfg.samples.path, cfg.storage)
    if summary.fields != list(cfg.samples.fields) or summary.max_behaviors != cfg.samples.max_behaviors:
        raise ValueError(
            f"sample table {cfg.samples.path} has fields {summary.fields}, N={summary.max_behaviors}; the config asks "
            f"for {cfg.samples.fields}, N={cfg.samples.max_behaviors} (rebuild it with `bahe samples`)"
        )
    return summary.counts


def checkpoint_meta(kind: ModelKind, cfg: Config, inputs: BatchInputs, epoch: int, metrics: dict[str, Any],
                    state: TrainState | None = None) -> CheckpointMeta:
    store = inputs.store
    return CheckpointMeta(
        model_kind=kind,
        config=cfg.model_dump(mode="json"),
        fields=inputs.fields,
        max_behaviors=inputs.max_behaviors,
        dim=inputs.dim,
        encoder_fingerprint=store.fingerprint.model_dump(mode="json") if store else None,
        encoder_fingerprint_id=store.fingerprint_id if store else None,
        store_path=store.path if store else None,
        epoch=epoch,
        metrics=metrics,
        train_state=asdict(state) if state is not None else None,
    )


def _prepared_inputs(kind: ModelKind, cfg: Config, model: nn.Module) -> BatchInputs:
    inputs = batch_inputs(kind, cfg, model)
    if kind == "bahe":
        # BAHE's upper layers continue the model (and k) whose shallow layers made the stored vectors;
        # the dtype those were computed in may differ from this device's, so only model and k count.
        configured = encoder_fingerprint(cfg.encoder, "cpu")
        ensure_compatible(f"store {inputs.store.path}", {"store": inputs.store.fingerprint, "encoder": configured},
                          fields=("weights_sha256", "k"))
    return inputs


def train_local(cfg: Config, command: str = "") -> dict[str, Any]:
    """Train `train.model_kind` in this process (no Ray): export the best epoch, test it, write the report."""
    kind, tc = cfg.train.model_kind, cfg.train
    counts = check_samples(cfg)
    device = train_device(cfg)
    train_rows = read_split_table(cfg.samples.path, "train", cfg.storage)
    val_rows = read_split_table(cfg.samples.path, "val", cfg.storage)
    model = initial_model(kind, cfg)
    inputs = _prepared_inputs(kind, cfg, model)
    result = fit(cfg, kind, TableSource(train_rows, tc.batch_size, tc.seed), TableSource(val_rows, tc.eval_batch_size),
                 model=model, inputs=inputs, device=device)
    model.load_state_dict(result.best_state)
    state = result.state
    best_dir = join(tc.output_dir, "best")
    save_checkpoint(best_dir, model, checkpoint_meta(kind, cfg, inputs, state.best_epoch, state.best_metrics(), state),
                    cfg.storage)
    return finish_run(cfg, new_run_name(kind), "local", state, best_dir, counts, command, device, 1)


def train_ray(cfg: Config, command: str = "") -> dict[str, Any]:
    """Train `train.model_kind` with Ray Train (see the module docstring); same outputs as `train_local`."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bahe_ray.samples import read_split

    kind, tc = cfg.train.model_kind, cfg.train
    counts = check_samples(cfg)
    run_name = new_run_name(kind)
    if is_remote(tc.output_dir):
        storage_fs, storage_path = arrow_filesystem(tc.output_dir, cfg.storage)
    else:
        storage_fs, storage_path = None, os.path.abspath(tc.output_dir)
    # Blocks in file order (Ray Data's default follows task completion): the same seed then reads
    # the same rows in the same order, so a resumed epoch re-reads what the failed attempt read.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True

    def dataset(split: str) -> Any:
        # Streaming from parquet re-reads the files every epoch: on 2 cores ~4 s per epoch of 16 batches.
        rows = read_split(cfg.samples.path, split, cfg.storage)
        if not tc.materialize_splits:
            return rows
        rows.context.execution_options.preserve_order = True  # materialized blocks in file order, as above
        return rows.materialize()

    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "fail_once": os.environ.get(FAIL_ONCE_ENV)},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(checkpoint_score_attribute="val_auc", checkpoint_score_order="max"),
        ),
        datasets={split: dataset(split) for split in ("train", "val")},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        state = TrainState.from_dict(read_meta(folder).train_state or {})
    best = next(ckpt for ckpt, metrics in result.best_checkpoints if int(metrics["epoch"]) == state.best_epoch)
    best_dir = join(tc.output_dir, "best")
    with best.as_directory() as folder:
        export_checkpoint(folder, best_dir, cfg.storage)
    device = "cuda" if tc.use_gpu and torch.cuda.is_available() else "cpu"
    return finish_run(cfg, run_name, "ray", state, best_dir, counts, command, device, tc.num_workers)


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: build or restore, then `run_epochs` with a checkpoint report per epoch."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = Config.model_validate(loop_config["config"])
    kind, tc = cfg.train.model_kind, cfg.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    model = initial_model(kind, cfg)
    inputs = _prepared_inputs(kind, cfg, model)
    state = TrainState()
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            load_weights(folder, model)
            state = TrainState.from_dict(read_meta(folder).train_state or {})
    ddp_model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, tc)
    if restored is not None:
        with restored.as_directory() as folder:
            load_optimizer_state(folder, optimizer)
        state.restarts += 1
        log.info("rank %d resumed after epoch %d (restart %d)", rank, state.epoch, state.restarts)

    def gather(obj: Any) -> list[Any]:
        if world == 1:
            return [obj]
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return out

    def report(state: TrainState, stats: EpochStats) -> None:
        metrics = {k: v for k, v in asdict(stats).items()}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                meta = checkpoint_meta(kind, cfg, inputs, stats.epoch, metrics, state)
                save_checkpoint(tmp, model, meta, optimizer=optimizer)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{stats.epoch:03d}")
        flag = loop_config.get("fail_once")
        if rank == 0 and flag and os.path.exists(flag):
            os.remove(flag)
            raise RuntimeError(f"injected failure after epoch {stats.epoch} ({FAIL_ONCE_ENV})")

    train = ShardSource(ray.train.get_dataset_shard("train"), tc.batch_size, tc.seed, tc.shuffle_buffer)
    val = RankRows(ShardSource(ray.train.get_dataset_shard("val"), tc.eval_batch_size), rank, world)
    run_epochs(ddp_model, optimizer, inputs, train, val, cfg, device, state, report, gather, world)


# ---- evaluation ----------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Metrics of one split and the per-sample scores (columns SCORE_COLUMNS + score), in table order."""

    metrics: dict[str, float]
    scores: pa.Table


def evaluate_checkpoint(
    folder: str,
    split: str = "test",
    storage: StorageConfig | None = None,
    samples_path: str | None = None,
    store_path: str | None = None,
    device: str = "cpu",
) -> Evaluation:
    """Score one split of the sample table with a checkpoint: eval mode, fp32, deterministic batches.

    Paths default to those the checkpoint recorded; `storage` (default: the recorded one) reaches them.
    """
    model, meta = load_checkpoint(folder, storage, device)
    cfg = meta.cfg
    storage = storage or cfg.storage
    inputs = batch_inputs(meta.model_kind, cfg, model, store_path or meta.store_path, storage)
    store_fp = inputs.store.fingerprint if inputs.store is not None else None
    ensure_compatible(f"checkpoint {folder}", {"checkpoint": meta.encoder_fingerprint_id, "store": store_fp})
    table = read_split_table(samples_path or cfg.samples.path, split, storage)
    scored = score(model, inputs, TableSource(table, cfg.train.eval_batch_size), device)
    scores = table.select(SCORE_COLUMNS).append_column("score", pa.array(scored.scores, pa.float32()))
    return Evaluation(scored.metrics(), scores)


# ---- reports -------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """NaN and inf become null (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def finish_run(cfg: Config, run_name: str, mode: str, state: TrainState, best_dir: str, counts: dict[str, int],
               command: str, device: str, workers: int) -> dict[str, Any]:
    """Test the exported best checkpoint, then write metrics.json and the curves PNG into the run folder."""
    test = evaluate_checkpoint(best_dir, "test", cfg.storage, cfg.samples.path, cfg.store.path, device=device)
    epochs = state.history
    report = {
        "run": run_name,
        "model_kind": cfg.train.model_kind,
        "mode": mode,
        "workers": workers,
        "command": command,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "samples": counts,
        "epochs": epochs,
        "best_epoch": state.best_epoch,
        "stopped_early": state.stopped_early,
        "restarts": state.restarts,
        "best_checkpoint": best_dir,
        "best_val": state.best_metrics(),
        "test": test.metrics,
        "summary": {
            "epochs_run": len(epochs),
            "median_train_seconds": statistics.median(e["train_seconds"] for e in epochs),
            "median_train_cpu_seconds": statistics.median(e["train_cpu_seconds"] for e in epochs),
            "median_epoch_seconds": statistics.median(e["epoch_seconds"] for e in epochs),
            "median_samples_per_s": statistics.median(e["samples_per_s"] for e in epochs),
            "peak_memory_mb": max(e["peak_memory_mb"] for e in epochs),
        },
        "config": cfg.model_dump(mode="json"),
    }
    report = _json_safe(report)
    run_dir = join(cfg.train.output_dir, run_name)
    fs, root = filesystem(run_dir, cfg.storage)
    write_bytes_atomic(fs, join(root, METRICS_FILE), json.dumps(report, indent=2).encode())
    write_bytes_atomic(fs, join(root, CURVES_FILE), plot_curves(epochs, f"{cfg.train.model_kind} ({run_name})"))
    report["run_dir"] = run_dir
    log.info("run %s: test auc %s, written to %s", run_name, report["test"]["auc"], run_dir)
    return report


def plot_curves(epochs: list[dict[str, Any]], title: str) -> bytes:
    """PNG of training loss and validation logloss, and validation AUC and GAUC, per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = [e["epoch"] for e in epochs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(x, [e["train_loss"] for e in epochs], marker="o", label="train loss")
    left.plot(x, [e["val_logloss"] for e in epochs], marker="o", label="val logloss")
    left.set_xlabel("epoch")
    left.legend()
    right.plot(x, [e["val_auc"] for e in epochs], marker="o", label="val AUC")
    right.plot(x, [e["val_gauc"] for e in epochs], marker="o", label="val GAUC")
    right.set_xlabel("epoch")
    right.legend()
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


# ---- comparison ----------------------------------------------------------------------------


def compare(config_path: str | None, overrides: list[str], out_dir: str, use_ray: bool, command: str,
            kinds: tuple[ModelKind, ...] = MODEL_KINDS) -> dict[str, Any]:
    """Train each model kind on the same sample table, each in a fresh `bahe train` process (so peak
    memory is per model), and write `<out_dir>/compare.json` and `compare.md`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in kinds:
        report_path = out / f"{kind}.json"
        cmd = [sys.executable, "-m", "bahe_ray.cli", "train", *(["--config", config_path] if config_path else [])]
        for item in [*overrides, f"train.model_kind={kind}", f"train.output_dir={out / kind}"]:
            cmd += ["--set", item]
        cmd += ["--report-json", str(report_path)] + ([] if use_ray else ["--no-ray"])
        log.info("compare: %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
        report = json.loads(report_path.read_text())
        rows.append(compare_row(kind, report))
    token = next((r for r in rows if r["model"] == "token"), None)
    for row in rows:
        row["speedup_vs_token"] = token["train_s_per_epoch"] / row["train_s_per_epoch"] if token else None
        row["cpu_speedup_vs_token"] = token["train_cpu_s_per_epoch"] / row["train_cpu_s_per_epoch"] if token else None
    table = {"command": command, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    (out / "compare.json").write_text(json.dumps(_json_safe(table), indent=2) + "\n")
    (out / "compare.md").write_text(compare_markdown(rows, command))
    return table


def compare_row(kind: str, report: dict[str, Any]) -> dict[str, Any]:
    s = report["summary"]
    return {
        "model": kind,
        "test_auc": report["test"]["auc"],
        "test_logloss": report["test"]["logloss"],
        "test_gauc": report["test"]["gauc"],
        "epochs": s["epochs_run"],
        "best_epoch": report["best_epoch"],
        "train_s_per_epoch": s["median_train_seconds"],
        "train_cpu_s_per_epoch": s["median_train_cpu_seconds"],
        "epoch_s": s["median_epoch_seconds"],
        "samples_per_s": s["median_samples_per_s"],
        "peak_memory_mb": s["peak_memory_mb"],
        "run_dir": report["run_dir"],
    }


def compare_markdown(rows: list[dict[str, Any]], command: str) -> str:
    def num(value: Any, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        "| model | test AUC | test logloss | test GAUC | epochs (best) | train s/epoch | train CPU s/epoch | "
        "epoch s incl. val | samples/s | peak memory MiB | speed-up vs token (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {num(r['test_auc'], '.4f')} | {num(r['test_logloss'], '.4f')} | "
            f"{num(r['test_gauc'], '.4f')} | {r['epochs']} ({r['best_epoch']}) | {num(r['train_s_per_epoch'], '.1f')} | "
            f"{num(r['train_cpu_s_per_epoch'], '.1f')} | {num(r['epoch_s'], '.1f')} | {num(r['samples_per_s'], '.1f')} | "
            f"{num(r['peak_memory_mb'], '.0f')} | {num(r['speedup_vs_token'], '.1f')}x / {num(r['cpu_speedup_vs_token'], '.1f')}x |"
        )
    notes = ("Times are medians over epochs; train = the training part of an epoch, CPU = process CPU time of it "
             "(all threads). Peak memory: GPU max allocated, or process peak RSS during an epoch on CPU.")
    return "\n".join(lines) + f"\n\n{notes}\n\nCommand: `{command}`\n"
