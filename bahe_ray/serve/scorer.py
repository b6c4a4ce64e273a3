"""The Scorer deployment: a BAHE checkpoint and its embedding store answering ScoreRequests, many per
model call, plus the AtomEncoder deployment for atoms the store lacks.

A request becomes what offline evaluation makes of it, one sample row per candidate: the most
recent N atom ids per field and the candidate's item atom. The model call (`batch.score_batch`)
takes item and user states from the checkpoint's state caches (`cache.StateCaches`), runs the
misses through the upper layers and then the head, so a served score equals the offline one
(within float noise; exactly the same code with the caches off). The checkpoint, the store and
the online encoder must share one encoder fingerprint (`ensure_compatible`): vectors of
different encoders must not mix.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from bahe_ray.atoms import atom_ids
from bahe_ray.checkpoint import load_checkpoint, read_meta
from bahe_ray.config import Config
from bahe_ray.encoders import build_encoder
from bahe_ray.encoders.base import ensure_compatible
from bahe_ray.serve.batch import Loaded, Prepared, Scored, score_batch, warm_item_states
from bahe_ray.serve.cache import StateCaches
from bahe_ray.serve.http import RETRY_AFTER_S, ScorerCalls, make_api
from bahe_ray.serve.schema import ModelInfo, RequestError, ScoreTimings
from bahe_ray.store import EmbeddingStore
from bahe_ray.store.sharded import open_sharded
from bahe_ray.train.step import autocast_dtype

log = logging.getLogger(__name__)


class ScorerConfig(BaseModel):
    """The Scorer's user_config: which checkpoint to serve. Changing it rolls the new one out in place."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str


def scorer_device(cfg: Config) -> str:
    """cuda with serve.use_gpu (an error without a visible GPU), else cpu."""
    if cfg.serve.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("serve.use_gpu is set but this Scorer replica sees no CUDA device")
    return "cuda" if cfg.serve.use_gpu else "cpu"


def load_scorer_state(checkpoint: str, cfg: Config, encoder_fingerprint: str) -> Loaded:
    """Load a checkpoint and its store, checking they and the online encoder share one fingerprint; new,
    empty state caches (filled with the store's item states first with serve.warm_items). Vectors come from
    the node layout, or from shard actors when `shard_count` says so (the store then reads only manifests)."""
    device = scorer_device(cfg)
    model, meta = load_checkpoint(checkpoint, cfg.storage, device)
    if meta.model_kind != "bahe" or meta.store_path is None:
        raise ValueError(f"checkpoint {checkpoint}: a {meta.model_kind} model; the scorer serves BAHE checkpoints")
    store = EmbeddingStore.read(meta.store_path, cfg.storage, cfg.store.reader)
    ensure_compatible(
        f"checkpoint {checkpoint}",
        {"checkpoint": meta.encoder_fingerprint_id, "store": store.fingerprint, "online encoder": encoder_fingerprint},
    )
    info = ModelInfo(
        kind=meta.model_kind,
        version=meta.model_sha256[:16],
        checkpoint=checkpoint,
        encoder_fingerprint=store.fingerprint_id,
        fields=meta.fields,
        max_behaviors=meta.max_behaviors,
        dim=meta.dim,
        store_path=meta.store_path,
        store_version=store.version,
        store_atoms=store.num_atoms,
    )
    caches = StateCaches(cfg.serve.item_cache_size, cfg.serve.user_cache_size, meta.dim, device)
    sharded = open_sharded(store, cfg.store.reader)
    loaded = Loaded(model.eval(), store, info, device, autocast_dtype(cfg.serve.precision, device), caches, sharded)
    loaded.vectors.lookup_with_mask(np.zeros(0, np.int64))  # map the layout (reach the shards) now, not on a request
    if cfg.serve.warm_items:
        log.info("warm item states: %d atoms", warm_item_states(loaded))
    log.info("loaded checkpoint %s (version %s, store v%d, %d shards)", checkpoint, info.version, info.store_version,
             sharded.shards if sharded else 0)
    return loaded


