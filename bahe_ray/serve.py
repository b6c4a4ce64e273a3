"""Ray Serve scorer: `POST /v1/score` answers the CTR scores offline evaluation gives.

Three deployments composed with handles (the HTTP proxy calls the ingress):

    Ingress ──────────────────> Scorer ─────────────────────────> AtomEncoder
    FastAPI: parse, validate,   checkpoint + embedding store;     shallow encoder for atoms the
    limits, error bodies        @serve.batch: one model call      store lacks, LRU cache; refuses
                                for many requests                 to start on another fingerprint

A request carries one user's behaviours per field (texts, or atom ids of texts already in the
store), oldest first as in training, and the candidates to score. Texts are normalised and
hashed exactly as offline (`bahe_ray.atoms`); each field keeps its most recent N (the
checkpoint's max_behaviors). Every candidate becomes one sample row of the offline sample table
and goes through the same `features.sample_arrays` -> `features.bahe_batch` -> model path as
offline evaluation, so a served score equals the offline one (within float noise); atoms not
in the store are encoded by the same encoder, whose fingerprint must equal the store's.

A new checkpoint rolls out through the Scorer's `user_config` ({"checkpoint": path}): the
replica loads it beside the old one and swaps; requests prepared on the old one finish on it.

Entry points: `build_app` (Serve's import path with args {config: PROFILE}, as in
serve_configs/*.yaml), `scorer_app(cfg, loader)` (tests hand it a loader), `serve_blocking`
(`bahe serve`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bahe_ray.atoms import atom_ids, is_utf8, normalize_text
from bahe_ray.checkpoint import CheckpointMeta, load_checkpoint, read_meta
from bahe_ray.config import Config, ServeConfig, StorageConfig, load_config
from bahe_ray.encoders import build_encoder
from bahe_ray.encoders.base import ensure_compatible
from bahe_ray.features import bahe_batch, sample_arrays
from bahe_ray.samples import hist_column
from bahe_ray.store import EmbeddingStore

log = logging.getLogger(__name__)

APP_NAME = "scorer"
RETRY_AFTER_S = 1.0  # Retry-After on shed load (503)
_REPLICA_RETRIES = 2  # scoring is idempotent: retry a call whose replica died under it

# ---- request and response schema -------------------------------------------------------------


def _utf8(text: str) -> str:
    """Refuse lone surrogates (JSON escapes such as \\ud800): not text, and they cannot be encoded in a reply."""
    if not is_utf8(text):
        raise ValueError("not valid UTF-8 (a lone surrogate escape)")
    return text


def _normalized(text: str) -> str:
    out = normalize_text(_utf8(text))
    if not out:
        raise ValueError("text is empty after whitespace normalisation")
    return out


Utf8Str = Annotated[str, AfterValidator(_utf8)]
BehaviorText = Annotated[str, AfterValidator(_normalized)]
AtomId = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Body(BaseModel):
    """Request parts: unknown keys and type coercions (e.g. "1" for 1) are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Candidate(_Body):
    """One item to score: its text (encoded online if the store lacks it) or its atom id."""

    item_id: Utf8Str = Field(min_length=1)
    text: BehaviorText | None = None
    atom_id: AtomId | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Candidate:
        if (self.text is None) == (self.atom_id is None):
            raise ValueError("give exactly one of text or atom_id")
        return self


class ScoreRequest(_Body):
    """One user's behaviours (per field, oldest first) and the candidates to score for them.

    A field is given as texts in `behaviors` or as atom ids (of texts already in the store) in
    `behavior_ids`, not both. Fields left out have no behaviours. Beyond the model's N per
    field, the most recent N are kept.
    """

    behaviors: dict[Utf8Str, list[BehaviorText]] = {}
    behavior_ids: dict[Utf8Str, list[AtomId]] = {}
    candidates: list[Candidate] = Field(min_length=1)
    request_id: Utf8Str | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "behaviors": {
                    "liked": ["rated 5/5: Toy Story (1995) | Animation, Children's, Comedy"],
                    "disliked": ["rated 1/5: Jaws (1975) | Action, Horror"],
                },
                "candidates": [{"item_id": "50", "text": "Star Wars (1977) | Action, Adventure, Sci-Fi"}],
                "request_id": "r-1",
            }
        }
    )


class CandidateScore(BaseModel):
    item_id: str
    score: float  # click probability: sigmoid of the model's logit


