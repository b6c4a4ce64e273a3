"""The scorer's state caches and batched model call, without Ray: a small random BaheCTR on a real local store.

Served scores with the caches on, off, cold and warm equal `BaheCTR.forward` on the offline batch of
the same sample rows; a store version change empties the caches; the LRU keeps its bound. With shard
actors (local Ray) the scores equal those from the mapped store, and a commit reaches the scorer.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import BertConfig

from bahe_ray.config import ModelConfig, StoreReaderConfig
from bahe_ray.encoders.base import EncoderFingerprint
from bahe_ray.features import MissingVectorsError, bahe_batch, sample_arrays
from bahe_ray.models.backbone import backbone_from_config
from bahe_ray.models.ctr import BaheCTR
from bahe_ray.samples import hist_column
from bahe_ray.serve.batch import Loaded, Prepared, score_batch, warm_item_states
from bahe_ray.serve.cache import StateCache, StateCaches
from bahe_ray.serve.schema import ModelInfo
from bahe_ray.store import EmbeddingStore
from bahe_ray.store.sharded import ShardedStore

DIM, N, FIELDS = 32, 6, ["liked", "disliked"]
FP = EncoderFingerprint(model_name="tiny", weights_sha256="cd" * 32, k=1, pooling="mean", dtype="float32",
                        max_tokens=16)


def test_state_cache_is_a_bounded_lru_computing_only_misses() -> None:
    cache = StateCache(2, 3, "cpu")
    computed: list[list[int]] = []

    def compute(keys: list) -> torch.Tensor:
        computed.append(list(keys))
        return torch.tensor([[float(k)] * 3 for k in keys])

    states, hit = cache.states([1, 2], compute)
    assert computed == [[1, 2]] and not hit.any() and states[:, 0].tolist() == [1.0, 2.0]
    states, hit = cache.states([2, 3], compute)  # 2 cached; 3 evicts 1, the least recently used
    assert computed[-1] == [3] and hit.tolist() == [True, False] and states[:, 0].tolist() == [2.0, 3.0]
    cache.states([1], compute)
    assert computed[-1] == [1] and len(cache) == 2 and (cache.hits, cache.misses) == (1, 4)
    states, hit = cache.states([4, 5, 6], compute)  # more misses than room: all computed, the last 2 kept
    assert states[:, 0].tolist() == [4.0, 5.0, 6.0] and set(cache.slots) == {5, 6}
    off = StateCache(0, 3, "cpu")
    for _ in range(2):
        assert off.states([7], compute)[0][0, 0] == 7.0 and len(off) == 0


@pytest.fixture(scope="module")
def model() -> BaheCTR:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=DIM, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                        vocab_size=50, max_position_embeddings=64)
    net = BaheCTR(backbone_from_config(config), 1, len(FIELDS), ModelConfig(head_hidden=[16]))
    with torch.no_grad():  # non-zero field rows, so a state computed for the wrong field shows
        net.field_embedding.normal_(0, 0.5)
    return net.eval()


def write_store(path: str) -> None:
    """Atoms 1..40 with random vectors, committed as version 1."""
    writer = EmbeddingStore.open(path, FP, DIM)
    ids = np.arange(1, 41, dtype=np.int64)
    writer.add(ids, np.random.default_rng(1).standard_normal((40, DIM)).astype(np.float32), [f"a{i}" for i in ids])
    writer.commit()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingStore:
    path = str(tmp_path_factory.mktemp("store") / "store")
    write_store(path)
    return EmbeddingStore.read(path)


def loaded_with(model: BaheCTR, store: EmbeddingStore, items: int, users: int) -> Loaded:
    info = ModelInfo(kind="bahe", version="v", checkpoint="c", encoder_fingerprint=FP.id, fields=FIELDS,
                     max_behaviors=N, dim=DIM, store_path=store.path, store_version=store.version,
                     store_atoms=store.num_atoms)
    return Loaded(model, store, info, "cpu", None, StateCaches(items, users, DIM, "cpu"))


def requests_of(loaded: Loaded, seed: int) -> list[Prepared]:
    """Three users (one with an empty field), their candidates; two share a history."""
    rng = np.random.default_rng(seed)
    hist = lambda k: tuple(int(a) for a in rng.choice(np.arange(1, 41), k, replace=False))  # noqa: E731
    shared = [hist(N), hist(3)]
    users = [shared, [hist(2), ()], shared]
    empty = np.zeros(0, np.int64), np.zeros((0, DIM), np.float32)
    return [Prepared(loaded, u, [int(a) for a in rng.integers(1, 41, 5)], *empty) for u in users]


def offline_scores(model: BaheCTR, store: EmbeddingStore, requests: list[Prepared]) -> np.ndarray:
    """BaheCTR.forward on the sample rows offline evaluation builds: one per candidate."""
    rows = [(list(h), item) for r in requests for item in r.items for h in [r.histories]]
    table = pa.table({
        "user_id": [str(i) for i in range(len(rows))],
        "item_atom_id": pa.array([item for _, item in rows], pa.int64()),
        **{hist_column(f): pa.array([list(h[j]) for h, _ in rows], pa.list_(pa.int64())) for j, f in enumerate(FIELDS)},
    })
    batch = bahe_batch(sample_arrays(table, FIELDS, N), store)
    with torch.inference_mode():
        return torch.sigmoid(model(batch.tensors, padded=batch.padded)).numpy()


@pytest.mark.parametrize("capacity", [0, 4, 1000])
def test_cached_scores_equal_the_offline_forward(model: BaheCTR, store: EmbeddingStore, capacity: int) -> None:
    """Off (0), too small to hold a batch (4: every call evicts), large: cold and warm calls all match."""
    loaded = loaded_with(model, store, capacity, capacity)
    for seed in (0, 0, 1, 0):
        requests = requests_of(loaded, seed)
        served = np.concatenate([s.scores for s in score_batch(requests)])
        np.testing.assert_allclose(served, offline_scores(model, store, requests), atol=1e-6, rtol=0)
    warm = score_batch(requests_of(loaded, 0))
    cached = sum(s.item_states_cached for s in warm), sum(s.user_states_cached for s in warm)
    if capacity in (0, 1000):
        assert cached == ((15, 6) if capacity else (0, 0))
    assert all(s.batch_requests == 3 and s.store_version == store.version for s in warm)


def test_new_store_version_empties_the_caches(model: BaheCTR, store: EmbeddingStore) -> None:
    loaded = loaded_with(model, store, 1000, 1000)
    assert warm_item_states(loaded) == 40 and len(loaded.caches.items) == 40
    requests = requests_of(loaded, 2)
    first = score_batch(requests)
    assert sum(s.item_states_cached for s in first) == 15  # every item was warmed
    writer = EmbeddingStore.read(store.path)
    writer.add(np.array([99], np.int64), np.ones((1, DIM), np.float32), ["new"])
    writer.commit()
    store.refresh()
    again = score_batch(requests)
    assert loaded.caches.invalidations == 1 and loaded.caches.store_version == store.version
    assert sum(s.item_states_cached + s.user_states_cached for s in again) == 0  # all computed again
    assert all(s.store_version == store.version for s in again)
    np.testing.assert_allclose(np.concatenate([s.scores for s in again]),
                               np.concatenate([s.scores for s in first]), atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_caches_on_the_gpu_under_bf16_autocast(model: BaheCTR, store: EmbeddingStore) -> None:
    """The Scorer's GPU path (serve.use_gpu, precision auto): states cached on the device, bf16 autocast; the
    scores stay near the fp32 offline ones (bf16 rounding) and warm equals cold."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu = copy.deepcopy(model).cuda()
    info = loaded_with(model, store, 0, 0).info
    loaded = Loaded(gpu, store, info, "cuda", torch.bfloat16, StateCaches(1000, 1000, DIM, "cuda"))
    requests = requests_of(loaded, 3)
    cold = np.concatenate([s.scores for s in score_batch(requests)])
    warm = score_batch(requests)
    assert sum(s.item_states_cached for s in warm) == 15 and loaded.caches.items.rows.is_cuda
    np.testing.assert_allclose(np.concatenate([s.scores for s in warm]), cold, atol=1e-6, rtol=0)
    np.testing.assert_allclose(cold, offline_scores(model, store, requests), atol=2e-2, rtol=0)


