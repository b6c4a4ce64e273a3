"""The id index that every repeated lookup goes through equals a plain binary search, on hashed ids and skewed ones."""

from __future__ import annotations

import numpy as np
import pytest

from bahe_ray.store.sorted_ids import IdIndex, find_sorted, take_rows

I64 = np.iinfo(np.int64)


def _hashed(n: int, seed: int) -> np.ndarray:
    return np.unique(np.random.default_rng(seed).integers(I64.min, I64.max, n, dtype=np.int64))


SKEWED = {
    "hashed": _hashed(50_000, 0),
    "sequential": np.arange(1, 20_001, dtype=np.int64),
    "clustered": np.concatenate([np.arange(10_000, dtype=np.int64), [I64.max - 5, I64.max]]),
    "extremes": np.array([I64.min, -1, 0, I64.max], np.int64),
    "one": np.array([42], np.int64),
    "empty": np.empty(0, np.int64),
}


@pytest.mark.parametrize("name", SKEWED)
def test_index_finds_what_binary_search_finds(name: str) -> None:
    ids = SKEWED[name]
    rng = np.random.default_rng(1)
    present = ids[rng.integers(0, ids.size, 3_000)] if ids.size else np.empty(0, np.int64)
    query = np.concatenate([present, rng.integers(I64.min, I64.max, 3_000, dtype=np.int64), present[:50] + 1,
                            [I64.min, I64.max, 0, -1]])
    pos, found = IdIndex.build(ids).find(query)
    want_pos, want_found = find_sorted(ids, query)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(pos[found], want_pos[want_found])
    assert found[: present.size].all()
    if ids.size:
        np.testing.assert_array_equal(ids[pos[found]], query[found])


def test_index_of_hashed_ids_is_small_and_shallow() -> None:
    index = IdIndex.build(SKEWED["hashed"])
    assert index.starts.dtype == np.int32 and index.starts.nbytes <= 2.1 * index.ids.size
    assert index.steps <= 5  # a few halvings, not the 16 of a binary search over 50,000 ids


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_take_rows_widens_and_zeroes_absent_ids(dtype: str) -> None:
    ids = SKEWED["hashed"][:1000]
    vectors = np.random.default_rng(2).standard_normal((ids.size, 8)).astype(np.float16)
    query = np.array([ids[5], 7, ids[999], ids[5]], np.int64)
    rows, found = take_rows(IdIndex.build(ids), vectors, query, np.dtype(dtype))
    assert rows.dtype == np.dtype(dtype) and found.tolist() == [True, 7 in ids, True, True]
    np.testing.assert_array_equal(rows[[0, 2, 3]], vectors[[5, 999, 5]].astype(dtype))
    assert not rows[1].any()