class ScoreResponse(BaseModel):
    request_id: str | None
    scores: list[CandidateScore]  # one per candidate, in request order
    model_version: str
    encoder_fingerprint: str
    store_version: int
    atoms_encoded: int  # atoms of this request missing from the store, encoded online


class ModelInfo(BaseModel):
    kind: str
    version: str
    checkpoint: str
    encoder_fingerprint: str
    fields: list[str]
    max_behaviors: int
    dim: int
    store_path: str
    store_version: int
    store_atoms: int
    rollout_error: str | None = None  # the last user_config checkpoint this replica could not load


class FieldError(BaseModel):
    field: str  # e.g. "candidates[3].text", "behaviors.liked[0]", "body"
    error: str  # "<field>: <what is wrong>"
    type: str

    @classmethod
    def at(cls, field: str, message: str, type: str) -> FieldError:
        return cls(field=field, error=f"{field}: {message}", type=type)


class ErrorBody(BaseModel):
    """Every 4xx/5xx body: the first problem flattened, then all of them."""

    error: str
    field: str
    type: str
    errors: list[FieldError]


class RequestError(ValueError):
    """A client error found after parsing; answered with `status` and the offending field."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(field, message, status)
        self.field, self.message, self.status = field, message, status


def check_limits(req: ScoreRequest, limits: ServeConfig) -> None:
    """Raise RequestError for the first part of `req` beyond a ServeConfig limit."""
    if len(req.candidates) > limits.max_candidates:
        raise RequestError("candidates", f"{len(req.candidates)} candidates; at most {limits.max_candidates}")
    if twice := sorted(req.behaviors.keys() & req.behavior_ids.keys()):
        raise RequestError(f"behavior_ids.{twice[0]}", f"field {twice[0]!r} is also in behaviors; send it one way")
    histories: list[tuple[str, Sequence[Any]]] = [
        *((f"behaviors.{k}", v) for k, v in req.behaviors.items()),
        *((f"behavior_ids.{k}", v) for k, v in req.behavior_ids.items()),
    ]
    for where, values in histories:
        if len(values) > limits.max_behaviors_per_field:
            raise RequestError(where, f"{len(values)} behaviours; at most {limits.max_behaviors_per_field} per field")
    texts = [(f"behaviors.{k}[{i}]", t) for k, v in req.behaviors.items() for i, t in enumerate(v)]
    for i, c in enumerate(req.candidates):
        texts += [(f"candidates[{i}].item_id", c.item_id), (f"candidates[{i}].text", c.text or "")]
    texts.append(("request_id", req.request_id or ""))
    for where, text in texts:
        if len(text) > limits.max_text_chars:
            raise RequestError(where, f"{len(text)} characters; at most {limits.max_text_chars}")


# ---- HTTP layer ------------------------------------------------------------------------------


def field_path(loc: Sequence[str | int]) -> str:
    """Pydantic's loc ("body", "candidates", 3, "text") as "candidates[3].text"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out or "body"


def error_response(status: int, errors: list[FieldError], headers: dict[str, str] | None = None) -> JSONResponse:
    first = errors[0]
    body = ErrorBody(error=first.error, field=first.field, type=first.type, errors=errors)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    """Pydantic's errors, one per offending field; malformed JSON is 400, the rest 422."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for e in exc.errors()[:20]:
        if e["type"] == "json_invalid":
            message = f"malformed JSON at byte {e['loc'][-1]}: {e['ctx']['error']}"
            errors.append(FieldError.at("body", message, e["type"]))
        else:
            errors.append(FieldError.at(field_path(e["loc"]), e["msg"], e["type"]))
    return error_response(400 if errors[0].type == "json_invalid" else 422, errors)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's and FastAPI's own errors as ErrorBody: 404 (path), 405 (method), and 400 for a body
    that fails to decode other than by a JSON syntax error (invalid UTF-8, nesting too deep, an
    integer of more than 4300 digits)."""
    assert isinstance(exc, HTTPException)
    field = {404: "path", 405: "method"}.get(exc.status_code, "body")
    cause = exc.__cause__
    message = str(exc.detail) if cause is None else f"not decodable as JSON ({type(cause).__name__}: {str(cause)[:100]})"
    return error_response(exc.status_code, [FieldError.at(field, message, "http_error")], exc.headers)


