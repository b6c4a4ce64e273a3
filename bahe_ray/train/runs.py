"""A training run around the loop, and `train_local`, the run in this process without Ray (as on the
GPU machine). Shared with the Ray Train run: the run name, the sample-table check, the store-encoder
check, and the checkpoint record. Every run exports its best epoch to `<output_dir>/best`
(checkpoint format of `bahe_ray.checkpoint`) and writes its report (`bahe_ray.train.report`)."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import datetime
from typing import Any

from torch import nn

from bahe_ray.checkpoint import CheckpointMeta, save_checkpoint
from bahe_ray.config import Config
from bahe_ray.encoders import encoder_fingerprint
from bahe_ray.encoders.base import ensure_compatible
from bahe_ray.features import VECTOR_KINDS, ModelKind
from bahe_ray.fs import join
from bahe_ray.samples import read_split_table, read_summary
from bahe_ray.train.inputs import BatchInputs, batch_inputs
from bahe_ray.train.loop import TrainState, fit
from bahe_ray.train.report import finish_run
from bahe_ray.train.sources import TableSource
from bahe_ray.train.step import initial_model, train_device


def new_run_name(kind: ModelKind) -> str:
    """Unique per run, so Ray Train never mistakes a new run for the restart of an old one."""
    return f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def check_samples(cfg: Config) -> dict[str, int]:
    """The sample table must exist with the configured fields, N and protocol; returns its split counts."""
    summary = read_summary(cfg.samples.path, cfg.storage)
    if not summary.matches(cfg.samples):
        raise ValueError(
            f"sample table {cfg.samples.path} has fields {summary.fields}, N={summary.max_behaviors}, protocol "
            f"{summary.protocol}; the config asks for {cfg.samples.fields}, N={cfg.samples.max_behaviors}, protocol "
            f"{cfg.samples.protocol} (rebuild it with `bahe samples`)"
        )
    return summary.counts


def checked_inputs(kind: ModelKind, cfg: Config, model: nn.Module) -> BatchInputs:
    """`batch_inputs`, and for BAHE the check that the store's vectors come from the configured encoder."""
    inputs = batch_inputs(kind, cfg, model)
    if kind in VECTOR_KINDS:
        # BAHE's upper layers continue the model (and k) whose shallow layers made the stored vectors;
        # the dtype those were computed in may differ from this device's, so only model and k count.
        configured = encoder_fingerprint(cfg.encoder, "cpu")
        ensure_compatible(f"store {inputs.store.path}", {"store": inputs.store.fingerprint, "encoder": configured},
                          fields=("weights_sha256", "k"))
    return inputs


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


def train_local(cfg: Config, command: str = "") -> dict[str, Any]:
    """Train `train.model_kind` in this process (no Ray): export the best epoch, test it, write the report."""
    kind, tc = cfg.train.model_kind, cfg.train
    counts = check_samples(cfg)
    device = train_device(cfg)
    train_rows = read_split_table(cfg.samples.path, "train", cfg.storage)
    val_rows = read_split_table(cfg.samples.path, "val", cfg.storage)
    model = initial_model(kind, cfg)
    inputs = checked_inputs(kind, cfg, model)
    result = fit(cfg, kind, TableSource(train_rows, tc.batch_size, tc.seed), TableSource(val_rows, tc.eval_batch_size),
                 model=model, inputs=inputs, device=device)
    model.load_state_dict(result.best_state)
    state = result.state
    best_dir = join(tc.output_dir, "best")
    save_checkpoint(best_dir, model, checkpoint_meta(kind, cfg, inputs, state.best_epoch, state.best_metrics(), state),
                    cfg.storage)
    return finish_run(cfg, new_run_name(kind), "local", state, best_dir, counts, command, device, 1)
