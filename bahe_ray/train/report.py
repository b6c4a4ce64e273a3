"""The record of a finished run: the exported best checkpoint tested (overall and per slice, with bootstrap
AUC intervals: `bahe_ray.train.slices`), then `<output_dir>/<run>/metrics.json` (strict JSON),
`training_curves.png` and `test_scores.parquet`."""

from __future__ import annotations

import json
import logging
import math
import statistics
from datetime import datetime, timezone
from io import BytesIO
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bahe_ray.config import Config
from bahe_ray.fs import filesystem, join, write_bytes_atomic
from bahe_ray.runtime import environment
from bahe_ray.train.evaluation import evaluate_checkpoint
from bahe_ray.train.loop import TrainState
from bahe_ray.train.slices import sliced_metrics, split_slices

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"
SCORES_FILE = "test_scores.parquet"  # the best epoch's score of every test sample (compare's seed intervals)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def json_safe(value: Any) -> Any:
    """NaN and inf become null (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def finish_run(cfg: Config, run_name: str, mode: str, state: TrainState, best_dir: str, counts: dict[str, int],
               command: str, device: str, workers: int) -> dict[str, Any]:
    """Test the exported best checkpoint, then write metrics.json and the curves PNG into the run folder."""
    test = evaluate_checkpoint(best_dir, "test", cfg.storage, cfg.samples.path, cfg.store.path, device=device)
    _, masks = split_slices(cfg)
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
        "test_slices": sliced_metrics(test.scores, masks, cfg.eval),
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
    report = json_safe(report)
    run_dir = join(cfg.train.output_dir, run_name)
    fs, root = filesystem(run_dir, cfg.storage)
    write_bytes_atomic(fs, join(root, METRICS_FILE), json.dumps(report, indent=2).encode())
    write_bytes_atomic(fs, join(root, CURVES_FILE), plot_curves(epochs, f"{cfg.train.model_kind} ({run_name})"))
    write_bytes_atomic(fs, join(root, SCORES_FILE), parquet_bytes(test.scores))
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
