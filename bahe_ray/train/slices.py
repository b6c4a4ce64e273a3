"""Test-set slices and bootstrap confidence intervals: where a model wins, and by how much beyond noise.

Slices of the test split (masks over its rows, in table order):
  overall     every test sample
  warm_items  the item had more than K impressions in the train split (K = eval.cold_max_impressions)
  cold_items  the item had at most K train impressions (0: never seen in training)
  new_users   the user has no sample in the train split

AUC intervals are percentile bootstraps over test samples (eval.bootstrap_samples resamples, fixed seed
eval.bootstrap_seed), vectorised: a resample is a count per sample, and AUC is computed from counts
summed over tie groups of the sorted scores. Given several score vectors of the same rows (seeds), every
resample draws the same rows for all, and the interval is that of their mean AUC.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from sklearn.metrics import roc_auc_score

from bahe_ray.config import Config, EvalConfig
from bahe_ray.samples import read_split_table
from bahe_ray.train.metrics import ctr_metrics

SLICES = ("overall", "warm_items", "cold_items", "new_users")
CHUNK_ELEMENTS = 1 << 22  # resamples x rows per chunk of the bootstrap (32 MiB of int64 counts)


def split_slices(cfg: Config) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """(the test split's user_id, item_id and label columns, its slice masks) of the configured sample table."""
    path = cfg.samples.path
    columns = ["user_id", "item_id", "label"]
    test = read_split_table(path, "test", cfg.storage, columns)
    train = read_split_table(path, "train", cfg.storage, columns[:2])
    return test, slice_masks(test, train, cfg.eval.cold_max_impressions)


def slice_masks(test: pa.Table, train: pa.Table, cold_max_impressions: int) -> dict[str, np.ndarray]:
    """Boolean masks over the rows of `test` (columns item_id, user_id) from the train split's rows."""
    train_items, train_counts = np.unique(np.asarray(train.column("item_id").to_pylist(), dtype=object).astype(str),
                                          return_counts=True)
    items = np.asarray(test.column("item_id").to_pylist(), dtype=object).astype(str)
    where = np.searchsorted(train_items, items)
    seen = (where < len(train_items)) & (train_items[np.minimum(where, len(train_items) - 1)] == items)
    counts = np.where(seen, train_counts[np.minimum(where, len(train_items) - 1)], 0)
    users = np.asarray(test.column("user_id").to_pylist(), dtype=object).astype(str)
    train_users = np.unique(np.asarray(train.column("user_id").to_pylist(), dtype=object).astype(str))
    return {
        "overall": np.ones(len(items), dtype=bool),
        "warm_items": counts > cold_max_impressions,
        "cold_items": counts <= cold_max_impressions,
        "new_users": ~np.isin(users, train_users),
    }


def bootstrap_auc(labels: np.ndarray, score_sets: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """AUC of each resample, averaged over `score_sets` (all scoring the same rows): (resamples,), NaN where a
    resample holds one label only."""
    labels = np.asarray(labels, dtype=np.float64)
    n = len(labels)
    if n == 0:  # an empty slice (e.g. no new users in the test split): no AUC to resample
        return np.full(resamples, np.nan)
    orders, starts = [], []
    for scores in score_sets:
        order = np.argsort(scores, kind="stable")
        ranked = np.asarray(scores)[order]
        orders.append(order)
        starts.append(np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]]))  # first row of each tie group
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_ELEMENTS // max(n, 1))
    out = np.empty(resamples)
    for first in range(0, resamples, chunk):
        r = min(chunk, resamples - first)
        draws = rng.integers(0, n, (r, n)) + (np.arange(r) * n)[:, None]
        counts = np.bincount(draws.ravel(), minlength=r * n).reshape(r, n).astype(np.float64)
        total = np.zeros(r)
        for order, group_starts in zip(orders, starts):
            c, y = counts[:, order], labels[order]
            pos = np.add.reduceat(c * y, group_starts, axis=1)
            neg = np.add.reduceat(c * (1 - y), group_starts, axis=1)
            below = np.cumsum(neg, axis=1) - neg  # negatives scored strictly lower
            pairs = pos.sum(axis=1) * neg.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                total += (pos * (below + 0.5 * neg)).sum(axis=1) / pairs
        out[first : first + r] = total / len(score_sets)
    return out


def interval(values: np.ndarray) -> list[float | None]:
    """The 95% percentile interval of bootstrap values (NaN resamples left out); [None, None] if none."""
    finite = values[np.isfinite(values)]
    return [float(v) for v in np.percentile(finite, [2.5, 97.5])] if finite.size else [None, None]


def sliced_metrics(scores: pa.Table, masks: dict[str, np.ndarray], cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """Per slice: AUC with its 95% interval, logloss, GAUC, samples and positives of one scored test split
    (columns user_id, label, score, rows in the order of `masks`)."""
    labels = scores.column("label").to_numpy().astype(np.float64)
    values = scores.column("score").to_numpy().astype(np.float64)
    users = np.asarray(scores.column("user_id").to_pylist(), dtype=object).astype(str)
    out = {}
    for name, mask in masks.items():
        metrics: dict[str, Any] = ctr_metrics(labels[mask], values[mask], users[mask]) if mask.any() else {}
        boot = bootstrap_auc(labels[mask], [values[mask]], cfg.bootstrap_samples, cfg.bootstrap_seed)
        out[name] = {**metrics, "auc_ci95": interval(boot), "samples": int(mask.sum()),
                     "positives": int(labels[mask].sum())}
    return out


def seed_mean_metrics(labels: np.ndarray, score_sets: list[np.ndarray], masks: dict[str, np.ndarray],
                      cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """Per slice, over runs of several seeds scoring the same test rows: the mean and standard deviation of
    their AUCs, and the 95% interval of the mean AUC (one bootstrap drawing the same rows for every run)."""
    out = {}
    for name, mask in masks.items():
        both = len(np.unique(labels[mask])) == 2
        aucs = [float(roc_auc_score(labels[mask], s[mask])) if both else float("nan") for s in score_sets]
        boot = bootstrap_auc(labels[mask], [s[mask] for s in score_sets], cfg.bootstrap_samples, cfg.bootstrap_seed)
        out[name] = {"auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
                     "auc_seeds": [float(a) for a in aucs], "auc_ci95": interval(boot), "samples": int(mask.sum())}
    return out
