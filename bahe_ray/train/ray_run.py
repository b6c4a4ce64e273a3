"""`train_ray`: the training run on Ray Train, same outputs as `train_local`.

TorchTrainer over `train.num_workers` workers (gloo on CPU, NCCL on GPU); the splits are read into
the object store once (`train.materialize_splits`), the train split is sharded with
`get_dataset_shard`, validation rows are split between ranks by a row key and gathered. Every epoch
rank 0 writes a checkpoint folder (model, optimizer state as safetensors, checkpoint.json with the
training state) and all ranks report it. After a worker failure Ray restarts the group and
`get_checkpoint()` restores model, optimizer and training state; the epoch then re-runs with the
same per-epoch seed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from bahe_ray.checkpoint import export_checkpoint, load_optimizer_state, load_weights, read_meta, save_checkpoint
from bahe_ray.config import Config
from bahe_ray.fs import arrow_filesystem, is_remote, join
from bahe_ray.train.loop import EpochCallback, EpochStats, TrainState, run_epochs
from bahe_ray.train.report import finish_run
from bahe_ray.train.runs import check_samples, checked_inputs, checkpoint_meta, new_run_name
from bahe_ray.train.sources import RankRows, ShardSource
from bahe_ray.train.step import computes_on_gpu, initial_model, make_optimizer

log = logging.getLogger(__name__)


def train_ray(cfg: Config, command: str = "", *, on_epoch: Sequence[EpochCallback] = ()) -> dict[str, Any]:
    """Train `train.model_kind` with Ray Train (see the module docstring); same outputs as `train_local`.

    `on_epoch`: callables run by every worker after it reported an epoch's checkpoint (pickled to the
    workers with the loop config); an exception from one fails that worker as any other error would.
    """
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
        train_loop_config={"config": cfg.model_dump(mode="json"), "on_epoch": list(on_epoch)},
        torch_config=TorchConfig(backend="nccl" if computes_on_gpu(cfg) else "gloo"),
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
    # Read by Ray Train's controller, to which the driver's environment is propagated.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(tc.worker_start_timeout_s)
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        state = TrainState.from_dict(read_meta(folder).train_state or {})
    best = next(ckpt for ckpt, metrics in result.best_checkpoints if int(metrics["epoch"]) == state.best_epoch)
    best_dir = join(tc.output_dir, "best")
    with best.as_directory() as folder:
        export_checkpoint(folder, best_dir, cfg.storage)
    device = "cuda" if computes_on_gpu(cfg) and torch.cuda.is_available() else "cpu"
    return finish_run(cfg, run_name, "ray", state, best_dir, counts, command, device, tc.num_workers)


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: build or restore, then `run_epochs` with a checkpoint report per epoch."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = Config.model_validate(loop_config["config"])
    callbacks: list[EpochCallback] = loop_config["on_epoch"]
    kind, tc = cfg.train.model_kind, cfg.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if computes_on_gpu(cfg) else torch.device("cpu")
    model = initial_model(kind, cfg)
    inputs = checked_inputs(kind, cfg, model)
    state = TrainState()
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            load_weights(folder, model)
            state = TrainState.from_dict(read_meta(folder).train_state or {})
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=device)
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
        metrics = asdict(stats)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                meta = checkpoint_meta(kind, cfg, inputs, stats.epoch, metrics, state)
                save_checkpoint(tmp, model, meta, optimizer=optimizer)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{stats.epoch:03d}")
        for callback in callbacks:
            callback(state, stats)

    train = ShardSource(ray.train.get_dataset_shard("train"), tc.batch_size, tc.seed, tc.shuffle_buffer)
    val = RankRows(ShardSource(ray.train.get_dataset_shard("val"), tc.eval_batch_size), rank, world)
    run_epochs(ddp_model, optimizer, inputs, train, val, cfg, device, state, report, gather, world)
