"""One model call for a batch of prepared requests: cached item and user states, the misses through the
upper layers, then the CTR head.

A request is one user's histories (the most recent N atom ids per field, oldest first) and its
candidates' item atoms, as offline evaluation builds a sample row per candidate. The scores are
those of `BaheCTR.forward` on those rows (the same `item_states`, `user_states` and head; padding
never changes a state), so a served score equals the offline one within float noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from bahe_ray.features import MissingVectorsError, VectorSource
from bahe_ray.models.ctr import BaheCTR
from bahe_ray.serve.cache import StateCaches
from bahe_ray.serve.schema import ModelInfo
from bahe_ray.store import EmbeddingStore
from bahe_ray.store.sharded import ShardedStore
from bahe_ray.train.step import autocast

UserKey = tuple[int, tuple[int, ...]]  # (field index, the history's atom ids)


class StoreAndEncoded:
    """A features.VectorSource: the store, then the vectors encoded online for this batch."""

    def __init__(self, store: VectorSource, ids: np.ndarray, vectors: np.ndarray) -> None:
        order = np.argsort(ids)
        self.store, self.ids, self.vectors = store, ids[order], vectors[order]

    def lookup_with_mask(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors, found = self.store.lookup_with_mask(ids)
        if self.ids.size:
            pos = np.minimum(np.searchsorted(self.ids, ids), self.ids.size - 1)
            fresh = ~found & (self.ids[pos] == ids)
            vectors[fresh] = self.vectors[pos[fresh]]
            found = found | fresh
        return vectors, found


@dataclass(frozen=True)
class Loaded:
    """One checkpoint with the store it reads and its state caches; a rollout swaps the whole of it at once."""

    model: BaheCTR
    store: EmbeddingStore  # the manifest (version, size); the vectors too unless sharded
    info: ModelInfo
    device: str
    dtype: torch.dtype | None  # autocast dtype (None: fp32)
    caches: StateCaches
    sharded: ShardedStore | None = None  # vectors looked up from shard actors (store.reader.shards, shard_above_gb)

    @property
    def vectors(self) -> VectorSource:
        """Where the scorer's vectors come from: the shard actors, else the store's node layout."""
        return self.sharded or self.store


@dataclass
class Prepared:
    """One request on one checkpoint: histories per field (index in info.fields), candidate item atoms,
    vectors of its atoms the store lacks, and where its time went (ms)."""

    loaded: Loaded
    histories: list[tuple[int, ...]]
    items: list[int]
    encoded_ids: np.ndarray
    encoded: np.ndarray  # (len(encoded_ids), dim)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Scored:
    """One request's click probabilities, and what the batch it ran in did."""

    scores: np.ndarray
    model_ms: float
    batch_requests: int
    item_states_cached: int
    user_states_cached: int
    store_version: int


def score_batch(requests: list[Prepared]) -> list[Scored]:
    """Click probabilities of each request's candidates; one pass per checkpoint among the requests
    (one unless a rollout is under way)."""
    out: list[Scored | None] = [None] * len(requests)
    for loaded in {id(r.loaded): r.loaded for r in requests}.values():
        mine = [i for i, r in enumerate(requests) if r.loaded is loaded]
        for i, scored in zip(mine, _score_one_checkpoint(loaded, [requests[i] for i in mine])):
            out[i] = scored
    return [s for s in out if s is not None]


def _score_one_checkpoint(loaded: Loaded, requests: list[Prepared]) -> list[Scored]:
    start = time.perf_counter()
    version = loaded.store.version
    loaded.caches.for_store(version)
    source = StoreAndEncoded(
        loaded.vectors, np.concatenate([r.encoded_ids for r in requests]), np.concatenate([r.encoded for r in requests])
    )
    item_keys = list(dict.fromkeys(a for r in requests for a in r.items))
    user_keys: list[UserKey] = list(dict.fromkeys((f, h) for r in requests for f, h in enumerate(r.histories)))
    with torch.inference_mode(), autocast(loaded.device, loaded.dtype):
        items, item_hit = loaded.caches.items.states(item_keys, lambda keys: item_states(loaded, source, keys))
        users, user_hit = loaded.caches.users.states(user_keys, lambda keys: user_states(loaded, source, keys))
        item_pos = {key: i for i, key in enumerate(item_keys)}
        user_pos = {key: i for i, key in enumerate(user_keys)}
        item_index = [item_pos[a] for r in requests for a in r.items]
        user_index = [[user_pos[(f, h)] for f, h in enumerate(r.histories)] for r in requests for _ in r.items]
        rows = [len(r.items) for r in requests]
        users_of_rows = users[_index(user_index, loaded.device)]
        logits = loaded.model.head(users_of_rows, items[_index(item_index, loaded.device)])
        probs = torch.sigmoid(logits.float()).cpu().numpy()
    model_ms = 1000 * (time.perf_counter() - start)
    bounds = np.cumsum([0, *rows])
    hit_items = {key for key, hit in zip(item_keys, item_hit.tolist()) if hit}
    hit_users = {key for key, hit in zip(user_keys, user_hit.tolist()) if hit}
    return [
        Scored(
            probs[bounds[j] : bounds[j + 1]], model_ms, len(requests), sum(a in hit_items for a in r.items),
            sum((f, h) in hit_users for f, h in enumerate(r.histories)), version,
        )
        for j, r in enumerate(requests)
    ]


def item_states(loaded: Loaded, source: VectorSource, atoms: list[int]) -> Tensor:
    """`BaheCTR.item_states` of item atoms."""
    vectors = _vectors(source, np.array(atoms, np.int64), "items")
    return loaded.model.item_states(torch.from_numpy(vectors).to(loaded.device))


def user_states(loaded: Loaded, source: VectorSource, keys: list[UserKey]) -> Tensor:
    """`BaheCTR.user_states` of (field, history) keys, as one batch padded to the longest history."""
    width = max(1, *(len(h) for _, h in keys))
    ids = np.zeros((len(keys), width), np.int64)
    mask = np.zeros((len(keys), width), bool)
    for row, (_, history) in enumerate(keys):
        ids[row, : len(history)] = history
        mask[row, : len(history)] = True
    atoms, inverse = np.unique(ids[mask], return_inverse=True)
    hist = np.zeros((len(keys), width, loaded.info.dim), np.float32)
    hist[mask] = _vectors(source, atoms, "behaviours")[inverse]
    fields = _index([f for f, _ in keys], loaded.device)
    return loaded.model.user_states(
        torch.from_numpy(hist).to(loaded.device), torch.from_numpy(mask).to(loaded.device), fields, not mask.all()
    )


def warm_item_states(loaded: Loaded, batch: int = 4096) -> int:
    """Fill the item cache with the states of the store's atoms (up to its capacity); returns how many."""
    caches = loaded.caches
    caches.for_store(loaded.store.version)
    atoms = loaded.store.ids()[: caches.items.capacity].tolist()
    with torch.inference_mode(), autocast(loaded.device, loaded.dtype):
        for start in range(0, len(atoms), batch):
            caches.items.states(atoms[start : start + batch], lambda keys: item_states(loaded, loaded.vectors, keys))
    return len(atoms)


def _vectors(source: VectorSource, atoms: np.ndarray, what: str) -> np.ndarray:
    vectors, found = source.lookup_with_mask(atoms)
    if not found.all():
        raise MissingVectorsError(f"{int((~found).sum())} {what} have no vector (neither stored nor encoded)")
    return vectors


def _index(values: list[int] | list[list[int]], device: str) -> Tensor:
    return torch.as_tensor(values, dtype=torch.long).to(device, non_blocking=True)
