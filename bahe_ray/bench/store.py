"""`bench store`: one big store read at once by 2 Ray Train CPU workers and 1 Serve replica on one node.

The store is written through its public API (`write_part`, `commit`) with random float16 vectors,
one part at a time. Every reader opens it as training and the scorer do (`EmbeddingStore.read` with
`store.reader`), so all of them look vectors up in the node's one memory-mapped layout:

  1. each reader times `lookup_with_mask` on random committed ids for `seconds`, half as float32 (the
     default) and half in the store's float16 (`dtype=None`) (training batches of 256 x 100 ids in the
     Ray Train workers, serving batches of 100 x 50 in the Serve replica);
  2. then looks every atom up once (every page of the vectors resident in its mapping) and waits;
  3. the driver reads the node's memory while all three hold their mappings: the Pss of the vector
     mappings summed over the readers (the memory the vectors hold on the node, shared pages counted
     once) against their Rss (what private copies would hold), and the node's used memory;
  4. the driver commits a new version of a few atoms; each reader looks them up until found: the
     time to pick the version up without a restart (refresh_s, then one process builds the new
     layout while the others wait for it).

Readers report through JSON files in a shared folder (one node), so the measurement needs no Ray
plumbing beyond starting them.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from tqdm import tqdm

from bahe_ray.config import Config, StoreReaderConfig
from bahe_ray.encoders.base import EncoderFingerprint
from bahe_ray.store import EmbeddingStore
from bahe_ray.store.node_cache import mapped_vectors_kb

_SPREAD = np.uint64(0x9E3779B97F4A7C15)  # odd: i -> i * _SPREAD mod 2^64 is a bijection
TRAIN_BATCH = (256, 100)
SERVE_BATCH = (100, 50)


def atom_ids(index: np.ndarray) -> np.ndarray:
    """The bench store's id of atom number `index`: distinct, spread over int64 like hashed atom ids."""
    return (index.astype(np.uint64) * _SPREAD >> np.uint64(1)).astype(np.int64)


def build_random_store(path: str, atoms: int, dim: int, part_rows: int, seed: int = 0) -> EmbeddingStore:
    """A float16 store of `atoms` random vectors at `path`, written one part at a time, one commit."""
    fingerprint = EncoderFingerprint(
        model_name="bench-random", weights_sha256="0" * 64, k=0, pooling="mean", dtype="float16", max_tokens=0
    )
    store = EmbeddingStore.open(path, fingerprint, dim, dtype="float16")
    rng = np.random.default_rng(seed)
    parts = []
    with tqdm(total=atoms, desc="bench store: writing parts", unit="atoms") as bar:
        for start in range(0, atoms, part_rows):
            index = np.arange(start, min(atoms, start + part_rows))
            vectors = rng.standard_normal((index.size, dim), dtype=np.float32).astype(np.float16)
            parts.append(store.write_part(atom_ids(index), vectors))
            bar.update(index.size)
    store.commit(parts)
    return store


def read_and_hold(role: str, path: str, reader: dict[str, Any], batch: tuple[int, int], atoms: int,
                  seconds: float, sync: str, timeout_s: float) -> dict[str, Any]:
    """One reader process: timed lookups, every atom once, wait for the driver, pick up its new version."""
    sync_dir = Path(sync)
    store = EmbeddingStore.read(path, reader=StoreReaderConfig.model_validate(reader))
    started = time.perf_counter()
    store.lookup_with_mask(np.zeros(0, np.int64))
    map_s = time.perf_counter() - started
    rng = np.random.default_rng(zlib.crc32(role.encode()))
    queries = [atom_ids(rng.integers(0, atoms, size=batch)) for _ in range(8)]
    rates = {}
    for dtype in ("float32", None):  # the API's default, then the store's float16 (no widening)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 2:
            _, found = store.lookup_with_mask(queries[calls % len(queries)], dtype)
            if not found.all():
                raise RuntimeError(f"{role}: committed ids not found")
            calls += 1
        elapsed = time.perf_counter() - started
        rates[dtype or store.dtype] = {"lookups": calls, "seconds": round(elapsed, 2),
                                       "ids_per_s": round(calls * int(np.prod(batch)) / elapsed)}
    for start in range(0, atoms, 100_000):  # every page of the vectors resident in this mapping
        store.lookup(atom_ids(np.arange(start, min(atoms, start + 100_000))))
    (sync_dir / f"ready-{role}").write_text(str(os.getpid()))
    deadline = time.monotonic() + timeout_s
    while not (sync_dir / "committed.json").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{role}: no new version from the driver after {timeout_s} s")
        time.sleep(0.2)
    commit = json.loads((sync_dir / "committed.json").read_text())
    new_ids = np.array(commit["ids"], np.int64)
    while not store.lookup_with_mask(new_ids)[1].all():
        time.sleep(0.05)
    result = {
        "role": role, "pid": os.getpid(), "batch": list(batch), "ids_per_batch": int(np.prod(batch)),
        "ids_per_s": rates["float32"]["ids_per_s"], "ids_per_s_float16": rates["float16"]["ids_per_s"],
        "timed": rates, "first_map_s": round(map_s, 2),
        "pickup_s": round(time.time() - commit["committed_at"], 2), "version": store.version,
    }
    (sync_dir / f"result-{role}.json").write_text(json.dumps(result))
    return result


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: the store reader of a training worker (see `read_and_hold`)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    read_and_hold(f"train-{rank}", **config)


