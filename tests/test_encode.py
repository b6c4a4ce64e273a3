"""The encode job end to end on real MovieLens rows and the real MiniLM: dedup, incremental
runs, bad rows, fingerprint mismatch, a killed run finished by a rerun, S3. (`ray job submit`
of the same job is in tests/test_workflow.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, write_movielens_subset

from bahe_ray.config import Config, load_config, with_overrides
from bahe_ray.data.prepare import load_prepared
from bahe_ray.data.readers import read_rejects
from bahe_ray.encode import run_encode
from bahe_ray.encoders import build_encoder
from bahe_ray.store import EmbeddingStore, FingerprintMismatchError

USERS = 6


@pytest.fixture(scope="module")
def ml_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A real MovieLens-100K subset (first users) as parquet input files."""
    return write_movielens_subset(tmp_path_factory.mktemp("ml"), USERS)


def make_config(tmp: Path, files: dict[str, str], **overrides: str) -> Config:
    sets = [
        "data.source=files",
        f"data.events_path={files['events']}",
        f"data.impressions_path={files['impressions']}",
        f"data.prepared_path={tmp / 'data'}",
        f"store.path={tmp / 'store'}",
        f"rejects_path={tmp / 'rejects'}",
        "encoder.batch_size=128",
        *[f"{k}={v}" for k, v in overrides.items()],
    ]
    return load_config(REPO / "configs" / "local.yaml", sets)


def expected_unique(files: dict[str, str]) -> set[str]:
    events = pq.read_table(files["events"])
    impressions = pq.read_table(files["impressions"])
    return set(events.column("text").to_pylist()) | set(impressions.column("item_text").to_pylist())


def test_encode_dedups_and_stores_exact_vectors(ray_local: None, tmp_path: Path, ml_files: dict[str, str]) -> None:
    cfg = make_config(tmp_path, ml_files)
    summary = run_encode(cfg)
    unique = expected_unique(ml_files)
    n_rows = pq.read_table(ml_files["events"]).num_rows
    assert summary.events_read == summary.events_valid == n_rows
    assert summary.atoms_seen == 2 * n_rows
    assert summary.unique_atoms == summary.new_atoms == summary.encoded == len(unique)
    assert summary.dedup_ratio == pytest.approx(2 * n_rows / len(unique))
    store = EmbeddingStore.read(cfg.store.path)
    assert store.num_atoms == len(unique) and store.verify().ok
    # Stored vectors are exactly what the shallow encoder gives for those texts.
    ids = store.ids()[:20]
    texts = store.texts(ids)
    direct = build_encoder(cfg.encoder, device="cpu").encode(texts)
    np.testing.assert_allclose(store.lookup(ids), direct, rtol=1e-5, atol=1e-5)

    # A second run over the same logs encodes nothing and publishes no new version.
    version = store.version
    again = run_encode(cfg)
    assert again.new_atoms == 0 and again.encoded == 0 and again.store_version == version

    # 1% new behaviours: only those are encoded.
    extra = pa.table({"user_id": ["u-new"] * 5, "ts": [1_000_000_000 + i for i in range(5)], "field": ["liked"] * 5,
                      "text": [f"rated 5/5: A Brand New Film {i} (2031) | Drama" for i in range(5)]})
    pq.write_table(extra, Path(ml_files["events"]) / "part-1.parquet")
    try:
        third = run_encode(cfg)
    finally:
        (Path(ml_files["events"]) / "part-1.parquet").unlink()
    assert third.new_atoms == third.encoded == 5
    assert EmbeddingStore.read(cfg.store.path).num_atoms == len(unique) + 5

    # Another encoder (k=3) must not write into this store.
    with pytest.raises(FingerprintMismatchError, match="k"):
        run_encode(make_config(tmp_path, ml_files, **{"encoder.k": "3"}))