@serve.deployment(ray_actor_options={"num_cpus": 0.5})  # mostly idle: only atoms the store lacks
class AtomEncoder:
    """The shallow encoder of the served checkpoint, for atoms its store lacks, with an LRU cache.

    Refuses to start when its fingerprint differs from the store's: its vectors would not be the
    ones the model was trained on.
    """

    def __init__(self, cfg: Config) -> None:
        meta = read_meta(cfg.serve.checkpoint, cfg.storage)
        if meta.store_path is None:
            raise ValueError(f"checkpoint {cfg.serve.checkpoint} records no embedding store")
        store = EmbeddingStore.read(meta.store_path, cfg.storage)
        self.encoder = build_encoder(meta.cfg.encoder, storage=cfg.storage)
        ensure_compatible("AtomEncoder", {"store": store.fingerprint, "online encoder": self.encoder.fingerprint})
        self.cache_size = cfg.serve.encoder_cache_size
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.lock = asyncio.Lock()

    def fingerprint(self) -> str:
        return self.encoder.fingerprint.id

    async def encode(self, ids: list[int], texts: list[str]) -> np.ndarray:
        """Vectors (len(ids), dim) float32 of atoms (ids with their normalised texts), cached by id."""
        out = np.empty((len(ids), self.encoder.dim), np.float32)
        todo = []
        for row, atom in enumerate(ids):
            if atom in self.cache:
                self.cache.move_to_end(atom)
                out[row] = self.cache[atom]
            else:
                todo.append(row)
        if todo:
            async with self.lock:  # one encoder call at a time: they share the cores / GPU
                fresh = await asyncio.to_thread(self.encoder.encode, [texts[row] for row in todo])
            out[todo] = fresh
            for row, vector in zip(todo, fresh):
                self.cache[ids[row]] = vector.copy()  # not a view: evicted rows must free their memory
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return out


