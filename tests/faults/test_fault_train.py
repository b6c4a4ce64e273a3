"""Ray Train: a worker process SIGKILLed in the middle of epoch 2 resumes from the epoch-1 checkpoint
and ends with the metrics of an uninterrupted run with the same seed.

Setup: conftest.py's `ml` fixture (six real MovieLens users, MiniLM split at k=4), 64 training
samples per epoch in batches of 32, 2 epochs, one Ray Train worker. The kill comes from inside the
worker: its training batches pass through `KillOnce`, which SIGKILLs the worker's own process after
the first step of epoch 2 if a marker file exists (deleting it first, so it happens once). The injected
worker is the library's `bahe_ray.train.ray_run._ray_worker`, wrapped; nothing else of `train_ray` changes.

Ray Train's controller takes a worker's reports when it next polls the worker (every 2 s by
default, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). A worker that dies sooner after a report loses it, and
the group restarts from the checkpoint before (here: from scratch). So the kill waits
REPORT_POLL_WAIT_S, as a kill in the middle of a real epoch would come long after the report.

The corrupt-checkpoint side: tests/test_train.py::test_checkpoint_roundtrip_and_corruption_is_refused
(altered, truncated, mismatched model weights); here the optimizer state, which resuming reads.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
from conftest import REPORT_POLL_WAIT_S
from ray import cloudpickle

import bahe_ray.train.ray_run
from bahe_ray.checkpoint import (
    OPTIMIZER_FILE,
    CheckpointCorruptError,
    CheckpointMeta,
    build_model,
    load_optimizer_state,
    save_checkpoint,
)
from bahe_ray.config import Config, load_config, with_overrides
from bahe_ray.train import make_optimizer, train_ray

KILL_EPOCH = 2
KILL_BEFORE_STEP = 1  # 0-based: one of epoch 2's two steps is trained, then the process dies
# Metrics that must agree between the interrupted and the uninterrupted run. The resumed epoch
# starts from the same weights and AdamW state (safetensors, bit-exact), the same per-epoch seed
# (dropout, shuffle) and the same rows, on the same CPU kernels, so they agree to float32
# round-off; 1e-6 leaves room for nothing else.
COMPARED = ("train_loss", "train_samples", "val_auc", "val_logloss", "val_gauc", "val_samples")
TOLERANCE = 1e-6

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module


@dataclass
class KillOnce:
    """A BatchSource that SIGKILLs its own process at step KILL_BEFORE_STEP of KILL_EPOCH, once (marker file)."""

    source: Any
    marker: str

    def batches(self, epoch: int) -> Iterator[pa.Table]:
        for step, table in enumerate(self.source.batches(epoch)):
            if epoch == KILL_EPOCH and step == KILL_BEFORE_STEP and os.path.exists(self.marker):
                os.remove(self.marker)
                time.sleep(REPORT_POLL_WAIT_S)
                os.kill(os.getpid(), signal.SIGKILL)
            yield table


def killing_worker(marker: str) -> Callable[[dict[str, Any]], None]:
    """bahe_ray.train.ray_run._ray_worker with its training batches passed through KillOnce."""

    def worker(loop_config: dict[str, Any]) -> None:
        import bahe_ray.train.ray_run as ray_run

        run_epochs = ray_run.run_epochs

        def killing_run_epochs(model: Any, optimizer: Any, inputs: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
            return run_epochs(model, optimizer, inputs, KillOnce(source, marker), *args, **kwargs)

        ray_run.run_epochs = killing_run_epochs
        ray_run._ray_worker(loop_config)

    return worker


def final_metrics(report: dict[str, Any]) -> list[dict[str, float]]:
    return [{k: e[k] for k in COMPARED} for e in report["epochs"]]


def test_worker_killed_mid_epoch_resumes_to_the_same_metrics(ml: Config, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sets = ["train.num_workers=1", "train.cpus_per_worker=1", "train.max_epochs=2", "train.patience=0",
            "train.max_train_samples=64"]
    reference = train_ray(with_overrides(ml, [*sets, f"train.output_dir={tmp_path / 'reference'}"]), "pytest")
    assert reference["restarts"] == 0

    marker = tmp_path / "kill-once"
    marker.touch()
    monkeypatch.setattr(bahe_ray.train.ray_run, "_ray_worker", killing_worker(str(marker)))
    killed = train_ray(with_overrides(ml, [*sets, f"train.output_dir={tmp_path / 'killed'}"]), "pytest")
    assert not marker.exists(), "the worker was never killed"
    assert killed["restarts"] == 1
    assert [e["epoch"] for e in killed["epochs"]] == [1, 2]
    for got, want in zip(final_metrics(killed), final_metrics(reference)):
        assert got == pytest.approx(want, abs=TOLERANCE, rel=0)
    assert killed["test"] == pytest.approx(reference["test"], abs=TOLERANCE, rel=0)


def test_corrupt_optimizer_state_is_refused(tmp_path: Path) -> None:
    """Resuming reads optimizer.safetensors too: an altered one is refused, naming the file."""
    cfg = load_config(None, ["model.id_buckets=64", "model.id_embedding_dim=8", "model.head_hidden=[8]"])
    model = build_model("id", cfg)
    optimizer = make_optimizer(model, cfg.train)
    model(({"hist_ids": torch.tensor([[[1], [2]]]), "hist_mask": torch.tensor([[[True], [True]]]),
            "item_ids": torch.tensor([3])})).sum().backward()
    optimizer.step()
    meta = CheckpointMeta(model_kind="id", config=cfg.model_dump(mode="json"), fields=["a", "b"], max_behaviors=1, dim=8)
    save_checkpoint(str(tmp_path / "ok"), model, meta, optimizer=optimizer)
    shutil.copytree(tmp_path / "ok", tmp_path / "bad")
    path = tmp_path / "bad" / OPTIMIZER_FILE
    data = path.read_bytes()
    path.write_bytes(data[:-3] + bytes([data[-3] ^ 0x10]) + data[-2:])
    with pytest.raises(CheckpointCorruptError, match=rf"bad/{OPTIMIZER_FILE}: sha256 differs"):
        load_optimizer_state(str(tmp_path / "bad"), make_optimizer(model, cfg.train))
    load_optimizer_state(str(tmp_path / "ok"), make_optimizer(model, cfg.train))