def test_bad_rows_are_counted_and_set_aside(ray_local: None, tmp_path: Path) -> None:
    lines = [json.dumps({"user_id": f"u{i}", "ts": 1_700_000_000 + i, "field": "liked", "text": f"good behaviour {i % 4}"})
             for i in range(12)]
    lines += ['{"user_id": "x", "ts": "soon", "field": "liked", "text": "t"}', "not json at all",
              '{"user_id": "x", "ts": 5, "field": "liked", "text": ""}']
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    cfg = make_config(tmp_path, {"events": str(events), "impressions": ""}, **{"data.format": "jsonl"})
    cfg.data.impressions_path = None
    summary = run_encode(cfg)
    assert summary.events_read == 15 and summary.events_valid == 12
    assert summary.unique_atoms == summary.encoded == 4
    assert summary.rejects == {"events: row: not valid JSON": 1, "events: text: empty": 1,
                               "events: ts: not a timestamp": 1}
    files = list((tmp_path / "rejects" / summary.run_id).glob("*.parquet"))
    assert sum(pq.read_table(f).num_rows for f in files) == 3


def test_inputs_are_prepared_once_per_run(ray_local: None, tmp_path: Path) -> None:
    """encode then samples (as the demo, the daily update and `bahe train` run them): the inputs are
    validated once, by encode, and samples reads the same tables; each bad row is set aside once.
    A changed data config prepares them again."""
    from bahe_ray.samples import build_configured_samples

    files = write_movielens_subset(tmp_path / "logs", 1)
    bad = pq.read_table(files["events"]).slice(0, 2)
    bad = bad.set_column(bad.schema.get_field_index("text"), "text", pa.array(["", "   "]))
    pq.write_table(bad, Path(files["events"]) / "part-1.parquet")
    cfg = make_config(tmp_path, files, **{"samples.path": str(tmp_path / "samples"), "samples.max_behaviors": "5"})
    prepared, rejects = tmp_path / "data", tmp_path / "rejects"

    def written() -> dict[Path, int]:
        return {f: f.stat().st_mtime_ns for f in prepared.rglob("*") if f.is_file()}

    encoded = run_encode(cfg)
    assert encoded.rejects == {"events: text: empty": 2} and encoded.events_read == encoded.events_valid + 2
    before = written()
    samples = build_configured_samples(cfg)
    assert written() == before, "samples rewrote the inputs encode prepared"
    assert [d.name for d in rejects.iterdir()] == [encoded.run_id]
    assert read_rejects(str(rejects / encoded.run_id), cfg.storage).num_rows == 2
    assert sum(samples.counts.values()) == encoded.impressions_valid

    shorter = with_overrides(cfg, ["data.max_text_chars=40"])  # rejects the longer movie titles
    again = build_configured_samples(shorter)
    record = load_prepared(cfg.data.prepared_path, cfg.storage)
    assert record is not None and record.run_id != encoded.run_id and written() != before
    assert sorted(d.name for d in rejects.iterdir()) == sorted([encoded.run_id, record.run_id])
    assert 0 < record.impressions_valid < encoded.impressions_valid
    assert sum(again.counts.values()) == record.impressions_valid


def test_killed_run_is_finished_by_rerun(ray_local: None, tmp_path: Path, ml_files: dict[str, str]) -> None:
    store_path = tmp_path / "store"
    sets = ["data.source=files", f"data.events_path={ml_files['events']}", f"data.impressions_path={ml_files['impressions']}",
            f"data.prepared_path={tmp_path / 'data'}", f"store.path={store_path}", f"rejects_path={tmp_path / 'rejects'}",
            "encoder.batch_size=16", "store.commit_every_parts=1", "ray.num_cpus=1"]
    cmd = [sys.executable, "-m", "bahe_ray.cli", "encode", "--config", str(REPO / "configs" / "local.yaml")]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifests = store_path / "manifests"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(manifests.glob("v*.json"))) < 2:
        assert proc.poll() is None, "the encode run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, mid-run
    proc.wait()
    partial = EmbeddingStore.read(str(store_path))
    unique = expected_unique(ml_files)
    assert 0 < partial.num_atoms < len(unique) and partial.verify().ok

    cfg = make_config(tmp_path, ml_files)
    summary = run_encode(cfg)
    assert summary.new_atoms == len(unique) - partial.num_atoms
    store = EmbeddingStore.read(str(store_path))
    assert store.num_atoms == len(unique) and len(np.unique(store.ids())) == len(unique)
    assert store.verify().ok
    store.gc()
    assert store.verify().ok and EmbeddingStore.read(str(store_path)).num_atoms == len(unique)


