"""The embedding store on real files: local folders and a real S3 endpoint (moto server)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bahe_ray.atoms import AtomCollisionError
from bahe_ray.encoders.base import EncoderFingerprint
from bahe_ray.fs import filesystem
from bahe_ray.store import (
    EmbeddingStore,
    FingerprintMismatchError,
    PartInfo,
    StoreCorruptError,
    StoreMismatchError,
)
from bahe_ray.store.parts import create_exclusive

DIM = 8
FP = EncoderFingerprint(
    model_name="tiny", weights_sha256="ab" * 32, k=2, pooling="mean", dtype="float32", max_tokens=32
)


def vectors_for(ids: np.ndarray) -> np.ndarray:
    """Deterministic vectors derived from the ids, so any stored row can be checked."""
    rng = np.random.default_rng(0)
    basis = rng.standard_normal(DIM).astype(np.float32)
    return (np.asarray(ids, dtype=np.float64)[:, None] % 1000 / 1000 + basis).astype(np.float32)


def texts_for(ids: np.ndarray) -> list[str]:
    return [f"atom {i}" for i in ids]


def add(store: EmbeddingStore, ids: np.ndarray) -> PartInfo:
    return store.add(ids, vectors_for(ids), texts_for(ids))


def assert_exactly_once(store: EmbeddingStore, expected: np.ndarray) -> None:
    """Every expected id committed once, with its own vector, and nothing else."""
    reader = EmbeddingStore.read(store.path, store.storage)
    expected = np.unique(expected)
    np.testing.assert_array_equal(reader.ids(), expected)
    assert reader.num_atoms == expected.size
    np.testing.assert_allclose(reader.lookup(expected), vectors_for(expected), rtol=1e-3)
    assert reader.verify().ok, reader.verify().problems


@pytest.fixture
def store(tmp_path: Path) -> EmbeddingStore:
    return EmbeddingStore.open(str(tmp_path / "store"), FP, DIM)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path: Path, dtype: str) -> None:
    path = str(tmp_path / "store")
    store = EmbeddingStore.open(path, FP, DIM, dtype=dtype)
    assert store.version == 0 and store.num_atoms == 0 and store.ids().size == 0
    ids = np.array([5, -3, 2**62, 17, -(2**63)], dtype=np.int64)
    add(store, ids[:3])
    add(store, ids[3:])
    assert len(store.pending) == 2
    result = store.commit()
    assert (result.version, result.added, len(result.parts)) == (1, 5, 2)
    assert store.pending == () and store.version == 1

    reader = EmbeddingStore.read(path)
    assert reader.fingerprint == FP and reader.dim == DIM and reader.dtype == dtype
    assert reader.version == 1 and reader.num_atoms == 5
    got = reader.lookup(ids[::-1])
    assert got.dtype == np.float32 and got.shape == (5, DIM)
    tol = 1e-3 if dtype == "float16" else 0
    np.testing.assert_allclose(got, vectors_for(ids[::-1]), rtol=tol, atol=tol)
    # sequences of ids (training batches) keep their shape
    assert reader.lookup(ids[[[0, 1], [2, 3]]]).shape == (2, 2, DIM)
    assert reader.texts(ids[[3, 0]]) == ["atom 17", "atom 5"]
    assert reader.verify().ok
    summary = EmbeddingStore.read(path).info()
    assert (summary.version, summary.atoms, summary.parts, summary.dtype) == (1, 5, 2, dtype)
    assert summary.fingerprint_id == FP.id and summary.bytes > 0


def test_layout_on_disk(store: EmbeddingStore, tmp_path: Path) -> None:
    add(store, np.arange(10))
    store.commit()
    root = tmp_path / "store"
    assert (root / "STORE.json").is_file()
    assert [p.name for p in (root / "manifests").iterdir()] == ["v00000001.json"]
    (part,) = (root / "parts").iterdir()
    assert part.name.startswith("part-") and part.suffix == ".parquet"
    manifest = json.loads((root / "manifests" / "v00000001.json").read_text())
    assert manifest["version"] == 1 and manifest["parent"] == 0 and manifest["total_atoms"] == 10
    assert manifest["fingerprint_id"] == FP.id
    assert manifest["parts"][0]["bytes"] == part.stat().st_size
    assert (manifest["parts"][0]["min_id"], manifest["parts"][0]["max_id"]) == (0, 9)


def test_missing_and_contains(store: EmbeddingStore) -> None:
    add(store, np.arange(0, 100, 2))
    store.commit()
    query = np.array([7, 4, 3, 4, 1000, 0])
    np.testing.assert_array_equal(store.missing(query), [7, 3, 1000])
    np.testing.assert_array_equal(store.contains(query), [False, True, False, True, False, True])
    assert store.missing(np.array([], dtype=np.int64)).size == 0


def test_incremental_commits_only_new_ids(store: EmbeddingStore) -> None:
    ids = np.arange(1000)
    add(store, ids)
    store.commit()

    again = add(store, ids)
    result = store.commit()
    assert result.added == 0 and result.version == 1 and result.skipped == [again.name]
    assert result.duplicates_dropped == 1000

    more = np.concatenate([ids[:990], np.arange(5000, 5010)])  # 1% new
    partial = add(store, more)
    result = store.commit()
    assert (result.version, result.added, result.duplicates_dropped) == (2, 10, 990)
    assert list(result.rewritten) == [partial.name]
    assert result.parts[0].rows == 10 and result.parts[0].name == result.rewritten[partial.name]
    assert_exactly_once(store, np.concatenate([ids, more]))


def test_duplicates_within_one_commit(store: EmbeddingStore) -> None:
    first = add(store, np.arange(0, 60))
    add(store, np.arange(40, 100))  # a retried batch overlapping the first
    add(store, np.arange(0, 60))  # the same batch again
    result = store.commit()
    assert result.added == 100 and result.parts[0] == first and len(result.parts) == 2
    assert_exactly_once(store, np.arange(100))

    # committing an already committed part again (a retried commit call) is a no-op
    result = store.commit([first.to_dict()])
    assert result.added == 0 and result.version == 1 and result.skipped == [first.name]


def test_first_occurrence_wins_and_collisions_are_refused(store: EmbeddingStore) -> None:
    ids = np.array([1, 2, 3])
    store.add(ids, vectors_for(ids), ["a", "b", "c"])
    store.commit()
    with pytest.raises(AtomCollisionError, match="different texts"):
        store.commit([store.write_part(np.array([3, 4]), vectors_for(np.array([3, 4])), ["other c", "d"])])
    with pytest.raises(AtomCollisionError):
        store.commit(
            [store.write_part(np.array([7]), vectors_for(np.array([7])), ["x"]),
             store.write_part(np.array([7]), vectors_for(np.array([7])), ["y"])]
        )
    # unknown texts (None) are not evidence of a collision
    result = store.commit([store.write_part(np.array([3, 4]), vectors_for(np.array([3, 4])))])
    assert result.added == 1 and store.texts(np.array([3, 4])) == ["c", None]


def test_interrupted_writer_then_rerun(store: EmbeddingStore, tmp_path: Path) -> None:
    all_ids = np.arange(3000)
    add(store, all_ids[:1000])
    store.commit()
    before = sorted(p.name for p in (tmp_path / "store" / "manifests").iterdir())

    # a writer killed mid-run: two parts written but never committed, one half-written part,
    # a temporary manifest that never got linked
    crashed = EmbeddingStore.open(store.path, FP, DIM)
    add(crashed, all_ids[1000:1500])
    add(crashed, all_ids[900:2000])
    whole = (tmp_path / "store" / "parts" / crashed.pending[0].name).read_bytes()
    half = tmp_path / "store" / "parts" / "part-halfwritten.parquet"
    half.write_bytes(whole[: len(whole) // 2])
    (tmp_path / "store" / "manifests" / "v00000002.json.tmp-dead").write_text("{")
    del crashed

    reader = EmbeddingStore.read(store.path)
    assert reader.version == 1 and reader.num_atoms == 1000 and reader.verify().ok
    assert sorted(p.name for p in (tmp_path / "store" / "manifests").iterdir())[:1] == before

    # the rerun: missing -> encode -> add -> commit
    rerun = EmbeddingStore.open(store.path, FP, DIM)
    todo = rerun.missing(all_ids)
    assert todo.size == 2000
    for chunk in np.array_split(todo, 4):
        add(rerun, chunk)
    assert rerun.commit().added == 2000
    assert_exactly_once(rerun, all_ids)

    removed = rerun.gc()
    assert {os.path.basename(p) for p in removed} >= {"part-halfwritten.parquet", "v00000002.json.tmp-dead"}
    assert len(removed) == 4
    assert rerun.gc() == []
    assert_exactly_once(rerun, all_ids)


WRITER_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from tests.test_store import FP, DIM, add
from bahe_ray.store import EmbeddingStore
store = EmbeddingStore.open({path!r}, FP, DIM)
for start in range(0, 1_000_000, 500):
    add(store, np.arange(start, start + 500))
    if start % 1500 == 1000:
        store.commit()
"""


