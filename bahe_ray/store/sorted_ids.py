"""Vectorised search in an ascending id array: the primitives behind lookups, `missing` and the encode
job's anti-join (used by the store, its node layout's readers, shard actors and the device table).

`find_sorted` serves one-off searches. `IdIndex` serves readers that search the same ids batch after
batch: a bucket directory over the id range narrows each search to a few ids, so a lookup touches
about two cache lines per id instead of one per level of a binary search over the whole array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IDS_PER_BUCKET = 2  # the directory's size: 4 bytes (int32) per 2 atoms
CHUNK_IDS = 1 << 20  # ids bucketed at once while building the directory


def find_sorted(sorted_ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `query` (1-D) in the ascending `sorted_ids`, and which are really there.

    The query is sorted first: searchsorted over sorted keys is cache friendly, which makes
    1M random lookups about twice as fast even after paying for the argsort.
    """
    if sorted_ids.size == 0:
        return np.zeros(query.size, np.intp), np.zeros(query.size, bool)
    order = np.argsort(query)
    pos = np.empty(query.size, np.intp)
    pos[order] = np.searchsorted(sorted_ids, query[order])
    np.minimum(pos, sorted_ids.size - 1, out=pos)
    return pos, sorted_ids[pos] == query


def isin_sorted(query: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Vectorised membership of `query` (1-D) in an ascending array."""
    return find_sorted(sorted_ids, query)[1]


@dataclass(frozen=True)
class IdIndex:
    """Ascending ids and a directory: bucket b = floor((id - ids[0]) * scale) holds ids[starts[b]:starts[b+1]].

    Atom ids are 64-bit hashes, spread evenly over their range, so buckets hold about
    IDS_PER_BUCKET ids each and a search within one takes `steps` (a few) vectorised halvings.
    Skewed ids stay correct (a crowded bucket only adds halvings, up to a plain binary search).
    """

    ids: np.ndarray  # int64, ascending
    starts: np.ndarray  # (buckets + 1,) int32 or int64
    lowest: float
    scale: float
    steps: int

    @classmethod
    def build(cls, ids: np.ndarray) -> IdIndex:
        buckets = max(1, ids.size // IDS_PER_BUCKET)
        lowest = float(ids[0]) if ids.size else 0.0
        span = float(ids[-1]) - lowest if ids.size else 0.0
        index = cls(ids, np.empty(0, np.int64), lowest, buckets / span if span > 0 else 0.0, 0)
        counts = np.zeros(buckets, np.int64)
        for start in range(0, ids.size, CHUNK_IDS):
            counts += np.bincount(index._bucket(ids[start : start + CHUNK_IDS], buckets), minlength=buckets)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32 if ids.size < 2**31 else np.int64)
        steps = int(np.ceil(np.log2(counts.max() + 1))) if ids.size else 0
        return cls(ids, starts, lowest, index.scale, steps)

    def _bucket(self, query: np.ndarray, buckets: int) -> np.ndarray:
        """Monotone in the id (float rounding never reorders), so every id's position lies in its bucket."""
        bucket = ((query.astype(np.float64) - self.lowest) * self.scale).astype(np.int64)
        return np.clip(bucket, 0, buckets - 1, out=bucket)

    def find(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As `find_sorted(self.ids, query)`: positions of `query` (1-D) and which are really there."""
        if self.ids.size == 0:
            return np.zeros(query.size, np.intp), np.zeros(query.size, bool)
        bucket = self._bucket(query, self.starts.size - 1)
        low, high = self.starts[bucket].astype(np.intp), self.starts[bucket + 1].astype(np.intp)
        last = self.ids.size - 1
        for _ in range(self.steps):  # lower bound within [low, high), every query at once
            middle = (low + high) >> 1
            right = (low < high) & (self.ids[np.minimum(middle, last)] < query)
            low = np.where(right, middle + 1, low)
            high = np.where(right, high, middle)
        np.minimum(low, last, out=low)
        return low, self.ids[low] == query


def take_rows(index: IdIndex, vectors: np.ndarray, query: np.ndarray,
              dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(rows of `vectors` for `query` (1-D) as `dtype`, zero where absent; found mask): one vectorised gather.

    Widening (float16 -> float32) goes through torch's vectorised conversion into a numpy-allocated
    output: numpy converts float16 element by element, and its large allocations are huge-page backed.
    """
    if index.ids.size == 0:
        return np.zeros((query.size, vectors.shape[1]), dtype), np.zeros(query.size, bool)
    pos, found = index.find(query)
    out = np.take(vectors, pos, axis=0)
    if out.dtype != dtype:
        wide = np.empty(out.shape, dtype)
        torch.from_numpy(wide).copy_(torch.from_numpy(out))
        out = wide
    if not found.all():
        out[~found] = 0
    return out, found