def test_encode_reads_and_writes_s3(ray_local: None, s3_server, tmp_path: Path, ml_files: dict[str, str]) -> None:
    import s3fs

    bucket = s3_server.new_bucket()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    for name in ("events", "impressions"):
        fs.put(ml_files[name] + "/part-0.parquet", f"{bucket[5:]}/logs/{name}/part-0.parquet")
    files = {"events": f"{bucket}/logs/events", "impressions": f"{bucket}/logs/impressions"}
    cfg = make_config(tmp_path, files, **{"store.path": f"{bucket}/store", "rejects_path": f"{bucket}/rejects",
                                          "data.prepared_path": f"{bucket}/data", "storage.endpoint_url": s3_server.endpoint})
    summary = run_encode(cfg)
    assert summary.encoded == len(expected_unique(ml_files))
    store = EmbeddingStore.read(f"{bucket}/store", storage=cfg.storage)
    assert store.num_atoms == summary.encoded and store.verify().ok


def test_local_path_without_ray_matches_the_ray_job(ray_local: None, tmp_path: Path, ml_files: dict[str, str]) -> None:
    """`bahe encode --no-ray` (GPU machines without Ray) counts, dedups and stores exactly as the Ray job."""
    from bahe_ray.encode import run_encode_local

    ray_cfg = make_config(tmp_path / "ray", ml_files)
    local_cfg = make_config(tmp_path / "local", ml_files)
    by_ray, local = run_encode(ray_cfg), run_encode_local(local_cfg, device="cpu")
    for name in ("events_read", "impressions_read", "atoms_seen", "unique_atoms", "new_atoms", "encoded", "store_atoms"):
        assert getattr(local, name) == getattr(by_ray, name), name
    assert local.fingerprint_id == by_ray.fingerprint_id
    assert local.backends == by_ray.backends == ["transformers (configured)"]  # the backend and why, in the summary
    a, b = EmbeddingStore.read(ray_cfg.store.path), EmbeddingStore.read(local_cfg.store.path)
    np.testing.assert_array_equal(a.ids(), b.ids())
    np.testing.assert_allclose(a.lookup(a.ids()), b.lookup(a.ids()), rtol=1e-5, atol=1e-6)
    assert run_encode_local(local_cfg, device="cpu").new_atoms == 0


def test_two_encoder_actors_store_every_atom_once(ray_local: None, tmp_path: Path, ml_files: dict[str, str]) -> None:
    """The actor pool with 2 CPU actors (batches of 64 atoms, so both get work): every unique atom is encoded and
    written by exactly one actor. Exact: the part files on disk, all committed as written (no part the commit had
    to rewrite or skip for ids another actor already wrote), hold the unique atoms once each."""
    import pyarrow.dataset as pads

    cfg = make_config(tmp_path, ml_files, **{"encoder.num_actors": "2", "encoder.num_cpus_per_actor": "1",
                                             "encoder.batch_size": "64"})
    summary = run_encode(cfg)
    unique = expected_unique(ml_files)
    assert summary.unique_atoms == summary.new_atoms == summary.encoded == len(unique)
    store = EmbeddingStore.read(cfg.store.path)
    assert store.num_atoms == len(unique) and store.verify().ok
    written = sorted(p.name for p in (tmp_path / "store" / "parts").iterdir())
    assert written == sorted(p.name for p in store.parts) and len(written) >= 2
    ids = pads.dataset([str(tmp_path / "store" / "parts" / name) for name in written]).to_table(
        columns=["atom_id"]).column("atom_id").to_numpy()
    assert ids.size == len(unique) == np.unique(ids).size
    sample = store.ids()[::max(1, store.num_atoms // 20)]
    direct = build_encoder(cfg.encoder, device="cpu").encode(store.texts(sample))
    np.testing.assert_allclose(store.lookup(sample), direct, rtol=1e-5, atol=1e-5)