class ScorerReplica:
    """Scores requests with the checkpoint of its user_config, many requests per model call."""

    def __init__(self, cfg: Config, encoder: DeploymentHandle) -> None:
        self.cfg, self.encoder = cfg, encoder
        self.loaded: Loaded | None = None
        self.rollout_error: str | None = None
        self._score_batch.set_max_batch_size(cfg.serve.batch_max_size)
        self._score_batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the configured checkpoint beside the current one, then swap (requests keep flowing).

        A checkpoint that fails to load (or to match the store and encoder) fails a starting
        replica, but a serving one keeps its model and reports the error in `info`: raising
        here would make Serve replace every serving replica with ones that cannot start.
        """
        try:
            checkpoint = ScorerConfig.model_validate(user_config).checkpoint
            if self.loaded is not None and self.loaded.info.checkpoint == checkpoint:
                return
            fingerprint = await self.encoder.fingerprint.remote()
            self.loaded = await asyncio.to_thread(load_scorer_state, checkpoint, self.cfg, fingerprint)
            self.rollout_error = None
        except Exception as err:  # noqa: BLE001 - any failure: keep serving the loaded model
            if self.loaded is None:
                raise
            self.rollout_error = f"{type(err).__name__}: {err}"
            log.error("rollout of %s failed; still serving %s: %s", user_config, self.loaded.info.checkpoint, err)

    def current(self) -> Loaded:
        if self.loaded is None:
            raise RuntimeError("no checkpoint loaded")
        return self.loaded

    def check_health(self) -> None:
        """Serve's periodic health check: unhealthy (restarted) without a loaded checkpoint."""
        self.current()

    async def info(self) -> ModelInfo:
        loaded = self.current()
        store = {"store_version": loaded.store.version, "store_atoms": loaded.store.num_atoms}
        return loaded.info.model_copy(update={"rollout_error": self.rollout_error, **store})

    async def stats(self) -> dict[str, Any]:
        """This replica's model version and state caches (sizes, hits, misses, store version, invalidations)."""
        loaded = self.current()
        return {"model_version": loaded.info.version, "device": loaded.device, **loaded.caches.stats()}

    async def score(self, req: dict[str, Any]) -> dict[str, Any]:
        """Scores of one request, a validated ScoreRequest as plain data (`model_dump()`), answered as a
        ScoreResponse's plain data: plain types cross the handle call several times faster than pydantic
        models. Raises RequestError for fields or atom ids the model cannot read."""
        start = time.perf_counter()
        loaded = self.current()
        prepared = await self._prepare(loaded, req)
        queued = time.perf_counter()
        scored: Scored = await self._score_batch(prepared)
        done = time.perf_counter()
        info = loaded.info
        timings = ScoreTimings(
            scorer_ms=1000 * (done - start),
            queue_ms=1000 * (done - queued) - scored.model_ms,
            model_ms=scored.model_ms,
            batch_requests=scored.batch_requests,
            item_states_cached=scored.item_states_cached,
            user_states_cached=scored.user_states_cached,
            **prepared.timings,
        )
        scores = scored.scores.tolist()
        return {
            "request_id": req["request_id"],
            "scores": [{"item_id": c["item_id"], "score": s} for c, s in zip(req["candidates"], scores)],
            "model_version": info.version,
            "encoder_fingerprint": info.encoder_fingerprint,
            "store_version": scored.store_version,
            "atoms_encoded": len(prepared.encoded_ids),
            "timings": timings.model_dump(),
        }

    async def _prepare(self, loaded: Loaded, req: dict[str, Any]) -> Prepared:
        """Atom ids per field (most recent N kept) and per candidate; atoms the store lacks are encoded."""
        start = time.perf_counter()
        fields, n = loaded.info.fields, loaded.info.max_behaviors
        behaviors, behavior_ids, candidates = req["behaviors"], req["behavior_ids"], req["candidates"]
        for kind, given in (("behaviors", behaviors), ("behavior_ids", behavior_ids)):
            for name in given:
                if name not in fields:
                    raise RequestError(f"{kind}.{name}", f"unknown behaviour field {name!r}; this model reads {fields}")
        # (atom id, text or None, where in the request) of everything the model will read
        atoms: list[tuple[int, str | None, str]] = []
        histories: list[tuple[int, ...]] = []
        for name in fields:
            if name in behaviors:
                texts = behaviors[name]
                start_at = max(len(texts) - n, 0)
                kept = texts[start_at:]
                ids = atom_ids(kept).tolist()
                atoms += [(a, t, f"behaviors.{name}[{start_at + i}]") for i, (a, t) in enumerate(zip(ids, kept))]
            else:
                given_ids = behavior_ids.get(name, [])
                start_at = max(len(given_ids) - n, 0)
                ids = given_ids[start_at:]
                atoms += [(a, None, f"behavior_ids.{name}[{start_at + i}]") for i, a in enumerate(ids)]
            histories.append(tuple(ids))
        text_ids = iter(atom_ids([c["text"] for c in candidates if c["text"] is not None]).tolist())
        items = [c["atom_id"] if c["text"] is None else next(text_ids) for c in candidates]
        atoms += [(a, c["text"], f"candidates[{i}].atom_id") for i, (a, c) in enumerate(zip(items, candidates))]
        _, found = loaded.vectors.lookup_with_mask(np.array([a for a, _, _ in atoms], np.int64))
        new: dict[int, str] = {}
        for (atom, text, where), stored in zip(atoms, found.tolist()):
            if stored:
                continue
            if text is None:
                version = loaded.store.version
                raise RequestError(where, f"atom id {atom} is not in the store (v{version}); send its text")
            new[atom] = text
        encoded_ids = np.array(list(new), np.int64)
        encoded = np.zeros((0, loaded.info.dim), np.float32)
        encoding = time.perf_counter()
        if new:
            encoded = await self.encoder.encode.remote(list(new), list(new.values()))
        timings = {"prepare_ms": 1000 * (encoding - start), "encode_ms": 1000 * (time.perf_counter() - encoding)}
        return Prepared(loaded, histories, items, encoded_ids, encoded, timings)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[Prepared]) -> list[Scored]:
        """One model call per checkpoint among the batched requests (one unless a rollout is under way)."""
        return await asyncio.to_thread(score_batch, requests)


class ScorerWithHttp(ScorerReplica):
    """A Scorer replica that serves the HTTP API itself (`serve.ingress: scorer`): no Ingress deployment and
    no handle call per request, so less CPU per request where the scorer's cores are the limit."""

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(ScorerCalls(self.score, self.info, self.stats), self.cfg.serve)


_SCORER_DEPLOYMENT: dict[str, Any] = {
    "name": "Scorer",  # both kinds: a Serve config's `- name: Scorer` entry sets their options
    "max_ongoing_requests": 32,
    "max_queued_requests": 64,
    "backpressure_config": BackpressureConfig(retry_after_s=RETRY_AFTER_S),
    "ray_actor_options": {"num_cpus": 1},
}
Scorer = serve.deployment(**_SCORER_DEPLOYMENT)(ScorerReplica)
HttpScorer = serve.deployment(**_SCORER_DEPLOYMENT)(serve.ingress()(ScorerWithHttp))
