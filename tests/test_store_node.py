"""The store at node scale (issue 18): the node-shared lookup layout, version pickup, compaction."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bahe_ray import cli
from bahe_ray.config import StoreReaderConfig
from bahe_ray.store import CommitConflictError, EmbeddingStore, StoreCorruptError, node_cache
from bahe_ray.store import store as store_module
from bahe_ray.store.compact import plan_compaction
from bahe_ray.store.manifest import PartInfo
from bahe_ray.store.sharded import ShardedStore, StoreShard, shard_count, shard_of
from tests.test_store import DIM, FP, texts_for, vectors_for


def random_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(10**12, size=n, replace=False).astype(np.int64)


def filled_store(path: Path, ids: np.ndarray, parts: int, dtype: str = "float32", dim: int = DIM) -> EmbeddingStore:
    """A store holding `ids` in `parts` committed parts; vectors by `vectors_for` (DIM) or random (other dims)."""
    store = EmbeddingStore.open(str(path), FP, dim, dtype=dtype)
    for chunk in np.array_split(ids, parts):
        vectors = vectors_for(chunk) if dim == DIM else np.random.default_rng(int(chunk[0])).random((chunk.size, dim))
        store.add(chunk, vectors, texts_for(chunk))
    store.commit()
    return store


def reader(store: EmbeddingStore, tmp_path: Path, **options) -> EmbeddingStore:
    return EmbeddingStore.read(store.path, reader=StoreReaderConfig(cache_dir=str(tmp_path / "cache"), **options))


def layouts(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").glob("*/*") if p.is_dir())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layout_lookup_equals_the_parts(tmp_path: Path, dtype: str) -> None:
    ids = random_ids(3_000)
    store = filled_store(tmp_path / "store", ids, parts=7, dtype=dtype)
    r = reader(store, tmp_path)
    query = np.stack([ids[::-7][:100], ids[:100]])  # 2-D, unsorted
    want = vectors_for(query.reshape(-1)).astype(dtype).astype(np.float32).reshape(2, 100, DIM)
    np.testing.assert_array_equal(r.lookup(query), want)
    assert r.lookup(query, dtype=None).dtype == np.dtype(dtype)  # the store's own: no widening
    np.testing.assert_array_equal(r.lookup(query, dtype=None), want.astype(dtype))
    vectors, found = r.lookup_with_mask(np.array([ids[5], 7, ids[9]]))
    np.testing.assert_array_equal(found, [True, False, True])
    np.testing.assert_array_equal(vectors[1], 0)
    (folder,) = [p for p in (tmp_path / "cache").glob("*/v00000001-*") if p.is_dir()]
    mapped = np.load(folder / "ids.npy", mmap_mode="r")
    np.testing.assert_array_equal(mapped, np.sort(ids))
    assert np.load(folder / "vectors.npy", mmap_mode="r").dtype == np.dtype(dtype)


def test_running_reader_moves_to_a_new_version_and_old_layouts_go(tmp_path: Path) -> None:
    ids = random_ids(600)
    store = filled_store(tmp_path / "store", ids[:200], parts=2)
    r = reader(store, tmp_path, refresh_s=0.2, keep_versions=1)
    assert r.lookup(ids[:200]).shape == (200, DIM)
    for version, new in ((2, ids[200:400]), (3, ids[400:])):
        store.add(new, vectors_for(new), texts_for(new))
        store.commit()
        assert not r.lookup_with_mask(new)[1].any()  # checked less than refresh_s ago: still the old version
        time.sleep(0.25)
        np.testing.assert_array_equal(r.lookup(new), vectors_for(new))
        assert r.version == version
        assert [name[:9] for name in layouts(tmp_path)] == [f"v{version:08d}"]  # keep_versions=1
        (folder,) = [p for p in (tmp_path / "cache").glob("*/v*") if p.is_dir()]
        assert json.loads((folder / "layout.json").read_text())["base"].startswith(f"v{version - 1:08d}-")
        everything = ids[: version * 200]  # the previous layout's rows, copied, and the new part's
        np.testing.assert_array_equal(r.lookup(everything), vectors_for(everything))


def test_concurrent_builders_make_one_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = random_ids(5_000)
    store = filled_store(tmp_path / "store", ids, parts=5)
    builds = []
    build = node_cache._build

    def counted(*args, **kwargs):
        builds.append(1)
        time.sleep(0.3)  # the others reach the lock meanwhile
        return build(*args, **kwargs)

    monkeypatch.setattr(node_cache, "_build", counted)
    readers = [reader(store, tmp_path) for _ in range(4)]  # each flock()s through its own file description
    results: list[np.ndarray] = [np.empty(0)] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, readers[i].lookup(ids))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    for got in results:
        np.testing.assert_array_equal(got, vectors_for(ids))
    assert len(layouts(tmp_path)) == 1 and not list((tmp_path / "cache").glob("*/*.tmp-*"))


def test_layout_of_a_store_whose_part_went_is_refused(tmp_path: Path) -> None:
    ids = random_ids(500)
    store = filled_store(tmp_path / "store", ids, parts=3)
    reader(store, tmp_path).lookup(ids)
    (tmp_path / "store" / "parts" / store.parts[1].name).unlink()
    with pytest.raises(StoreCorruptError, match=store.parts[1].name):
        reader(store, tmp_path).lookup(ids)


SMAPS_READER = textwrap.dedent("""
    import sys
    import numpy as np
    from bahe_ray.config import StoreReaderConfig
    from bahe_ray.store import EmbeddingStore
    store = EmbeddingStore.read(sys.argv[1], reader=StoreReaderConfig(cache_dir=sys.argv[2]))
    ids = store.ids()
    for start in range(0, ids.size, 10_000):
        store.lookup(ids[start:start + 10_000])
    print("ready", flush=True)
    sys.stdin.readline()
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc smaps")
def test_two_processes_hold_one_copy_of_the_vectors(tmp_path: Path) -> None:
    ids = random_ids(20_000)
    store = filled_store(tmp_path / "store", ids, parts=4, dim=256)  # 20 MB of float32 vectors
    procs = [subprocess.Popen([sys.executable, "-c", SMAPS_READER, store.path, str(tmp_path / "cache")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        usage = [node_cache.mapped_vectors_kb(p.pid) for p in procs]
    finally:
        for p in procs:
            p.communicate("\n", timeout=60)
    vector_kb = ids.size * 256 * 4 / 1024
    for u in usage:
        assert u["Rss"] >= 0.9 * vector_kb  # each process has touched every vector...
        assert u["Pss"] <= 0.6 * u["Rss"]  # ...but holds about half of one shared copy
    assert sum(u["Pss"] for u in usage) <= 1.1 * vector_kb


def test_plan_compaction_groups_small_parts() -> None:
    parts = [PartInfo(f"p{i}", rows, 0, "", 0, 0, "f") for i, rows in enumerate([5, 5, 20, 3, 4, 4, 1, 9])]
    groups = plan_compaction(parts, target_part_rows=10)
    assert [[p.name for p in g] for g in groups] == [["p0", "p1"], ["p3", "p4"], ["p5", "p6"]]
    with pytest.raises(ValueError, match="target_part_rows"):
        plan_compaction(parts, 0)


def test_compaction_keeps_every_id_and_vector_bit_for_bit(tmp_path: Path) -> None:
    ids = random_ids(2_000)
    store = filled_store(tmp_path / "store", ids[:400], parts=4, dtype="float16")
    for chunk in np.array_split(ids[400:], 16):  # daily updates
        store.add(chunk, vectors_for(chunk), texts_for(chunk))
        store.commit()
    old = reader(store, tmp_path)
    before = old.lookup(ids)
    result = store.compact(target_part_rows=600)
    assert (result.version, result.parts_before, result.parts_after) == (18, 20, 4)
    new = EmbeddingStore.read(store.path)
    assert new.num_atoms == ids.size and len(new.parts) == 4 and new.verify().ok
    np.testing.assert_array_equal(new.ids(), np.sort(ids))
    assert new.lookup(ids).tobytes() == before.tobytes()
    assert new.texts(ids[::97]) == texts_for(ids[::97])

    assert store.gc(min_age_s=3600) == []  # the old version's parts stay for its readers
    removed = store.gc()
    assert len(removed) == 20 and EmbeddingStore.read(store.path).verify().ok
    assert old.version == 17 and old.lookup(ids).tobytes() == before.tobytes()  # mapped before: unaffected


def test_compaction_keeps_a_commit_made_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = random_ids(300)
    store = filled_store(tmp_path / "store", ids[:200], parts=4)
    other = EmbeddingStore.read(store.path)
    merge = store_module.merge_parts

    def merge_then_commit_elsewhere(*args, **kwargs):
        info = merge(*args, **kwargs)
        if other.version == 1:
            other.add(ids[200:], vectors_for(ids[200:]), texts_for(ids[200:]))
            other.commit()
        return info

    monkeypatch.setattr(store_module, "merge_parts", merge_then_commit_elsewhere)
    result = store.compact(target_part_rows=1_000)
    assert result.version == 3 and result.parts_after == 2
    reread = EmbeddingStore.read(store.path)
    np.testing.assert_array_equal(reread.ids(), np.sort(ids))
    assert reread.verify().ok

    def compact_elsewhere_first(*args, **kwargs):
        monkeypatch.setattr(store_module, "merge_parts", merge)
        other.compact(target_part_rows=1_000)
        return merge(*args, **kwargs)

    late = np.array([10**13])
    store.add(late, vectors_for(late), texts_for(late))  # one more small part to compact
    store.commit()
    monkeypatch.setattr(store_module, "merge_parts", compact_elsewhere_first)
    with pytest.raises(CommitConflictError, match="another compaction"):
        store.compact(target_part_rows=1_000)


def test_cli_store_compact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = random_ids(300)
    store = filled_store(tmp_path / "store", ids, parts=6)
    assert cli.main(["store", "compact", store.path, "--target-part-rows", "1000"]) == 0
    assert '"parts_after": 1' in capsys.readouterr().out
    assert cli.main(["store", "verify", store.path]) == 0
    np.testing.assert_array_equal(EmbeddingStore.read(store.path).lookup(ids), vectors_for(ids))


def test_shards_partition_the_store(tmp_path: Path) -> None:
    ids = random_ids(3_000)
    store = filled_store(tmp_path / "store", ids, parts=5)
    shards = [StoreShard(store.path, None, i, 3) for i in range(3)]
    assert sum(s.rows() for s in shards) == ids.size and min(s.rows() for s in shards) > 800  # spread evenly
    owner = shard_of(ids, 3)
    for i, shard in enumerate(shards):
        vectors, found = shard.lookup(np.append(ids[owner == i], 7))
        np.testing.assert_array_equal(found, [True] * int((owner == i).sum()) + [False])
        np.testing.assert_array_equal(vectors[:-1], vectors_for(ids[owner == i]))
    new = random_ids(50, seed=1)
    store.add(new, vectors_for(new), texts_for(new))
    store.commit()
    store.compact(target_part_rows=10_000)
    assert [s.refresh() for s in shards] == [3, 3, 3]
    assert sum(s.rows() for s in shards) == ids.size + new.size


def test_shard_count_off_by_config_and_past_the_threshold(tmp_path: Path) -> None:
    store = filled_store(tmp_path / "store", random_ids(1_000), parts=1, dtype="float16", dim=500)  # 1 MB of vectors
    assert shard_count(store, StoreReaderConfig()) == 0  # off by default
    assert shard_count(store, StoreReaderConfig(shards=3)) == 3
    assert shard_count(store, StoreReaderConfig(shards=3, shard_above_gb=0.0001)) == 3  # shards wins
    assert shard_count(store, StoreReaderConfig(shard_above_gb=0.002)) == 0  # not past the threshold
    assert shard_count(store, StoreReaderConfig(shard_above_gb=0.0004)) == 3  # ceil(1.0 MB / 0.4 MB)
    assert shard_count(store, StoreReaderConfig(shard_above_gb=0.0006)) == 2


def test_sharded_lookup_equals_the_store(tmp_path: Path, ray_local: None) -> None:
    import ray

    ids = random_ids(4_000)
    store = filled_store(tmp_path / "store", ids, parts=4, dtype="float16")
    sharded = ShardedStore(EmbeddingStore.read(store.path), shards=3)
    query = np.stack([ids[::7][:300], np.append(ids[:299], 12345)])  # 2-D, one absent id
    want_vectors, want_found = reader(store, tmp_path).lookup_with_mask(query)
    vectors, found = sharded.lookup_with_mask(query)
    np.testing.assert_array_equal(found, want_found)
    assert vectors.dtype == np.float32 and vectors.tobytes() == want_vectors.tobytes()
    assert sum(sharded.rows()) == ids.size
    ray.kill(sharded.actors[1])  # a shard lost (its starter gone): the next lookup starts it again
    vectors, found = sharded.lookup_with_mask(query)
    np.testing.assert_array_equal(found, want_found)
    assert vectors.tobytes() == want_vectors.tobytes() and sum(sharded.rows()) == ids.size
