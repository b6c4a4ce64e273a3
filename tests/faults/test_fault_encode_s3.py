"""The encode job writing its store to S3 while the network to S3 goes down and comes back.

How the outage is made: moto's server keeps objects in memory and has no persistence option
(moto 5.2: `moto_server --help` offers none), so stopping it would lose the bucket and test
nothing. Instead the job reaches moto through `CuttableProxy`, a TCP proxy on loopback: the
test cuts it (new connections refused, open ones reset mid-request) right after the first
manifest is committed, while parts are being written and committed, and restores it on the same
port a few seconds later. The server and its data stay, as they would in a real network outage.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import s3fs
from conftest import write_movielens_subset
from fault_helpers import CuttableProxy
from test_encode import expected_unique, make_config

from bahe_ray.config import Config
from bahe_ray.encode import EncodeSummary, run_encode
from bahe_ray.encoders.hf import TransformersEncoder
from bahe_ray.store import EmbeddingStore

OUTAGE_S = 5.0
USERS = 3  # 729 atoms: 23 parts of 32, each committed on its own


@pytest.fixture(scope="module")
def ml_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_movielens_subset(tmp_path_factory.mktemp("ml"), USERS)


def manifest_count(endpoint: str, bucket: str) -> int:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix="store/manifests/v")
    return listing.get("KeyCount", 0)


class EncodeInThread:
    """`run_encode(cfg)` in a thread; afterwards `summary` or `error` holds how it ended."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.summary: EncodeSummary | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = run_encode(self.cfg)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err


def test_s3_outage_while_committing_then_rerun(ray_local: None, s3_server, tmp_path: Path,
                                               ml_files: dict[str, str]) -> None:
    direct = s3_server.endpoint
    bucket = s3_server.new_bucket()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": direct})
    for name in ("events", "impressions"):
        fs.put(ml_files[name] + "/part-0.parquet", f"{bucket[5:]}/logs/{name}/part-0.parquet")
    proxy = CuttableProxy(s3_server.port)
    proxy.start()
    cfg = make_config(tmp_path, {"events": f"{bucket}/logs/events", "impressions": f"{bucket}/logs/impressions"}, **{
        "store.path": f"{bucket}/store", "rejects_path": f"{bucket}/rejects", "storage.endpoint_url": proxy.endpoint,
        "store.commit_every_parts": "1", "encoder.batch_size": "32",
    })
    unique = expected_unique(ml_files)

    job = EncodeInThread(cfg)
    deadline = time.time() + 300
    while manifest_count(direct, bucket[5:]) == 0:
        assert job.thread.is_alive() and time.time() < deadline, f"no commit before the outage ({job.error!r})"
        time.sleep(0.05)
    proxy.cut()
    assert job.thread.is_alive(), "the job ended before the outage"
    cut_at = manifest_count(direct, bucket[5:])
    time.sleep(OUTAGE_S)
    proxy.restore()
    job.thread.join(timeout=300)
    assert not job.thread.is_alive(), "the encode job hung after the outage"
    after = EmbeddingStore.read(cfg.store.path, cfg.storage)
    assert after.verify().ok, after.verify().problems  # whatever happened, the committed store is whole
    if job.error is None:  # the S3 clients' retries outlasted the outage
        assert job.summary is not None and after.num_atoms == len(unique)
    else:  # failed cleanly: an exception, and a smaller but consistent store
        assert 0 < after.num_atoms < len(unique)
    print(f"outage after {cut_at} manifest(s): job {'completed' if job.error is None else f'failed: {job.error!r:.300}'}; "
          f"{after.num_atoms}/{len(unique)} atoms committed")

    rerun = run_encode(cfg)
    assert rerun.new_atoms == len(unique) - after.num_atoms
    store = EmbeddingStore.read(cfg.store.path, cfg.storage)
    ids = store.ids()
    assert store.num_atoms == len(ids) == len(np.unique(ids)) == len(unique)
    texts = store.texts(ids)
    assert set(texts) == unique
    assert store.verify().ok, store.verify().problems
    np.testing.assert_allclose(store.lookup(ids), TransformersEncoder(cfg.encoder, "cpu").encode(texts),
                               rtol=1e-5, atol=1e-5)

    # Parts written but never committed (the outage's orphans) are not in any manifest: gc removes
    # only them, and the store reads the same afterwards.
    committed = {p.name for p in store.parts}
    on_s3 = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket[5:]}/store/parts", refresh=True)}
    assert committed <= on_s3
    removed = {p.rsplit("/", 1)[-1] for p in store.gc()}
    assert removed == on_s3 - committed
    again = EmbeddingStore.read(cfg.store.path, cfg.storage)
    assert again.verify().ok and again.num_atoms == len(unique)
    np.testing.assert_array_equal(again.ids(), ids)
