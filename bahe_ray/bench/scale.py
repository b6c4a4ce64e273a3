"""`bench scale`: how time and memory grow with the log, through the pipeline a user runs.

For each size (events in a synthetic Zipf log, `data.synthetic`, with the vocabulary and the users
growing with it: one behaviour per `events_per_atom` events, one user per `events_per_user`) the
stages run on the current Ray instance through the functions the commands call:

    data     `prepare_inputs` (`bahe data`): the log generated and every row validated
    encode   `run_encode` (`bahe encode`): dedup, anti-join, a random-weight tiny Qwen2 encoder
    samples  `build_configured_samples` (`bahe samples`)
    train    `train_ray` (`bahe train`), one epoch of BAHE on CPU, then the test split scored

Each stage records its wall time, rows/s and the peak memory of the driver, of each Ray process and
of the node (`bench.memory.TreeMemory`); the store's bytes are recorded after encode. `growth` says, per
stage, how much faster than the events a figure grew from the smallest to the largest size: 1.0 is
linear, 1.2 the issue's limit (time and tree memory; a fixed start-up cost makes small sizes look
sub-linear).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import Qwen2Config

from bahe_ray.bench.encode import random_checkpoint
from bahe_ray.bench.harness import Result
from bahe_ray.bench.memory import TreeMemory
from bahe_ray.config import Config
from bahe_ray.runtime import environment, init_ray

STAGES = ("data", "encode", "samples", "train")
# The pipeline's cost, not the model's: 2 layers of width 64 (k = 1 encodes, 1 layer trains).
ENCODER = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=300, max_position_embeddings=512)


def size_config(cfg: Config, events: int, events_per_atom: int, events_per_user: int, n: int, checkpoint: Path,
                work: Path) -> Config:
    """The profile with a synthetic log of `events` events and every path under `work`."""
    cfg = cfg.model_copy(deep=True)
    syn = cfg.data.synthetic
    syn.n_events = events
    syn.n_atoms, syn.n_users = max(1, events // events_per_atom), max(1, events // events_per_user)
    cfg.data.source, cfg.data.prepared_path = "synthetic", str(work / "data")  # type: ignore[assignment]
    cfg.rejects_path, cfg.store.path = str(work / "rejects"), str(work / "store")
    cfg.encoder.model, cfg.encoder.k, cfg.encoder.backend = str(checkpoint), 1, "transformers"
    cfg.encoder.num_gpus_per_actor, cfg.encoder.compile = 0.0, False
    cfg.samples.path, cfg.samples.fields, cfg.samples.max_behaviors = str(work / "samples"), list(syn.fields), n
    tc = cfg.train
    tc.model_kind, tc.output_dir, tc.max_epochs, tc.patience = "bahe", str(work / "train"), 1, 0
    tc.use_gpu, tc.cuda_graph, tc.device_table_gb, tc.max_train_samples, tc.resume_from = False, False, 0.0, None, None
    return cfg


def timed_stage(name: str, run: Callable[[], Any], rows: Callable[[Any], int], extra: Callable[[Any], Result],
                interval: float) -> Result:
    """Run one stage under the memory sampler: seconds, rows, rows/s, memory peaks and the stage's own figures."""
    with TreeMemory(interval) as memory:
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
    n = rows(out)
    return {"stage": name, "seconds": round(seconds, 2), "rows": n, "rows_per_s": round(n / seconds, 1),
            **memory.summary(), "load_average_1m": round(os.getloadavg()[0], 2), **extra(out)}


def run_size(cfg: Config, interval: float) -> Result:
    """The four stages on one configured log; returns the size's row."""
    from bahe_ray.data.prepare import prepare_inputs
    from bahe_ray.encode import run_encode
    from bahe_ray.samples import build_configured_samples
    from bahe_ray.store import EmbeddingStore
    from bahe_ray.train import train_ray

    init_ray(cfg)
    stages = [
        timed_stage("data", lambda: prepare_inputs(cfg, use_ray=True),
                    lambda p: p.events_read + p.impressions_read,
                    lambda p: {"events_valid": p.events_valid, "impressions_valid": p.impressions_valid}, interval),
        timed_stage("encode", lambda: run_encode(cfg), lambda s: s.atoms_seen,
                    lambda s: {"unique_atoms": s.unique_atoms, "encoded": s.encoded,
                               "encoded_per_s": round(s.encoded / s.seconds, 1)}, interval),
        timed_stage("samples", lambda: build_configured_samples(cfg), lambda s: sum(s.counts.values()),
                    lambda s: {"samples": s.counts}, interval),
        timed_stage("train", lambda: train_ray(cfg, "bahe bench scale"), lambda r: r["epochs"][0]["train_samples"],
                    lambda r: {"epoch_train_seconds": r["epochs"][0]["train_seconds"],
                               "epoch_samples_per_s": r["epochs"][0]["samples_per_s"], "test_auc": r["test"]["auc"]},
                    interval),
    ]
    store = EmbeddingStore.read(cfg.store.path, storage=cfg.storage).info()
    syn = cfg.data.synthetic
    return {"events": syn.n_events, "date": environment("cpu")["date"], "vocabulary": syn.n_atoms, "users": syn.n_users,
            "store": {"atoms": store.atoms, "parts": store.parts, "bytes": store.bytes, "dim": store.dim,
                      "dtype": store.dtype},
            "stages": {row.pop("stage"): row for row in stages}}


