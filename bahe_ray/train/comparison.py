"""`bahe compare`: bahe, token and id trained on the same sample table and compared in one table of
test metrics, time per epoch and peak memory (`<out_dir>/compare.json` and `compare.md`).

Each model trains in a child process of its own (a fresh interpreter, "spawn"), so its peak memory
and its time are its own, not those of the models trained before it in the same process.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bahe_ray.config import load_config
from bahe_ray.features import MODEL_KINDS, ModelKind
from bahe_ray.logs import setup_logging
from bahe_ray.runtime import init_ray
from bahe_ray.train.ray_run import train_ray
from bahe_ray.train.report import json_safe
from bahe_ray.train.runs import train_local

log = logging.getLogger(__name__)


def compare(config_path: str | None, overrides: list[str], out_dir: str, use_ray: bool, command: str,
            kinds: tuple[ModelKind, ...] = MODEL_KINDS) -> dict[str, Any]:
    """Train each model kind on the same sample table (which must exist), each in a child process, and
    write `<out_dir>/<kind>.json` (each run's report), `<out_dir>/compare.json` and `compare.md`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spawn = multiprocessing.get_context("spawn")
    rows = []
    for kind in kinds:
        report_path = out / f"{kind}.json"
        sets = [*overrides, f"train.model_kind={kind}", f"train.output_dir={out / kind}"]
        run_command = train_command(config_path, sets, str(report_path), use_ray)
        log.info("compare: %s", run_command)
        child = spawn.Process(target=train_and_report, args=(config_path, sets, use_ray, run_command, str(report_path)),
                              name=f"compare-{kind}")
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"compare: training {kind} failed (exit code {child.exitcode}): {run_command}")
        rows.append(compare_row(kind, json.loads(report_path.read_text())))
    token = next((r for r in rows if r["model"] == "token"), None)
    for row in rows:
        row["speedup_vs_token"] = token["train_s_per_epoch"] / row["train_s_per_epoch"] if token else None
        row["cpu_speedup_vs_token"] = token["train_cpu_s_per_epoch"] / row["train_cpu_s_per_epoch"] if token else None
    table = {"command": command, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    (out / "compare.json").write_text(json.dumps(json_safe(table), indent=2) + "\n")
    (out / "compare.md").write_text(compare_markdown(rows, command))
    return table


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
            f"{num(r['test_gauc'], '.4f')} | {r['epochs']} ({r['best_epoch']}) | {num(r['train_s_per_epoch'], '.1f')} | "
            f"{num(r['train_cpu_s_per_epoch'], '.1f')} | {num(r['epoch_s'], '.1f')} | {num(r['samples_per_s'], '.1f')} | "
            f"{num(r['peak_memory_mb'], '.0f')} | {num(r['speedup_vs_token'], '.1f')}x / {num(r['cpu_speedup_vs_token'], '.1f')}x |"
        )
    notes = ("Times are medians over epochs; train = the training part of an epoch, CPU = process CPU time of it "
             "(all threads). Peak memory: GPU max allocated, or process peak RSS during an epoch on CPU.")
    return "\n".join(lines) + f"\n\n{notes}\n\nCommand: `{command}`\n"
