"""`bench serve`: p50 / p99 latency and requests/s of `POST /v1/score` from concurrent clients on
loopback, against a running scorer or the profile's scorer started here.

`run_serve_benchmark` sends a bounded number of requests from concurrent async clients and
stops by itself (request count or time limit, whichever comes first). Each request holds
`behaviors` texts in every field the model reads and `candidates` items, all drawn from the
texts of the store the scorer serves from (GET /v1/model names it), so it measures the steady
state where the encode job has kept the store current. Only loopback URLs are accepted.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

from bahe_ray.config import Config
from bahe_ray.runtime import environment, init_ray
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


def run_serve_benchmark(
    cfg: Config,
    url: str,
    clients: int = 4,
    requests: int = 40,
    candidates: int = 100,
    behaviors: int = 50,
    time_limit_s: float = 300.0,
) -> dict[str, Any]:
    """p50/p90/p99 latency (ms) and requests/s of `requests` requests from `clients` concurrent clients.

    `cfg.storage` reaches the scorer's store (for realistic texts). Failed requests are counted
    by status, not retried; latency percentiles are over successful ones. One warm-up request
    per client is not counted.
    """
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"{url}: the serve benchmark only targets loopback ({sorted(LOOPBACK)})")
    info = httpx.get(f"{url}/v1/model", timeout=30).raise_for_status().json()
    store = EmbeddingStore.read(info["store_path"], cfg.storage)
    sample = np.random.default_rng(0).choice(store.ids(), min(store.num_atoms, 20_000), replace=False)
    texts = [t for t in store.texts(np.sort(sample)) if t]
    bodies = request_bodies(texts, info["fields"], candidates, behaviors)
    return asyncio.run(_load(url, bodies, clients, requests, time_limit_s)) | {
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
    statuses: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=max(time_limit_s, 60.0), limits=limits) as client:
        await asyncio.gather(*(client.post("/v1/score", content=bodies[i % len(bodies)], headers=headers)
                               for i in range(clients)))
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
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = sorted(1000 * x for x in latencies)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ms, q)), 1) if ms else None

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
    }


def bench_serve(
    cfg: Config, url: str | None, clients: list[int], requests: int, candidates: int, behaviors: int,
    time_limit_s: float, progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One `run_serve_benchmark` per client count (`requests` timed requests per client) against `url`,
    or against the profile's scorer (`serve.checkpoint`) started here on Ray when `url` is None.
    `progress` gets each run as it ends."""

    def runs(target: str) -> list[dict[str, Any]]:
        rows = []
        for n in clients:
            rows.append(run_serve_benchmark(cfg, target, n, n * requests, candidates, behaviors, time_limit_s))
            if progress is not None:
                progress(rows[-1])
        return rows

    result: dict[str, Any] = {"bench": "serve", "env": environment("cpu"), "serve": cfg.serve.model_dump(mode="json")}
    if url:
        result["runs"] = runs(url)
    else:
        from bahe_ray.serve import running_scorer

        init_ray(cfg)
        with running_scorer(cfg) as started:
            result["runs"] = runs(started)
    return result
