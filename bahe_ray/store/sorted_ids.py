"""Vectorised search in an ascending id array: the one primitive behind lookups, `missing` and the
encode job's anti-join (used by the store, its node layout's readers, shard actors and the device table)."""

from __future__ import annotations

import numpy as np


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
