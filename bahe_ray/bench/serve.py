"""`bench serve`: p50 / p90 / p99 latency, requests/s and scores/s of `POST /v1/score` from concurrent clients
on loopback, warm and cold, with where the time goes, against a running scorer or the profile's scorer
started here.

`run_serve_benchmark` sends a bounded number of requests from concurrent async clients and
stops by itself (request count or time limit, whichever comes first). Each request holds
`behaviors` texts in every field the model reads and `candidates` items, all drawn from the
texts of the store the scorer serves from (GET /v1/model names it), so it measures the steady
state where the encode job has kept the store current. Only loopback URLs are accepted.

Warm: the scorer's state caches hold every body's item and user states (each body is sent once
before the timed requests); cold: the scorer started with both caches off, so every state is
computed (the uncached scorer). The breakdown is the median of the timings each answer carries
(`ScoreTimings`): HTTP (client to Ingress handler and back: proxy, parsing, loopback), the
Ingress -> Scorer hop, preparation, the AtomEncoder, the batch queue and the model call.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

from bahe_ray.config import Config
from bahe_ray.runtime import environment, init_ray, use_serve_throughput_mode
from bahe_ray.store import EmbeddingStore

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_BODIES = 16  # distinct request bodies, cycled


def request_bodies(texts: list[str], fields: list[str], candidates: int, behaviors: int, seed: int = 0) -> list[bytes]:
    """JSON bodies of /v1/score with `behaviors` texts per field and `candidates` items, drawn from `texts`."""
    rng = np.random.default_rng(seed)

    def pick(k: int) -> list[str]:
        return [texts[i] for i in rng.choice(len(texts), k, replace=k > len(texts))]

    return [
        json.dumps(
            {
                "behaviors": {f: pick(behaviors) for f in fields},
                "candidates": [{"item_id": str(j), "text": t} for j, t in enumerate(pick(candidates))],
                "request_id": f"bench-{b}",
            }
        ).encode()
        for b in range(_BODIES)
    ]


MODES = ("warm", "cold")
_BREAKDOWN = ("prepare_ms", "encode_ms", "queue_ms", "model_ms")


def run_serve_benchmark(
    cfg: Config,
    url: str,
    clients: int = 4,
    requests: int = 40,
    candidates: int = 100,
    behaviors: int = 50,
    time_limit_s: float = 300.0,
) -> dict[str, Any]:
    """p50/p90/p99 latency (ms), requests/s and scores/s of `requests` requests from `clients` concurrent
    clients, and the median time of each part (`breakdown_ms`).

    `cfg.storage` reaches the scorer's store (for realistic texts). Failed requests are counted
    by status, not retried; latency percentiles are over successful ones. Every distinct body is
    sent once first (not counted): the scorer's caches, if on, hold their states.
    """
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"{url}: the serve benchmark only targets loopback ({sorted(LOOPBACK)})")
    info = httpx.get(f"{url}/v1/model", timeout=30).raise_for_status().json()
    store = EmbeddingStore.read(info["store_path"], cfg.storage)
    sample = np.random.default_rng(0).choice(store.ids(), min(store.num_atoms, 20_000), replace=False)
    texts = [t for t in store.texts(np.sort(sample)) if t]
    bodies = request_bodies(texts, info["fields"], candidates, behaviors)
    report = asyncio.run(_load(url, bodies, clients, requests, time_limit_s))
    return report | {
        "scores_per_s": round(report["requests_per_s"] * candidates, 1),
        "url": url,
        "clients": clients,
        "candidates": candidates,
        "behaviors_per_field": behaviors,
        "fields": info["fields"],
        "model_version": info["version"],
        "max_behaviors": info["max_behaviors"],
    }


async def _load(url: str, bodies: list[bytes], clients: int, requests: int, time_limit_s: float) -> dict[str, Any]:
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    parts: list[dict[str, float]] = []
    statuses: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=max(time_limit_s, 60.0), limits=limits) as client:
        for first in range(0, len(bodies), clients):  # warm-up: every body once, `clients` at a time
            await asyncio.gather(*(client.post("/v1/score", content=b, headers=headers)
                                   for b in bodies[first : first + clients]))
        start = time.perf_counter()
        deadline = start + time_limit_s

        async def worker() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post("/v1/score", content=body, headers=headers)
                    status = str(response.status_code)
                except httpx.HTTPError as err:
                    status = type(err).__name__
                if status == "200":
                    latencies.append(time.perf_counter() - t0)
                    parts.append(_parts(1000 * latencies[-1], response.json().get("timings")))
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = sorted(1000 * x for x in latencies)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ms, q)), 1) if ms else None

    timed = [p for p in parts if p]
    return {
        "requests": sent,
        "ok": len(latencies),
        "statuses": statuses,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "mean_ms": round(statistics.fmean(ms), 1) if ms else None,
        "breakdown_ms": {k: round(statistics.median(p[k] for p in timed), 2) for k in timed[0]} if timed else {},
        "batch_requests": round(statistics.fmean(p["batch_requests"] for p in timed), 2) if timed else None,
    }


def _parts(client_ms: float, timings: dict[str, Any] | None) -> dict[str, float]:
    """One answer's time by part (ms): HTTP (proxy, parsing, loopback), the Ingress -> Scorer hop, the Scorer's."""
    if not timings or timings.get("ingress_ms") is None:
        return {}
    return {
        "http_ms": client_ms - timings["ingress_ms"],
        "ingress_to_scorer_ms": timings["ingress_ms"] - timings["scorer_ms"],
        **{k: timings[k] for k in _BREAKDOWN},
        "batch_requests": timings["batch_requests"],
    }


def cold_config(cfg: Config) -> Config:
    """The profile with the scorer's state caches off: every request computes every state."""
    cold = cfg.model_copy(deep=True)
    cold.serve.item_cache_size, cold.serve.user_cache_size, cold.serve.warm_items = 0, 0, False
    return cold