def test_writer_killed_by_signal_then_rerun(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    EmbeddingStore.open(path, FP, DIM)
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT.format(root=root, path=path)])
    deadline = time.time() + 60
    while not (tmp_path / "store" / "manifests" / "v00000003.json").exists():
        assert proc.poll() is None and time.time() < deadline, "writer did not commit"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    store = EmbeddingStore.open(path, FP, DIM)
    assert store.verify().ok
    committed = store.num_atoms
    assert committed >= 4500 and committed % 1500 == 0
    np.testing.assert_array_equal(store.ids(), np.arange(committed))
    target = np.arange(committed + 3000)
    add(store, store.missing(target))
    store.commit()
    store.gc()
    assert_exactly_once(store, target)


def test_concurrent_writer_is_detected_and_both_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "store")
    a = EmbeddingStore.open(path, FP, DIM)
    b = EmbeddingStore.open(path, FP, DIM)
    part_a = add(a, np.arange(0, 100))
    add(b, np.arange(50, 150))

    read_head = b._read_head
    calls = {"n": 0}

    def racing_read_head():
        head = read_head()
        calls["n"] += 1
        if calls["n"] == 1:  # `a` commits right after `b` has read the head it builds on
            assert a.commit().version == 1
        return head

    monkeypatch.setattr(b, "_read_head", racing_read_head)
    result = b.commit()
    assert result.conflicts == 1 and result.version == 2 and result.added == 50
    assert part_a.name in {p.name for p in b.parts}
    assert_exactly_once(b, np.arange(150))