def test_sharded_scorer_equals_the_mapped_store_and_follows_a_commit(
    model: BaheCTR, tmp_path: Path, ray_local: None
) -> None:
    """The scorer reading 2 shard actors: the scores of the mapped store, no layout mapped, and a commit (atom 99,
    unknown before) reaches it within store.reader.refresh_s, emptying its caches."""
    path = str(tmp_path / "store")
    write_store(path)
    mapped = loaded_with(model, EmbeddingStore.read(path), 1000, 1000)
    store = EmbeddingStore.read(path, reader=StoreReaderConfig(cache_dir=str(tmp_path / "cache"), refresh_s=0.2))
    sharded = replace(loaded_with(model, store, 1000, 1000), sharded=ShardedStore(store, shards=2))
    assert warm_item_states(sharded) == 40
    for seed in (0, 1, 0):
        got = score_batch(requests_of(sharded, seed))
        want = score_batch(requests_of(mapped, seed))
        np.testing.assert_allclose(np.concatenate([s.scores for s in got]), np.concatenate([s.scores for s in want]),
                                   atol=1e-5, rtol=0)
    late = [replace(r, items=[*r.items, 99], histories=[(*r.histories[0][1:], 99), *r.histories[1:]])
            for r in requests_of(sharded, 2)]
    with pytest.raises(MissingVectorsError):  # neither stored nor encoded
        score_batch(late)
    writer = EmbeddingStore.read(path)
    writer.add(np.array([99], np.int64), np.ones((1, DIM), np.float32), ["new"])
    writer.commit()
    time.sleep(0.3)  # past refresh_s: the next lookup (the Scorer's stored-or-not check) moves the shards, the store
    assert sharded.vectors.lookup_with_mask(np.array([99, 1000]))[1].tolist() == [True, False]
    got = score_batch(late)
    assert store.version == 2 and all(s.store_version == 2 for s in got)
    assert sharded.caches.invalidations == 1 and sum(s.item_states_cached for s in got) == 0
    mapped.store.refresh()
    want = score_batch([replace(r, loaded=mapped) for r in late])
    np.testing.assert_allclose(np.concatenate([s.scores for s in got]), np.concatenate([s.scores for s in want]),
                               atol=1e-5, rtol=0)
    assert not (tmp_path / "cache").exists()  # the sharded scorer mapped no layout