def bench_store(cfg: Config, atoms: int, dim: int, part_rows: int, seconds: float, workdir: str,
                refresh_s: float = 1.0, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Build the store under `workdir`, read it from 2 Ray Train workers and 1 Serve replica; the result."""
    import ray
    from ray import serve
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bahe_ray.runtime import environment, init_ray

    root = Path(workdir)
    sync = root / "sync"
    sync.mkdir(parents=True)
    started = time.perf_counter()
    store = build_random_store(str(root / "store"), atoms, dim, part_rows)
    build_s = time.perf_counter() - started
    info = store.info()
    used_before = psutil.virtual_memory().used
    reader = StoreReaderConfig(cache_dir=str(root / "cache"), refresh_s=refresh_s).model_dump()
    common = {"path": store.path, "reader": reader, "atoms": atoms, "seconds": seconds, "sync": str(sync),
              "timeout_s": timeout_s}

    init_ray(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    probe = serve.deployment(ray_actor_options={"num_cpus": 0})(StoreProbe)
    handle = serve.run(probe.bind(), name="bench-store", route_prefix=None)
    serving = handle.read.remote(common | {"role": "serve", "batch": SERVE_BATCH})
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=common | {"batch": TRAIN_BATCH},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="bench-store", storage_path=str(root / "ray_results")),
    )
    roles = ["train-0", "train-1", "serve"]
    node: dict[str, Any] = {}
    failures: list[BaseException] = []

    def measure() -> None:
        try:
            node.update(_measure_then_update(store, sync, roles, atoms, dim, timeout_s))
        except BaseException as e:  # raised by the driver below, once the readers gave up waiting
            failures.append(e)

    measuring = threading.Thread(target=measure, daemon=True)
    measuring.start()
    trainer.fit()  # the main thread: returns when both workers saw the new version
    serving.result(timeout_s=timeout_s)
    measuring.join(timeout_s)
    serve.shutdown()
    if failures:
        raise RuntimeError("bench store: the driver's measurement failed") from failures[0]
    readers = [json.loads((sync / f"result-{r}.json").read_text()) | {"mapped_kb": node["mapped_kb"][r]} for r in roles]
    vector_bytes = atoms * dim * 2
    pss = sum(m["Pss"] for m in node["mapped_kb"].values()) * 1024
    return {
        "bench": "store", "atoms": atoms, "dim": dim, "dtype": "float16", "part_rows": part_rows,
        "store_bytes": info.bytes, "vector_bytes": vector_bytes, "parts": info.parts, "build_s": round(build_s, 1),
        "readers": readers,
        "node": {
            "vectors_pss_bytes": pss, "vectors_rss_bytes": sum(m["Rss"] for m in node["mapped_kb"].values()) * 1024,
            "pss_over_vector_bytes": round(pss / vector_bytes, 3),
            "used_bytes_before_readers": used_before, "used_bytes_with_readers": node["used_bytes"],
            "total_bytes": psutil.virtual_memory().total, "load_avg": list(os.getloadavg()),
        },
        "refresh_s": refresh_s, "ray": ray.__version__, "env": environment("cpu"),
    }


def _measure_then_update(store: EmbeddingStore, sync: Path, roles: list[str], atoms: int, dim: int,
                         timeout_s: float) -> dict[str, Any]:
    """Once every reader holds its mapping: their Rss/Pss and the node's used memory; then commit a version."""
    deadline = time.monotonic() + timeout_s
    while not all((sync / f"ready-{r}").exists() for r in roles):
        if time.monotonic() > deadline:
            raise TimeoutError(f"readers not ready after {timeout_s} s: {sorted(p.name for p in sync.iterdir())}")
        time.sleep(0.5)
    mapped = {r: mapped_vectors_kb(int((sync / f"ready-{r}").read_text())) for r in roles}
    used = psutil.virtual_memory().used
    new = atom_ids(np.arange(atoms, atoms + 1000))
    store.add(new, np.ones((new.size, dim), np.float16))
    store.commit()
    (sync / "committed.json.tmp").write_text(json.dumps({"ids": new.tolist(), "committed_at": time.time()}))
    os.replace(sync / "committed.json.tmp", sync / "committed.json")
    return {"mapped_kb": mapped, "used_bytes": used}


class StoreProbe:
    """The Serve replica's store reader (`serve.deployment` wraps it in `bench_store`)."""

    def read(self, config: dict[str, Any]) -> dict[str, Any]:
        return read_and_hold(**config)


def plot_store(result: dict[str, Any], path: Path) -> None:
    """Bars: lookup ids/s per reader, and the node's vector memory (summed Pss, Rss) against the store."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    readers = result["readers"]
    x = np.arange(len(readers))
    speed.bar(x - 0.2, [r["ids_per_s"] / 1e6 for r in readers], 0.4, label="as float32 (default)")
    speed.bar(x + 0.2, [r["ids_per_s_float16"] / 1e6 for r in readers], 0.4, label="as float16 (dtype=None)")
    speed.set_xticks(x, [f"{r['role']}\n{r['batch'][0]}x{r['batch'][1]}" for r in readers])
    speed.legend()
    speed.set_ylabel("lookup, million ids/s per process")
    speed.set_title(f"{result['atoms']:,} atoms x {result['dim']} fp16, 3 readers at once")
    node, gb = result["node"], 1 << 30
    memory.bar(["vectors (fp16)", "sum of Pss", "sum of Rss"],
               [result["vector_bytes"] / gb, node["vectors_pss_bytes"] / gb, node["vectors_rss_bytes"] / gb],
               color=["tab:gray", "tab:green", "tab:red"])
    memory.set_ylabel("GiB")
    memory.set_title("node memory held by the vectors (3 readers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
