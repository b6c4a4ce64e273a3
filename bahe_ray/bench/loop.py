"""`bench loop`: BAHE's training loop end to end (`train_local`, `train_ray`) against the model alone
(`train.TrainStep` on one batch already on the device), with the same model and step options (`train.*`).

The ratio of the two says what the loop around the step (sample reads, prefetch, store lookup, Ray
Data and Ray Train) costs. With several Ray Train worker counts (one GPU each on GPU; DDP, NCCL there and
gloo on CPU) it also says how the loop scales: `train.batch_size` is per worker, so the global batch grows
with the workers, and the scaling efficiency of N workers is rate(N) / (N x rate(1)).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import PretrainedConfig

from bahe_ray.bench.encode import random_checkpoint
from bahe_ray.bench.harness import Result, free_memory, time_calls
from bahe_ray.config import Config, TrainConfig
from bahe_ray.models.registry import model_label
from bahe_ray.runtime import environment, init_ray, to_device


def model_level(cfg: Config, device: str, warmup: int, steps: int) -> Result:
    """The loop's step (`TrainStep`, device table and batch shape as the loop has them) on the first
    cfg.train.batch_size training samples, already on the device; a captured step's own warm-up first."""
    from bahe_ray.samples import read_split_table
    from bahe_ray.train import TrainStep, batch_inputs, initial_model, make_optimizer, training_inputs

    tc = cfg.train
    net = initial_model("bahe", cfg).to(device)
    optimizer = make_optimizer(net, tc)
    inputs = training_inputs(batch_inputs("bahe", cfg, net), tc, device)
    arrays = inputs.arrays(read_split_table(cfg.samples.path, "train", cfg.storage).slice(0, tc.batch_size))
    ready, labels = inputs.batch(arrays, device), to_device(arrays.labels, device)
    step = TrainStep(net, optimizer, tc, device, inputs.table)
    times = time_calls(lambda i: step(ready, labels), device, step.capture_calls + warmup, steps)
    step_ms = statistics.median(times)
    return {"step_ms": round(step_ms, 3), "samples_per_s": round(tc.batch_size / step_ms * 1e3, 1),
            "step_ms_runs": [round(t, 3) for t in times]}


def bench_loop(cfg: Config, model: str | PretrainedConfig, k: int, n: int, batch: int, epochs: int,
               workdir: str | Path, device: str, use_ray: bool, warmup: int, steps: int,
               workers: Sequence[int] = (1,), use_local: bool = True,
               progress: Callable[[Result], None] | None = None) -> Result:
    """BAHE's training loop end to end against the model alone, same model, optimizer and precision.

    A synthetic log (`data.synthetic`, one behaviour field per `data.synthetic.fields`) is encoded
    by a random-weight checkpoint of `model` (`run_encode_local`) and turned into samples (Ray
    Data). Then: `model`: `train.TrainStep` on one batch already on the device; `local`:
    `train_local` (sample table, prefetched batches, store lookup, step); `ray`: one row per
    `workers` value, `train_ray` with that many workers (Ray Data shards, Ray Train; `batch` rows per
    worker and step). End-to-end figures are the last epoch's (the first carries the warm-up); the
    ratio is end-to-end samples/s per worker over model-level samples/s; with 1 among `workers`, each
    row's `scaling_efficiency` is its samples/s over N times the 1-worker row's. `use_local` False
    skips `train_local`; `progress` gets the result so far after each end-to-end run.
    """
    from bahe_ray.encode import run_encode_local
    from bahe_ray.samples import build_configured_samples
    from bahe_ray.train import train_local, train_ray

    # train.cuda_graph with several workers is refused here, before the log is built and encoded
    for count in workers:
        TrainConfig.model_validate(cfg.train.model_dump() | {"num_workers": count})
    work = Path(workdir)
    cfg = cfg.model_copy(deep=True)
    cfg.data.source, cfg.data.prepared_path = "synthetic", str(work / "data")  # type: ignore[assignment]
    checkpoint = random_checkpoint(model, None, work / "model")
    cfg.encoder.model, cfg.encoder.k, cfg.encoder.backend = str(checkpoint), k, "transformers"
    cfg.store.path, cfg.rejects_path = str(work / "store"), str(work / "rejects")
    cfg.samples.path, cfg.samples.fields, cfg.samples.max_behaviors = str(work / "samples"), cfg.data.synthetic.fields, n
    tc = cfg.train
    tc.model_kind, tc.batch_size, tc.max_epochs, tc.patience = "bahe", batch, epochs, 0
    tc.use_gpu, tc.num_workers, tc.max_train_samples = device.startswith("cuda"), 1, None
    encoded = run_encode_local(cfg, device=device)  # prepares the log once: the samples read the same tables
    init_ray(cfg)
    samples = build_configured_samples(cfg)

    model_row = model_level(cfg, device, warmup, steps)
    free_memory(device)

    def end_to_end(train: Callable[[Config], Result], name: str, count: int = 1) -> Result:
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.train.output_dir = str(work / f"train-{name}")
        run_cfg.train.num_workers = count
        report = train(run_cfg)
        last = report["epochs"][-1]
        free_memory(device)
        keys = ("train_seconds", "data_wait_seconds", "samples_per_s", "train_samples")
        return {"epochs": [{key: e[key] for key in keys} for e in report["epochs"]],
                "samples_per_s": last["samples_per_s"],
                "of_model_level": round(last["samples_per_s"] / count / model_row["samples_per_s"], 3)}

    result: Result = {
        "bench": "loop", "env": environment(device), "model": model_label(model), "k": k, "n": n, "batch": batch,
        "fields": list(cfg.samples.fields), "unique_atoms": encoded.unique_atoms,
        "step": tc.model_dump(include={"precision", "weights_dtype", "optimizer", "compile", "compile_mode",
                                       "cuda_graph", "device_table_gb", "grad_clip"}),
        "samples": samples.counts, "model_level": model_row,
    }
    if use_local:
        result["local"] = end_to_end(train_local, "local")
        if progress:
            progress(result)
    rows: list[Result] = []
    for count in workers if use_ray else ():
        rows.append({"workers": count, "global_batch": batch * count, **end_to_end(train_ray, f"ray-{count}", count)})
        result["ray"] = loop_scaling(rows)
        if progress:
            progress(result)
    return result


def loop_scaling(rows: list[Result]) -> list[Result]:
    """Each row (`workers`, `samples_per_s`: the total) with its rate per worker, samples per day and
    scaling efficiency, rate(N) / (N x rate(1)); the efficiency is None without a 1-worker row."""
    single = next((row["samples_per_s"] for row in rows if row["workers"] == 1), None)
    for row in rows:
        rate, count = row["samples_per_s"], row["workers"]
        row["samples_per_s_per_worker"] = round(rate / count, 1)
        row["samples_per_day"] = round(rate * 86_400)
        row["scaling_efficiency"] = None if not single else round(rate / (count * single), 3)
    return rows
