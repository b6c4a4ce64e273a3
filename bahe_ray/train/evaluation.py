"""Scoring: click probabilities of a batch source (the loop's validation), and a saved checkpoint scored
on one split of the sample table (`bahe evaluate`, the test metrics of every run)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from bahe_ray.checkpoint import load_checkpoint
from bahe_ray.config import StorageConfig
from bahe_ray.encoders.base import ensure_compatible
from bahe_ray.samples import read_split_table
from bahe_ray.train.inputs import BatchInputs, batch_inputs
from bahe_ray.train.metrics import Scored
from bahe_ray.train.sources import BatchSource, TableSource
from bahe_ray.train.step import autocast, logits

SCORE_COLUMNS = ["user_id", "ts", "item_id", "item_atom_id", "label"]


def score(
    model: nn.Module, inputs: BatchInputs, source: BatchSource, device: str | torch.device, dtype: torch.dtype | None = None
) -> Scored:
    """Click probabilities of every row of `source`, model in eval mode (fp32 unless `dtype`), batches as
    `inputs` builds them (BAHE: rows of its device table, when it has one)."""
    model.eval()
    parts = []
    with torch.inference_mode(), autocast(device, dtype):
        for table in source.batches(0):
            arrays = inputs.arrays(table)
            probs = torch.sigmoid(logits(model, inputs.batch(arrays, device), inputs.table).float()).cpu().numpy()
            labels = arrays.labels if arrays.labels is not None else np.full(len(arrays), np.nan, np.float32)
            parts.append(Scored(arrays.user_ids, labels, probs))
    return Scored.concat(parts)


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