async def _request_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return error_response(exc.status, [FieldError.at(exc.field, exc.message, "invalid")])


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes` (declared or streamed) before anything parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, [FieldError.at("body", f"larger than {self.max_bytes} bytes", "too_large")])
        await response(scope, receive, send)


async def call_with_retry(call: Callable[[], Awaitable[Any]]) -> Any:
    """`call()`, again after a short pause when its replica died or became unreachable under it."""
    for attempt in range(1, _REPLICA_RETRIES + 1):
        try:
            return await call()
        except (RayActorError, ActorUnavailableError):
            log.warning("scorer replica lost; retrying (%d/%d)", attempt, _REPLICA_RETRIES)
            await asyncio.sleep(0.5 * attempt)
    return await call()


async def _replica_lost(_: Request, exc: Exception) -> JSONResponse:
    error = FieldError.at("scorer", f"unavailable, retry later ({type(exc).__name__})", "unavailable")
    return error_response(503, [error], {"Retry-After": str(math.ceil(RETRY_AFTER_S))})


def make_api(scorer: DeploymentHandle, limits: ServeConfig) -> FastAPI:
    """The FastAPI app of the ingress: routes, body limit, error shapes (OpenAPI at /openapi.json, /docs)."""
    api = FastAPI(
        title="bahe-ray scorer",
        description=(
            "BAHE CTR scores for one user's behaviours and a list of candidates. Limits: "
            f"{limits.max_candidates} candidates, {limits.max_behaviors_per_field} behaviours per field, "
            f"{limits.max_text_chars} characters per text, {limits.max_request_bytes} bytes per body."
        ),
        version="1",
    )
    api.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(RequestError, _request_error)
    for lost in (RayActorError, ActorUnavailableError):
        api.add_exception_handler(lost, _replica_lost)
    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "malformed JSON"},
        413: {"model": ErrorBody, "description": "body larger than the limit"},
        422: {"model": ErrorBody, "description": "a field is missing, of the wrong type or beyond a limit"},
        503: {"model": ErrorBody, "description": "overloaded or restarting: retry after Retry-After seconds"},
    }

    @api.post("/v1/score", responses=errors)
    async def score(body: ScoreRequest) -> ScoreResponse:
        """One score per candidate, in order, from the current checkpoint."""
        check_limits(body, limits)
        return await call_with_retry(lambda: scorer.score.remote(body))

    @api.get("/v1/model", responses=errors)
    async def model() -> ModelInfo:
        """The checkpoint being served and the store it reads."""
        return await call_with_retry(lambda: scorer.info.remote())

    @api.get("/healthz", responses=errors)
    async def healthz() -> dict[str, str]:
        """200 while a scorer replica answers with a loaded model."""
        info: ModelInfo = await call_with_retry(lambda: scorer.info.remote())
        return {"status": "ok", "model_version": info.version}

    return api


# ---- deployments -----------------------------------------------------------------------------


@serve.deployment(
    max_ongoing_requests=256,
    max_queued_requests=256,
    backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S),
    # A redeploy replaces the Scorer too: requests already here wait for the new one to load.
    graceful_shutdown_timeout_s=60,
    ray_actor_options={"num_cpus": 0.1},
)
@serve.ingress()
class Ingress:
    """HTTP ingress: validation and limits here, scoring on the Scorer."""

    def __init__(self, scorer: DeploymentHandle, limits: ServeConfig) -> None:
        self.scorer, self.limits = scorer, limits

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.scorer, self.limits)


class _StoreAndEncoded:
    """A features.VectorSource: the store, then the vectors encoded online for this batch."""

    def __init__(self, store: EmbeddingStore, ids: np.ndarray, vectors: np.ndarray) -> None:
        order = np.argsort(ids)
        self.store, self.ids, self.vectors = store, ids[order], vectors[order]

    def lookup_with_mask(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors, found = self.store.lookup_with_mask(ids)
        if self.ids.size:
            pos = np.minimum(np.searchsorted(self.ids, ids), self.ids.size - 1)
            fresh = ~found & (self.ids[pos] == ids)
            vectors[fresh] = self.vectors[pos[fresh]]
            found = found | fresh
        return vectors, found


@dataclass(frozen=True)
class _Loaded:
    """One checkpoint with the store it reads; reconfigure swaps the whole of it at once."""

    model: torch.nn.Module
    store: EmbeddingStore
    info: ModelInfo
    device: torch.device


@dataclass(frozen=True)
class _Prepared:
    """One request as sample rows (one per candidate) of the offline sample table, on one checkpoint."""

    loaded: _Loaded
    table: pa.Table
    encoded_ids: np.ndarray
    encoded: np.ndarray  # (len(encoded_ids), dim) vectors of atoms the store lacks


CheckpointLoader = Callable[[str, StorageConfig, str], tuple[torch.nn.Module, CheckpointMeta]]


class ScorerConfig(BaseModel):
    """The Scorer's user_config: which checkpoint to serve. Changing it rolls the new one out in place."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str


def load_scorer_state(checkpoint: str, cfg: Config, loader: CheckpointLoader, encoder_fingerprint: str) -> _Loaded:
    """Load a checkpoint and its store, checking they and the online encoder share one fingerprint."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = loader(checkpoint, cfg.storage, str(device))
    if meta.model_kind != "bahe" or meta.store_path is None:
        raise ValueError(f"checkpoint {checkpoint}: a {meta.model_kind} model; the scorer serves BAHE checkpoints")
    store = EmbeddingStore.read(meta.store_path, cfg.storage)
    ensure_compatible(
        f"checkpoint {checkpoint}",
        {"checkpoint": meta.encoder_fingerprint_id, "store": store.fingerprint, "online encoder": encoder_fingerprint},
    )
    store.lookup_with_mask(np.zeros(0, np.int64))  # load the lookup table now, not on the first request
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
    log.info("loaded checkpoint %s (version %s, store v%d)", checkpoint, info.version, info.store_version)
    return _Loaded(model.eval(), store, info, device)


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


@serve.deployment(
    max_ongoing_requests=32,
    max_queued_requests=64,
    backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S),
    ray_actor_options={"num_cpus": 1},
)
class Scorer:
    """Scores requests with the checkpoint of its user_config, many requests per model call."""

    def __init__(self, cfg: Config, encoder: DeploymentHandle, loader: CheckpointLoader = load_checkpoint) -> None:
        self.cfg, self.encoder, self.loader = cfg, encoder, loader
        self.loaded: _Loaded | None = None
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
            self.loaded = await asyncio.to_thread(load_scorer_state, checkpoint, self.cfg, self.loader, fingerprint)
            self.rollout_error = None
        except Exception as err:  # noqa: BLE001 - any failure: keep serving the loaded model
            if self.loaded is None:
                raise
            self.rollout_error = f"{type(err).__name__}: {err}"
            log.error("rollout of %s failed; still serving %s: %s", user_config, self.loaded.info.checkpoint, err)

    def current(self) -> _Loaded:
        if self.loaded is None:
            raise RuntimeError("no checkpoint loaded")
        return self.loaded

    def check_health(self) -> None:
        """Serve's periodic health check: unhealthy (restarted) without a loaded checkpoint."""
        self.current()

    def info(self) -> ModelInfo:
        return self.current().info.model_copy(update={"rollout_error": self.rollout_error})

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        """Scores of one request; raises RequestError for fields or atom ids the model cannot read."""
        prepared = await self._prepare(self.current(), req)
        scores = await self._score_batch(prepared)
        info = prepared.loaded.info
        return ScoreResponse(
            request_id=req.request_id,
            scores=[CandidateScore(item_id=c.item_id, score=float(s)) for c, s in zip(req.candidates, scores)],
            model_version=info.version,
            encoder_fingerprint=info.encoder_fingerprint,
            store_version=info.store_version,
            atoms_encoded=len(prepared.encoded_ids),
        )

    async def _prepare(self, loaded: _Loaded, req: ScoreRequest) -> _Prepared:
        """Atom ids per field (most recent N kept) and per candidate; atoms the store lacks are encoded."""
        fields, n = loaded.info.fields, loaded.info.max_behaviors
        for kind, given in (("behaviors", req.behaviors), ("behavior_ids", req.behavior_ids)):
            for name in given:
                if name not in fields:
                    raise RequestError(f"{kind}.{name}", f"unknown behaviour field {name!r}; this model reads {fields}")
        # (atom id, text or None, where in the request) of everything the model will read
        atoms: list[tuple[int, str | None, str]] = []
        histories: dict[str, list[int]] = {}
        for name in fields:
            if name in req.behaviors:
                texts = req.behaviors[name]
                start = max(len(texts) - n, 0)
                ids = atom_ids(texts[start:]).tolist()
                atoms += [(a, t, f"behaviors.{name}[{start + i}]") for i, (a, t) in enumerate(zip(ids, texts[start:]))]
            else:
                given_ids = req.behavior_ids.get(name, [])
                start = max(len(given_ids) - n, 0)
                ids = given_ids[start:]
                atoms += [(a, None, f"behavior_ids.{name}[{start + i}]") for i, a in enumerate(ids)]
            histories[name] = ids
        items = [c.atom_id if c.text is None else int(atom_ids([c.text])[0]) for c in req.candidates]
        atoms += [(a, c.text, f"candidates[{i}].atom_id") for i, (a, c) in enumerate(zip(items, req.candidates))]
        _, found = loaded.store.lookup_with_mask(np.array([a for a, _, _ in atoms], np.int64))
        new: dict[int, str] = {}
        for (atom, text, where), stored in zip(atoms, found.tolist()):
            if stored:
                continue
            if text is None:
                version = loaded.info.store_version
                raise RequestError(where, f"atom id {atom} is not in the store (v{version}); send its text")
            new[atom] = text
        encoded_ids = np.array(list(new), np.int64)
        encoded = np.zeros((0, loaded.info.dim), np.float32)
        if new:
            encoded = await self.encoder.encode.remote(list(new), list(new.values()))
        rows = len(req.candidates)
        table = pa.table(
            {
                "user_id": pa.array([req.request_id or ""] * rows, pa.string()),
                "item_atom_id": pa.array(items, pa.int64()),
                **{hist_column(f): pa.array([histories[f]] * rows, pa.list_(pa.int64())) for f in fields},
            }
        )
        return _Prepared(loaded, table, encoded_ids, encoded)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[_Prepared]) -> list[np.ndarray]:
        """One model call per checkpoint among the batched requests (one unless a rollout is under way)."""
        return await asyncio.to_thread(_forward, requests)


def _forward(requests: list[_Prepared]) -> list[np.ndarray]:
    """Click probabilities of each request's rows, through the offline batch path."""
    out: list[np.ndarray] = [np.empty(0, np.float32)] * len(requests)
    for loaded in {id(r.loaded): r.loaded for r in requests}.values():
        mine = [i for i, r in enumerate(requests) if r.loaded is loaded]
        table = pa.concat_tables([requests[i].table for i in mine])
        source = _StoreAndEncoded(
            loaded.store,
            np.concatenate([requests[i].encoded_ids for i in mine]),
            np.concatenate([requests[i].encoded for i in mine]),
        )
        arrays = sample_arrays(table, loaded.info.fields, loaded.info.max_behaviors)
        with torch.inference_mode():
            logits = loaded.model(bahe_batch(arrays, source, loaded.device))
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        bounds = np.cumsum([0] + [requests[i].table.num_rows for i in mine])
        for j, i in enumerate(mine):
            out[i] = probs[bounds[j] : bounds[j + 1]]
    return out


# ---- applications ----------------------------------------------------------------------------


def scorer_app(cfg: Config, loader: CheckpointLoader = load_checkpoint) -> Application:
    """Ingress -> Scorer -> AtomEncoder for a profile; `loader` builds (model, meta) from a checkpoint path.

    The Scorer's user_config starts as {"checkpoint": cfg.serve.checkpoint}; a serve config
    that sets it (deployments: - name: Scorer, user_config: ...) rolls another one out.
    """
    encoder = AtomEncoder.bind(cfg)
    scorer = Scorer.options(user_config=ScorerConfig(checkpoint=cfg.serve.checkpoint).model_dump())
    return Ingress.bind(scorer.bind(cfg, encoder, loader), cfg.serve)


class AppArgs(BaseModel):
    """`args` of the Serve config files: the run profile and optional `section.key=value` overrides."""

    model_config = ConfigDict(extra="forbid")

    config: str
    overrides: list[str] = []


def build_app(args: dict[str, Any]) -> Application:
    """Serve's import path (`bahe_ray.serve:build_app`, args {config: PROFILE, overrides: [...]})."""
    parsed = AppArgs.model_validate(args)
    return scorer_app(load_config(parsed.config, parsed.overrides))


@contextmanager
def running_scorer(cfg: Config) -> Iterator[str]:
    """The scorer app of a profile on cfg.serve.host:port while the block runs (yields its base URL)."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    try:
        serve.run(scorer_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        yield f"http://{cfg.serve.host}:{cfg.serve.port}"
    finally:
        serve.shutdown()


def serve_blocking(cfg: Config) -> None:
    """`bahe serve`: the scorer of a profile on cfg.serve.host:port until Ctrl-C, then Serve shuts down."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    try:
        serve.run(scorer_app(cfg), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        serve.shutdown()
