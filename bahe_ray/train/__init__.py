"""Training and evaluation of the CTR models: BAHE, the token-level baseline and the ID baseline.

One plain loop (`loop.run_epochs`) does the work, alone in one process (`fit`, `train_local`: no Ray
needed, as on the GPU machine) or inside Ray Train workers (`train_ray`). Each run writes
`<output_dir>/<run>/metrics.json` and `training_curves.png`, and exports its best epoch to
`<output_dir>/best`; `evaluate_checkpoint` scores a split with it; `compare` trains each model kind
in a process of its own and tabulates them.

Modules: metrics, sources (batch sources, prefetch), inputs (rows to model batches), device_table
(BAHE's vectors on the device), step (model, optimizer, `TrainStep`: eager, compiled or one CUDA
graph), loop (epochs, early stopping), evaluation, report, runs (`train_local`), ray_run
(`train_ray`), comparison.
"""

from bahe_ray.train.comparison import compare
from bahe_ray.train.device_table import DeviceTable, device_table
from bahe_ray.train.evaluation import SCORE_COLUMNS, Evaluation, evaluate_checkpoint, score
from bahe_ray.train.inputs import BatchInputs, batch_inputs, training_inputs
from bahe_ray.train.loop import EpochCallback, EpochStats, FitResult, TrainState, fit, run_epochs
from bahe_ray.train.metrics import Scored, ctr_metrics, gauc
from bahe_ray.train.ray_run import train_ray
from bahe_ray.train.report import CURVES_FILE, METRICS_FILE
from bahe_ray.train.runs import train_local
from bahe_ray.train.sources import BatchSource, RankRows, ShardSource, Stopwatch, TableSource, prefetched
from bahe_ray.train.step import (
    GraphedStep,
    TrainStep,
    autocast_dtype,
    cast_weights,
    initial_model,
    logits,
    make_optimizer,
    seed_everything,
    train_device,
)

__all__ = [
    "CURVES_FILE",
    "METRICS_FILE",
    "SCORE_COLUMNS",
    "BatchInputs",
    "BatchSource",
    "DeviceTable",
    "EpochCallback",
    "EpochStats",
    "Evaluation",
    "FitResult",
    "GraphedStep",
    "RankRows",
    "Scored",
    "ShardSource",
    "Stopwatch",
    "TableSource",
    "TrainState",
    "TrainStep",
    "autocast_dtype",
    "batch_inputs",
    "cast_weights",
    "compare",
    "ctr_metrics",
    "device_table",
    "evaluate_checkpoint",
    "fit",
    "gauc",
    "initial_model",
    "logits",
    "make_optimizer",
    "prefetched",
    "run_epochs",
    "score",
    "seed_everything",
    "train_device",
    "train_local",
    "train_ray",
    "training_inputs",
]