def growth(sizes: list[Result]) -> Result:
    """Per stage, (figure at the largest size / at the smallest) / (events ratio): 1.0 is linear."""
    if len(sizes) < 2:
        return {}
    small, large = sizes[0], sizes[-1]
    events = large["events"] / small["events"]
    figures = ("seconds", "tree_pss_peak_mb", "driver_peak_rss_mb", "worker_peak_rss_mb")
    return {stage: {figure: round(large["stages"][stage][figure] / small["stages"][stage][figure] / events, 3)
                    for figure in figures if small["stages"][stage][figure] > 0}
            for stage in STAGES}


def bench_scale(cfg: Config, sizes: list[int], workdir: str | Path, events_per_atom: int = 10,
                events_per_user: int = 100, n: int = 50, interval: float = 0.25, earlier: list[Result] | None = None,
                progress: Callable[[Result], None] | None = None) -> Result:
    """Every stage at every size, smallest first (see the module docstring), next to the `earlier`
    sizes of a run with the same settings (one size per run keeps each run short on a shared machine);
    `progress` gets the result after each size."""
    work = Path(workdir)
    checkpoint = random_checkpoint(ENCODER, None, work / "encoder")
    result: Result = {
        "bench": "scale", "env": environment("cpu"), "encoder": "random qwen2, hidden 64, 2 layers, k=1",
        "events_per_atom": events_per_atom, "events_per_user": events_per_user, "max_behaviors": n,
        "fields": list(cfg.data.synthetic.fields), "zipf_a": cfg.data.synthetic.zipf_a,
        "impressions_per_user": cfg.data.synthetic.impressions_per_user, "sizes": list(earlier or []),
    }
    for events in sorted(sizes):
        # Every stage runs from nothing: a size's folder left by an earlier run would be reused (its prepared
        # data), or refused (its store was encoded by another random encoder).
        folder = work / f"events-{events}"
        shutil.rmtree(folder, ignore_errors=True)
        size_cfg = size_config(cfg, events, events_per_atom, events_per_user, n, checkpoint, folder)
        result["sizes"] = sorted([*result["sizes"], run_size(size_cfg, interval)], key=lambda s: s["events"])
        result["growth"] = growth(result["sizes"])
        if progress is not None:
            progress(result)
    return result


def format_scale(result: Result) -> str:
    """A table of every size and stage, then the growth per stage."""
    lines = [f"{'events':>11} {'stage':<8} {'seconds':>8} {'rows/s':>10} {'driver MB':>10} {'worker MB':>10} "
             f"{'tree MB':>9} {'node MB':>9}"]
    for size in result["sizes"]:
        for stage, row in size["stages"].items():
            lines.append(f"{size['events']:>11,} {stage:<8} {row['seconds']:>8.1f} {row['rows_per_s']:>10,.0f} "
                         f"{row['driver_peak_rss_mb']:>10.0f} {row['worker_peak_rss_mb']:>10.0f} "
                         f"{row['tree_pss_peak_mb']:>9.0f} {row['node_used_peak_mb']:>9.0f}")
        lines.append(f"{'':>11} store: {size['store']['atoms']:,} atoms, {size['store']['bytes']:,} bytes")
    for stage, figures in result.get("growth", {}).items():
        lines.append(f"growth over linear, {stage}: " + ", ".join(f"{k} {v:.2f}x" for k, v in figures.items()))
    return "\n".join(lines)


def plot_scale(result: Result, path: Path) -> None:
    """Time and peak memory of each stage against events, log-log, with a linear reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    events = [s["events"] for s in sizes]
    panels = (("seconds", "wall time (s)"), ("tree_pss_peak_mb", "peak memory of driver + Ray processes, PSS (MB)"),
              ("driver_peak_rss_mb", "peak RSS of the driver (MB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (figure, label) in zip(axes, panels):
        for stage in STAGES:
            values = [s["stages"][stage][figure] for s in sizes]
            ax.plot(events, values, marker="o", label=stage)
        first = max(sizes[0]["stages"][stage][figure] for stage in STAGES)  # the line starts at the top stage
        ax.plot(events, [first * e / events[0] for e in events], "k--", lw=1, label="linear in events")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("events in the log")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("bahe bench scale: time and memory against the log's size", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