def test_concurrent_writers_in_threads(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    EmbeddingStore.open(path, FP, DIM)
    errors: list[BaseException] = []

    def batches(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [np.unique(rng.integers(0, 400, 60)) for _ in range(5)]

    def writer(seed: int) -> None:
        try:
            store = EmbeddingStore.open(path, FP, DIM)
            for ids in batches(seed):
                add(store, ids)
                store.commit()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert_exactly_once(EmbeddingStore.read(path), np.concatenate([b for s in range(4) for b in batches(s)]))


def test_fingerprint_dim_and_dtype_mismatch(store: EmbeddingStore, tmp_path: Path) -> None:
    other = FP.model_copy(update={"k": 3, "pooling": "last"})
    with pytest.raises(FingerprintMismatchError) as err:
        EmbeddingStore.open(store.path, other, DIM)
    message = str(err.value)
    assert FP.id in message and other.id in message
    assert "k: store 2 != encoder 3" in message and "pooling: store 'mean' != encoder 'last'" in message
    assert "model_name" not in message
    with pytest.raises(StoreMismatchError, match="8-d vectors, the encoder produces 16-d"):
        EmbeddingStore.open(store.path, FP, 16)
    with pytest.raises(StoreMismatchError, match="float32 vectors, asked for float16"):
        EmbeddingStore.open(store.path, FP, DIM, dtype="float16")
    with pytest.raises(FileNotFoundError):
        EmbeddingStore.open(str(tmp_path / "nowhere"), FP, DIM, create=False)

    foreign = EmbeddingStore.open(str(tmp_path / "other"), other, DIM).write_part(np.arange(3), vectors_for(np.arange(3)))
    with pytest.raises(FingerprintMismatchError):
        store.commit([foreign])


def test_write_part_validates(store: EmbeddingStore) -> None:
    ids = np.arange(4)
    bad = vectors_for(ids)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        store.write_part(ids, bad)
    with pytest.raises(ValueError, match="unique"):
        store.write_part(np.array([1, 1, 2, 3]), vectors_for(ids))
    with pytest.raises(ValueError, match="shape"):
        store.write_part(ids, vectors_for(ids)[:, :3])
    with pytest.raises(ValueError, match="texts"):
        store.write_part(ids, vectors_for(ids), ["a"])
    with pytest.raises(ValueError, match="NaN or inf"):  # overflows float16
        EmbeddingStore.open(store.path + "16", FP, DIM, dtype="float16").write_part(ids, vectors_for(ids) * 1e6)


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete"])
def test_corrupt_part_is_named(store: EmbeddingStore, tmp_path: Path, damage: str) -> None:
    add(store, np.arange(100))
    victim = add(store, np.arange(100, 200))
    store.commit()
    file = tmp_path / "store" / "parts" / victim.name
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) - 100])
    elif damage == "alter":
        i = len(data) // 2
        file.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    else:
        file.unlink()

    report = EmbeddingStore.read(store.path).verify()
    assert not report.ok and len(report.problems) == 1 and victim.name in report.problems[0]
    assert report.to_dict()["ok"] is False
    with pytest.raises(StoreCorruptError, match=victim.name):
        EmbeddingStore.read(store.path).lookup(np.arange(3))
    if damage != "alter":  # the id index reads only ids, sizes and footers
        with pytest.raises(StoreCorruptError, match=victim.name):
            EmbeddingStore.read(store.path).missing(np.arange(3))


