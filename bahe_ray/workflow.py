"""Whole workflows built from the stages: the local demo and the daily update.

`run_demo`: encode -> samples -> train BAHE and the ID baseline with Ray Train -> evaluate ->
start Ray Serve on 127.0.0.1 and score a request built from a real test sample -> summary.
`daily_update`: encode a new day's logs (only its new atoms are encoded), rebuild the sample
table over all logs, and warm-start training from the last best checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pyarrow.compute as pc

from bahe_ray.config import Config, with_overrides
from bahe_ray.encode import EncodeSummary, run_encode
from bahe_ray.fs import filesystem, join
from bahe_ray.samples import build_configured_samples, read_split_table
from bahe_ray.store import EmbeddingStore
from bahe_ray.train import evaluate_checkpoint, train_ray

log = logging.getLogger(__name__)
_T = TypeVar("_T")
DEMO_CANDIDATES = 5


@dataclass
class DemoSummary:
    """What `bahe demo` did, for the closing printout."""

    encode: EncodeSummary | None = None
    samples: dict[str, int] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> test metrics + timing
    request: dict[str, Any] = field(default_factory=dict)
    response: dict[str, Any] = field(default_factory=dict)
    offline_score: float | None = None
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds

    def format(self, cfg: Config) -> str:
        lines = ["", "=" * 72, "bahe demo: summary", "=" * 72]
        if self.encode:
            e = self.encode
            lines.append(f"encode: {e.events_read:,} events, {e.unique_atoms:,} unique atoms "
                         f"(dedup {e.dedup_ratio:.1f}x), {e.encoded:,} encoded, store v{e.store_version}")
        lines.append(f"samples: {self.samples}")
        lines.append(f"{'model':<8}{'test AUC':>10}{'logloss':>10}{'GAUC':>8}{'train s/epoch':>15}{'samples/s':>11}")
        for kind, m in self.models.items():
            lines.append(f"{kind:<8}{m['auc']:>10.4f}{m['logloss']:>10.4f}{m['gauc']:>8.4f}"
                         f"{m['train_s_per_epoch']:>15.1f}{m['samples_per_s']:>11.1f}")
        lines.append("token-level baseline: too slow for the demo on 2 CPU cores; `bahe compare` measures it "
                     "(docs/results_cpu.md)")
        if self.response:
            scores = ", ".join(f"{s['item_id']}: {s['score']:.4f}" for s in self.response["scores"])
            lines.append(f"served (POST /v1/score, model {self.response['model_version']}): {scores}")
            lines.append(f"offline score of the first candidate: {self.offline_score:.6f} (served "
                         f"{self.response['scores'][0]['score']:.6f})")
        lines.append("steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.steps.items()))
        lines.append(f"outputs: store {cfg.store.path}, samples {cfg.samples.path}, "
                     f"checkpoints and metrics.json + curves under {cfg.train.output_dir}")
        return "\n".join(lines)


DEMO_STEPS = ("encode", "samples", "train bahe", "train id", "evaluate", "serve")


def timed(summary: DemoSummary, name: str, fn: Callable[[], _T]) -> _T:
    """One demo step between a start line and an end line on the terminal."""
    from bahe_ray.logs import route_ray_logs

    step = f"[{DEMO_STEPS.index(name) + 1}/{len(DEMO_STEPS)}] {name}" if name in DEMO_STEPS else name
    log.info("demo %s ...", step)
    route_ray_logs()  # Ray libraries imported by the previous step keep their notes off the terminal
    start = time.time()
    result = fn()
    summary.steps[name] = time.time() - start
    log.info("demo %s: done in %.0f s", step, summary.steps[name])
    return result


def model_row(report: dict[str, Any]) -> dict[str, Any]:
    return {**report["test"], "train_s_per_epoch": report["summary"]["median_train_seconds"],
            "samples_per_s": report["summary"]["median_samples_per_s"], "run_dir": report["run_dir"]}


def demo_request(cfg: Config, store: EmbeddingStore) -> tuple[dict[str, Any], dict[str, Any]]:
    """A score request from the first test sample with history, and that sample's row.

    The sample's own item comes first, then other test items, as texts from the store.
    """
    table = read_split_table(cfg.samples.path, "test", cfg.storage)
    lengths = pc.list_value_length(table.column(f"hist_{cfg.samples.fields[0]}")).to_numpy()
    row = table.slice(int(lengths.argmax()), 1).to_pylist()[0]
    behaviors = {f: store.texts(row[f"hist_{f}"][-cfg.samples.max_behaviors:]) for f in cfg.samples.fields}
    items = {row["item_atom_id"]: row["item_id"]}  # atom id -> item id, the sample's own item first
    for atom, item in zip(table.column("item_atom_id").to_pylist(), table.column("item_id").to_pylist()):
        if len(items) < DEMO_CANDIDATES:
            items.setdefault(atom, item)
    candidates = [{"item_id": item, "text": text} for item, text in zip(items.values(), store.texts(list(items)))]
    return {"behaviors": behaviors, "candidates": candidates, "request_id": "demo-1"}, row


def score_over_http(cfg: Config, body: dict[str, Any]) -> dict[str, Any]:
    """Start the scorer app on cfg.serve.host:port, POST one request, shut Serve down."""
    from bahe_ray.logs import route_ray_logs
    from bahe_ray.serve import running_scorer

    route_ray_logs()  # `ray.serve` set up its driver logger on import: its notes go to the log file
    with running_scorer(cfg) as url:
        response = httpx.post(f"{url}/v1/score", json=body, timeout=300)
        response.raise_for_status()
        return response.json()


def run_demo(cfg: Config) -> DemoSummary:
    """The embedded local default end to end (see the module docstring)."""
    summary = DemoSummary()
    summary.encode = timed(summary, "encode", lambda: run_encode(cfg))
    summary.samples = timed(summary, "samples", lambda: build_configured_samples(cfg)).counts
    bahe_cfg = with_overrides(cfg, ["train.model_kind=bahe"])
    id_cfg = with_overrides(cfg, ["train.model_kind=id", f"train.output_dir={join(cfg.train.output_dir, 'id')}"])
    summary.models["bahe"] = model_row(timed(summary, "train bahe", lambda: train_ray(bahe_cfg, "bahe demo")))
    summary.models["id"] = model_row(timed(summary, "train id", lambda: train_ray(id_cfg, "bahe demo")))

    best = join(cfg.train.output_dir, "best")
    store = EmbeddingStore.read(cfg.store.path, cfg.storage)
    summary.request, row = demo_request(cfg, store)
    scores = timed(summary, "evaluate", lambda: evaluate_checkpoint(best, "test", cfg.storage)).scores
    match = (pc.equal(scores["user_id"], row["user_id"]).to_numpy(zero_copy_only=False)
             & (scores["ts"].to_numpy() == row["ts"]) & (scores["item_atom_id"].to_numpy() == row["item_atom_id"]))
    summary.offline_score = float(scores["score"].to_numpy()[match][0])
    serve_cfg = with_overrides(cfg, [f"serve.checkpoint={best}"])
    summary.response = timed(summary, "serve", lambda: score_over_http(serve_cfg, summary.request))
    fs, path = filesystem(join(cfg.train.output_dir, "demo_summary.json"), cfg.storage)
    fs.pipe_file(path, json.dumps({"models": summary.models, "samples": summary.samples, "steps": summary.steps,
                                   "encode": summary.encode.to_dict(), "response": summary.response,
                                   "offline_score": summary.offline_score}, indent=2, default=str).encode())
    return summary


def daily_update(cfg: Config, day_events: str, day_impressions: str | None) -> dict[str, Any]:
    """Encode one new day's logs, rebuild samples over all logs, warm-start training from the last best."""
    day_cfg = with_overrides(cfg, ["data.source=files", f"data.events_path={day_events}",
                                   f"data.impressions_path={day_impressions or ''}"])  # empty: none
    encoded = run_encode(day_cfg)
    samples = build_configured_samples(cfg)
    best = join(cfg.train.output_dir, "best")
    fs, inner = filesystem(best, cfg.storage)
    previous = None
    if fs.exists(inner):  # the new run exports its own best: keep the last one as the warm start
        previous = join(cfg.train.output_dir, f"previous-{time.strftime('%Y%m%dT%H%M%S')}")
        fs.copy(inner, filesystem(previous, cfg.storage)[1], recursive=True)
    train_cfg = with_overrides(cfg, [f"train.resume_from={previous}"]) if previous else cfg
    report = train_ray(train_cfg, "bahe daily-update")
    return {"encode": encoded.to_dict(), "samples": samples.counts, "warm_start": train_cfg.train.resume_from,
            "test": report["test"], "best_checkpoint": report["best_checkpoint"]}
