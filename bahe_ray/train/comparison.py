"""`bahe compare`: the model kinds (bahe, bahe_hybrid, token, id, din) trained on the same sample table, for one
or several seeds, and compared in one table of test metrics, time per epoch and peak memory, and one of test
AUC per slice with bootstrap intervals (`<out_dir>/compare.json` and `compare.md`).

Each model trains in a child process of its own (a fresh interpreter, "spawn"), so its peak memory
and its time are its own, not those of the models trained before it in the same process.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shlex
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bahe_ray.config import Config, load_config
from bahe_ray.features import MODEL_KINDS, ModelKind
from bahe_ray.fs import arrow_filesystem, join
from bahe_ray.logs import setup_logging
from bahe_ray.runtime import init_ray
from bahe_ray.train.ray_run import train_ray
from bahe_ray.train.report import SCORES_FILE, json_safe
from bahe_ray.train.runs import train_local
from bahe_ray.train.slices import SLICES, seed_mean_metrics, split_slices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """One training run of a compare: its report file, and the `bahe train` overrides and command line."""

    name: str
    report: Path
    sets: list[str]
    command: str


def compare(config_path: str | None, overrides: list[str], out_dir: str, use_ray: bool, command: str,
            kinds: tuple[ModelKind, ...] = MODEL_KINDS, seeds: tuple[int, ...] | None = None,
            reuse: bool = False, parallel: int = 1) -> dict[str, Any]:
    """Train each model kind (for each of `seeds`, or once with the configured seed) on the same sample table
    (which must exist), each run in a child process, and write `<out_dir>/<kind>[-seed<s>].json` (each run's
    report), `<out_dir>/compare.json` and `compare.md`: one row per kind, AUC per test slice as the mean over
    seeds with the bootstrap interval of that mean (`bahe_ray.train.slices`). `reuse`: a run whose report is
    there already, from the same command, is not trained again (a time-boxed sequence of compares on a GPU).
    `parallel`: up to this many seeds of one kind train at once (small models leave most of a GPU idle;
    their times are then not those of a run alone)."""
    if use_ray and parallel > 1:
        raise ValueError("compare: --parallel applies without Ray (--no-ray); Ray Train runs one trainer at a time")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        runs = [planned_run(config_path, overrides, out, use_ray, kind, seed) for seed in seeds or (None,)]
        todo = [r for r in runs if not (reuse and r.report.exists()
                                        and json.loads(r.report.read_text())["command"] == r.command)]
        for first in range(0, len(todo), parallel):
            train_runs(config_path, use_ray, todo[first : first + parallel])
        reports[kind] = [json.loads(r.report.read_text()) for r in runs]
    cfg = load_config(config_path, overrides)
    test, masks = split_slices(cfg)
    rows = [kind_row(kind, runs, test, masks, cfg) for kind, runs in reports.items()]
    token = next((r for r in rows if r["model"] == "token"), None)
    for row in rows:
        row["speedup_vs_token"] = token["train_s_per_epoch"] / row["train_s_per_epoch"] if token else None
        row["cpu_speedup_vs_token"] = token["train_cpu_s_per_epoch"] / row["train_cpu_s_per_epoch"] if token else None
    table = {"command": command, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "seeds": list(seeds) if seeds else [cfg.train.seed], "slices": slice_sizes(test, masks, cfg), "rows": rows}
    (out / "compare.json").write_text(json.dumps(json_safe(table), indent=2) + "\n")
    (out / "compare.md").write_text(compare_markdown(rows, command) + slices_markdown(rows, table["slices"]))
    return table


def planned_run(config_path: str | None, overrides: list[str], out: Path, use_ray: bool, kind: ModelKind,
                seed: int | None) -> Run:
    name = kind if seed is None else f"{kind}-seed{seed}"
    run_dir = out / kind if seed is None else out / kind / f"seed{seed}"
    sets = [*overrides, *([] if seed is None else [f"train.seed={seed}"]), f"train.model_kind={kind}",
            f"train.output_dir={run_dir}"]
    report = out / f"{name}.json"
    return Run(name, report, sets, train_command(config_path, sets, str(report), use_ray))


def train_runs(config_path: str | None, use_ray: bool, runs: list[Run]) -> None:
    """Train `runs` at once, each in a child process of its own (a fresh interpreter, "spawn")."""
    spawn = multiprocessing.get_context("spawn")
    children = []
    for run in runs:
        log.info("compare: %s", run.command)
        child = spawn.Process(target=train_and_report, args=(config_path, run.sets, use_ray, run.command,
                                                             str(run.report)), name=f"compare-{run.name}")
        child.start()
        children.append(child)
    for run, child in zip(runs, children):
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"compare: training {run.name} failed (exit code {child.exitcode}): {run.command}")


def train_command(config_path: str | None, overrides: list[str], report_path: str, use_ray: bool) -> str:
    """The `bahe train` command line that does what one child of `compare` does (recorded in its report)."""
    args = ["bahe", "train", *(["--config", config_path] if config_path else [])]
    for item in overrides:
        args += ["--set", item]
    args += ["--report-json", report_path] + ([] if use_ray else ["--no-ray"])
    return shlex.join(args)


def train_and_report(config_path: str | None, overrides: list[str], use_ray: bool, command: str,
                     report_path: str) -> None:
    """A child of `compare`: train with Ray Train or in-process, then write the run report to `report_path`."""
    setup_logging()
    cfg = load_config(config_path, overrides)
    if use_ray:
        init_ray(cfg)
        report = train_ray(cfg, command)
    else:
        report = train_local(cfg, command)
    Path(report_path).write_text(json.dumps(report, indent=2) + "\n")


def compare_row(kind: str, report: dict[str, Any]) -> dict[str, Any]:
    """One run's row: test metrics, epochs, medians of its epoch times, peak memory."""
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