def bench_serve(
    cfg: Config, url: str | None, clients: list[int], requests: int, candidates: int, behaviors: int,
    time_limit_s: float, modes: list[str] | None = None, progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One `run_serve_benchmark` per client count (`requests` timed requests per client) and mode: against
    `url` as it runs (mode "as-deployed"), or against the profile's scorer (`serve.checkpoint`) started
    here on Ray, once per mode (`MODES`: warm as configured, cold with the caches off). `progress`
    gets each run as it ends."""

    def runs(target: str, mode: str) -> list[dict[str, Any]]:
        rows = []
        for n in clients:
            row = run_serve_benchmark(cfg, target, n, n * requests, candidates, behaviors, time_limit_s)
            rows.append({"mode": mode, **row})
            if progress is not None:
                progress(rows[-1])
        return rows

    result: dict[str, Any] = {"bench": "serve", "env": environment("cuda" if cfg.serve.use_gpu else "cpu"),
                              "serve": cfg.serve.model_dump(mode="json")}
    if url:
        result["runs"] = runs(url, "as-deployed")
        return result
    use_serve_throughput_mode()
    from bahe_ray.serve import running_scorer

    init_ray(cfg)
    result["runs"] = []
    for mode in modes or list(MODES):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {MODES}")
        with running_scorer(cfg if mode == "warm" else cold_config(cfg)) as started:
            result["runs"] += runs(started, mode)
    return result


def plot_serve(result: dict[str, Any], path: str | Path) -> None:
    """p99 latency against the load served (requests/s), one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r["mode"] for r in result["runs"]):
        rows = [r for r in result["runs"] if r["mode"] == mode and r["p99_ms"] is not None]
        ax.plot([r["requests_per_s"] for r in rows], [r["p99_ms"] for r in rows], "o-", label=mode)
        for r in rows:
            ax.annotate(f"{r['clients']}c", (r["requests_per_s"], r["p99_ms"]), fontsize=8)
    first = result["runs"][0]
    ax.set(xlabel="requests/s served", ylabel="p99 latency (ms)", yscale="log",
           title=f"POST /v1/score, {first['candidates']} candidates x {first['behaviors_per_field']} behaviours")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