def test_lookup_missing_ids(store: EmbeddingStore) -> None:
    add(store, np.arange(10))
    store.commit()
    with pytest.raises(KeyError, match=r"2 of 4 ids not in store .*\[42, 43\]"):
        store.lookup(np.array([1, 42, 2, 43]))
    vectors, found = store.lookup_with_mask(np.array([1, 42]))
    np.testing.assert_array_equal(found, [True, False])
    np.testing.assert_array_equal(vectors[1], 0)
    np.testing.assert_allclose(vectors[0], vectors_for(np.array([1]))[0])
    with pytest.raises(KeyError):
        store.texts(np.array([42]))


def test_reader_sees_new_versions_after_refresh(store: EmbeddingStore) -> None:
    add(store, np.arange(10))
    store.commit()
    reader = EmbeddingStore.read(store.path)
    assert reader.lookup(np.arange(10)).shape == (10, DIM)
    add(store, np.arange(10, 20))
    store.commit()
    assert not reader.lookup_with_mask(np.array([15]))[1][0]  # still version 1
    assert reader.refresh() == 2
    np.testing.assert_allclose(reader.lookup(np.arange(20)), vectors_for(np.arange(20)))


def test_part_writer_is_picklable_and_records_travel_as_dicts(store: EmbeddingStore) -> None:
    writer = pickle.loads(pickle.dumps(store.part_writer()))
    records = [writer.write_part(np.arange(i, i + 10), vectors_for(np.arange(i, i + 10))).to_dict() for i in (0, 5)]
    rows = [{k: np.int64(v) if isinstance(v, int) else v for k, v in r.items()} for r in records]  # like Ray rows
    result = store.commit(rows)
    assert result.added == 15
    assert_exactly_once(store, np.arange(15))


def test_manifest_keys_are_never_overwritten(tmp_path: Path, s3_server) -> None:
    for base in (str(tmp_path), s3_server.new_bucket()):
        fs, root = filesystem(base, s3_server.storage)
        key = f"{root}/manifests/v00000001.json"
        assert create_exclusive(fs, key, b"first")
        assert not create_exclusive(fs, key, b"second")
        assert fs.cat_file(key) == b"first"


def test_s3_round_trip(s3_server) -> None:
    path = s3_server.new_bucket() + "/stores/minilm"
    storage = s3_server.storage
    store = EmbeddingStore.open(path, FP, DIM, storage=storage, dtype="float16")
    writer = pickle.loads(pickle.dumps(store.part_writer()))
    parts = [writer.write_part(np.arange(i, i + 50), vectors_for(np.arange(i, i + 50)), texts_for(np.arange(i, i + 50)))
             for i in (0, 25, 75)]
    result = store.commit(p.to_dict() for p in parts)
    assert result.added == 125 and result.version == 1 and len(result.rewritten) == 1

    reader = EmbeddingStore.read(path, storage)
    assert reader.fingerprint == FP and reader.dtype == "float16" and reader.num_atoms == 125
    np.testing.assert_array_equal(reader.missing(np.array([3, 124, 125, 999])), [125, 999])
    np.testing.assert_allclose(reader.lookup(np.arange(125)), vectors_for(np.arange(125)), rtol=1e-3)
    assert reader.texts(np.array([30])) == ["atom 30"]

    add(store, np.arange(120, 135))  # incremental: 10 new
    orphan = store.write_part(np.arange(500, 510), vectors_for(np.arange(500, 510)))  # never committed
    assert store.commit().added == 10
    assert reader.refresh() == 2
    np.testing.assert_allclose(reader.lookup(np.arange(135)), vectors_for(np.arange(135)), rtol=1e-3)
    removed = store.gc()
    assert any(orphan.name in p for p in removed) and len(removed) == 3  # orphan + 2 replaced originals
    assert store.verify().ok and EmbeddingStore.read(path, storage).info().atoms == 135

    with pytest.raises(FingerprintMismatchError):
        EmbeddingStore.open(path, FP.model_copy(update={"max_tokens": 64}), DIM, storage=storage)
    fs, inner = filesystem(path + "/parts/" + parts[0].name, storage)
    fs.pipe_file(inner, fs.cat_file(inner)[:-10])
    with pytest.raises(StoreCorruptError, match=parts[0].name):
        EmbeddingStore.read(path, storage).lookup(np.arange(3))