def kind_row(kind: str, reports: list[dict[str, Any]], test: pa.Table, masks: dict[str, np.ndarray],
             cfg: Config) -> dict[str, Any]:
    """One kind's row over its runs (one per seed): the first run's row with the test metrics averaged, the
    times and memory as medians over runs, and per slice the seed-mean AUC with its interval."""
    runs = [compare_row(kind, r) for r in reports]
    row = dict(runs[0])
    for key in ("test_auc", "test_logloss", "test_gauc"):
        row[key] = statistics.fmean(r[key] for r in runs) if all(r[key] is not None for r in runs) else None
    for key in ("train_s_per_epoch", "train_cpu_s_per_epoch", "epoch_s", "samples_per_s", "peak_memory_mb"):
        row[key] = statistics.median(r[key] for r in runs)
    row["epochs"] = [r["epochs"] for r in runs]
    row["best_epoch"] = [r["best_epoch"] for r in runs]
    row["run_dir"] = [r["run_dir"] for r in runs]
    score_sets = [run_scores(r["run_dir"], test, cfg) for r in runs]
    labels = test.column("label").to_numpy().astype(np.float64)
    row["slices"] = seed_mean_metrics(labels, score_sets, masks, cfg.eval)
    return row


def run_scores(run_dir: str, test: pa.Table, cfg: Config) -> np.ndarray:
    """A run's test scores, checked to be of the same rows, in the same order, as `test`."""
    fs, inner = arrow_filesystem(join(run_dir, SCORES_FILE), cfg.storage)
    scores = pq.read_table(inner, filesystem=fs)
    if not scores.select(["user_id", "item_id"]).equals(test.select(["user_id", "item_id"])):
        raise ValueError(f"{run_dir}: its test scores are not of this sample table's test split ({cfg.samples.path})")
    return scores.column("score").to_numpy().astype(np.float64)


def slice_sizes(test: pa.Table, masks: dict[str, np.ndarray], cfg: Config) -> dict[str, Any]:
    labels = test.column("label").to_numpy()
    return {"cold_max_impressions": cfg.eval.cold_max_impressions, "bootstrap_samples": cfg.eval.bootstrap_samples,
            **{name: {"samples": int(m.sum()), "positives": int(labels[m].sum())} for name, m in masks.items()}}


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
            f"{num(r['test_gauc'], '.4f')} | {'/'.join(map(str, r['epochs']))} ({'/'.join(map(str, r['best_epoch']))}) | {num(r['train_s_per_epoch'], '.1f')} | "
            f"{num(r['train_cpu_s_per_epoch'], '.1f')} | {num(r['epoch_s'], '.1f')} | {num(r['samples_per_s'], '.1f')} | "
            f"{num(r['peak_memory_mb'], '.0f')} | {num(r['speedup_vs_token'], '.1f')}x / {num(r['cpu_speedup_vs_token'], '.1f')}x |"
        )
    notes = ("Test metrics are means over seeds; epochs per seed. Times are medians over epochs (and seeds); train = the training part of an epoch, CPU = process CPU time of it "
             "(all threads). Peak memory: GPU max allocated, or process peak RSS during an epoch on CPU.")
    return "\n".join(lines) + f"\n\n{notes}\n\nCommand: `{command}`\n"


def slices_markdown(rows: list[dict[str, Any]], sizes: dict[str, Any]) -> str:
    """Test AUC per slice: mean over seeds, standard deviation, and the 95% bootstrap interval of the mean."""
    def cell(m: dict[str, Any]) -> str:
        low, high = m["auc_ci95"]
        if low is None:
            return "n/a"
        return f"{m['auc_mean']:.4f} ± {m['auc_std']:.4f} [{low:.4f}, {high:.4f}]"

    lines = ["| model | " + " | ".join(f"{name} ({sizes[name]['samples']:,})" for name in SLICES) + " |",
             "|---|" + "---|" * len(SLICES)]
    lines += [f"| {r['model']} | " + " | ".join(cell(r["slices"][name]) for name in SLICES) + " |" for r in rows]
    notes = (f"Test AUC per slice: mean ± standard deviation over seeds [95% bootstrap interval of the mean, "
             f"{sizes['bootstrap_samples']} resamples]. Cold items: at most {sizes['cold_max_impressions']} train "
             "impressions; new users: no train sample.")
    return "\n" + "\n".join(lines) + f"\n\n{notes}\n"
