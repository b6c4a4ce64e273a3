"""A store larger than one node's memory: hash-partitioned shards held by Ray actors.

Shard `i` of `n` holds the committed rows whose id hashes to `i` (`shard_of`), sorted, in the
actor's memory, so `n` actors spread over the cluster hold the store once between them. A lookup
is batched end to end: the caller splits one batch of ids by shard (vectorised), sends one call
per shard, and puts the answers back in the batch's order; each shard answers with one
`searchsorted` over its ids. Vectors travel in the store's dtype and are widened to float32 by the
caller, as `EmbeddingStore.lookup_with_mask` returns them.

A shard loads one part at a time (memory: its shard plus one part, twice its shard while it
sorts), and `refresh()` adds only the parts committed since (a compacted version reloads).
`shard_count` says how many shards a reader uses: `store.reader.shards`, or enough to keep each
under `store.reader.shard_above_gb` once the store passes it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any

import numpy as np

from bahe_ray.config import StorageConfig, StoreReaderConfig
from bahe_ray.fs import filesystem
from bahe_ray.store.parts import load_part, part_vectors
from bahe_ray.store.sorted_ids import IdIndex, take_rows
from bahe_ray.store.store import EmbeddingStore

log = logging.getLogger(__name__)

_SPREAD = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: consecutive ids spread over the shards
# Shard actor name -> this process's handle. Ray ends an actor once the handles of the process that started it
# are gone (handles found by name do not count), so the starting process keeps them: a reader built again (an
# evaluation, a Serve rollout) does not end the shards that other readers use.
_HANDLES: dict[str, Any] = {}


def shard_count(store: EmbeddingStore, reader: StoreReaderConfig) -> int:
    """How many shard actors read `store` (0: none, the node layout): `reader.shards` when set, else, once the
    committed vectors take more than `reader.shard_above_gb` GB, ceil(their GB / shard_above_gb)."""
    if reader.shards or not reader.shard_above_gb:
        return reader.shards
    gb = store.num_atoms * store.dim * np.dtype(store.dtype).itemsize / 1e9
    return math.ceil(gb / reader.shard_above_gb) if gb > reader.shard_above_gb else 0


def open_sharded(store: EmbeddingStore, reader: StoreReaderConfig) -> ShardedStore | None:
    """The shard actors a reader of `store` looks vectors up in, or None (the node layout): see `shard_count`."""
    shards = shard_count(store, reader)
    return ShardedStore(store, shards) if shards else None


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """Which of `shards` shards holds each id (1-D int64)."""
    return ((ids.astype(np.int64).view(np.uint64) * _SPREAD) >> np.uint64(32)) % np.uint64(shards)


class StoreShard:
    """The rows of shard `index` of `shards` of the store's committed version (a Ray actor's state)."""

    def __init__(self, path: str, storage: StorageConfig | None, index: int, shards: int) -> None:
        self.store = EmbeddingStore.read(path, storage)  # the manifest only: no layout is mapped
        self.fs, self.root = filesystem(path, storage)
        self.index, self.shards = index, shards
        self.held: set[str] = set()
        self.id_index = IdIndex.build(np.empty(0, np.int64))
        self.vectors = np.empty((0, self.store.dim), self.store.dtype)
        self._load()

    def refresh(self) -> int:
        """Move to the newest committed version; returns it."""
        self.store.refresh()
        self._load()
        return self.store.version

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors in the store's dtype with zero rows where absent, found mask) of ids of this shard."""
        return take_rows(self.id_index, self.vectors, ids, self.vectors.dtype)

    def rows(self) -> int:
        return int(self.id_index.ids.size)

    def _load(self) -> None:
        parts = self.store.parts
        if not self.held <= {p.name for p in parts}:  # a compacted version: same rows, other parts
            self.held, self.id_index, self.vectors = set(), IdIndex.build(self.id_index.ids[:0]), self.vectors[:0]
        new = [p for p in parts if p.name not in self.held]
        if not new:  # the same version (a reader's periodic refresh): nothing to sort again
            return
        ids, vectors = [self.id_index.ids], [self.vectors]
        for part in new:
            table = load_part(self.fs, self.root, part, self.store.dim, self.store.dtype)
            part_ids = table.column("atom_id").to_numpy()
            mine = shard_of(part_ids, self.shards) == self.index
            ids.append(part_ids[mine])
            vectors.append(part_vectors(table, self.store.dim)[mine])
            self.held.add(part.name)
        merged = np.concatenate(ids)
        order = np.argsort(merged, kind="stable")
        self.id_index, self.vectors = IdIndex.build(merged[order]), np.concatenate(vectors)[order]


class ShardedStore:
    """`lookup_with_mask` (a features.VectorSource) over `shards` StoreShard actors on the Ray cluster.

    `store`, a reader of the same store, stays the manifest (version, fingerprint, size; it maps no
    layout). Every `store.reader.refresh_s` (0: never) a lookup first moves the shards, then `store`,
    to the newest committed version, as the node layout's lookups do; in that order, so `store.version`
    (what the Serve scorer's state caches are keyed by) does not run ahead of the shards' vectors.
    """

    def __init__(self, store: EmbeddingStore, shards: int = 2, actor_options: dict[str, Any] | None = None) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.store, self.dim, self.shards = store, store.dim, shards
        self.actor_options = actor_options or {"num_cpus": 0}
        self.actors: list[Any] = []
        self._start()
        log.info("store %s v%d: vectors looked up in %d shard actors", store.path, store.version, shards)

    def _start(self) -> None:
        """Bind the shard actors, starting those not running: named, so the training workers of one job or the
        Serve replicas of one app share them. They live as long as the process that started them."""
        import ray

        key = hashlib.sha256(self.store.path.encode()).hexdigest()[:12]
        names = [f"bahe-store-{key}-shard-{i}-of-{self.shards}" for i in range(self.shards)]
        actor = ray.remote(StoreShard)
        for i, name in enumerate(names):
            if name not in _HANDLES or not _alive(_HANDLES[name]):
                _HANDLES[name] = actor.options(name=name, get_if_exists=True, **self.actor_options).remote(
                    self.store.path, self.store.storage, i, self.shards)
        self.actors = [_HANDLES[name] for name in names]
        self.refresh()  # shards an earlier reader started may hold an older version

    def refresh(self) -> int:
        """Every shard moves to the newest version (each reads the head itself), then `store`; its version."""
        import ray

        ray.get([a.refresh.remote() for a in self.actors])
        self._checked_at = time.monotonic()
        return self.store.refresh()

    def rows(self) -> list[int]:
        import ray

        return ray.get([a.rows.remote() for a in self.actors])

    def lookup_with_mask(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 vectors, zero rows for uncommitted ids, found mask) shaped like ids: one call per shard."""
        import ray

        refresh_s = self.store.reader.refresh_s
        if refresh_s and time.monotonic() - self._checked_at >= refresh_s:
            self.refresh()
        query = np.asarray(ids, dtype=np.int64)
        flat = query.reshape(-1)
        owner = shard_of(flat, len(self.actors)).astype(np.intp)
        order = np.argsort(owner, kind="stable")
        bounds = np.cumsum(np.bincount(owner, minlength=len(self.actors)))[:-1]
        pieces = np.split(flat[order], bounds)
        try:
            answers = ray.get([a.lookup.remote(p) for a, p in zip(self.actors, pieces)])
        except ray.exceptions.RayActorError:  # their starter is gone (a replaced replica or worker): start them again
            log.warning("store %s: a shard actor died; starting the shards again", self.store.path)
            self._start()
            answers = ray.get([a.lookup.remote(p) for a, p in zip(self.actors, pieces)])
        vectors = np.empty((flat.size, self.dim), np.float32)
        found = np.empty(flat.size, bool)
        vectors[order] = np.concatenate([v for v, _ in answers])
        found[order] = np.concatenate([f for _, f in answers])
        return vectors.reshape(*query.shape, self.dim), found.reshape(query.shape)


def _alive(actor: Any) -> bool:
    import ray

    try:
        ray.get(actor.rows.remote())
        return True
    except ray.exceptions.RayActorError:
        return False
