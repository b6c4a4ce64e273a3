"""The HTTP side of the scorer: the Ingress deployment and its FastAPI app.

Validation, the ServeConfig limits (a body over the byte limit is refused before anything parses
it) and one error shape (`ErrorBody`) for every 4xx/5xx, so a client always learns which field
was wrong. Scoring happens on the Scorer: called through a handle from the Ingress deployment (and
retried when its replica dies under the call; scoring is idempotent), or in the same replica when the
Scorer serves HTTP itself (`serve.ingress: scorer`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bahe_ray.config import ServeConfig
from bahe_ray.serve.schema import (
    ErrorBody,
    FieldError,
    ModelInfo,
    RequestError,
    ScoreRequest,
    ScoreResponse,
    check_limits,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0  # Retry-After on shed load (503)
_REPLICA_RETRIES = 2  # scoring is idempotent: retry a call whose replica died under it


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


async def _replica_lost(_: Request, exc: Exception) -> JSONResponse:
    error = FieldError.at("scorer", f"unavailable, retry later ({type(exc).__name__})", "unavailable")
    return error_response(503, [error], {"Retry-After": str(math.ceil(RETRY_AFTER_S))})


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


@dataclass(frozen=True)
class ScorerCalls:
    """What the routes call: the Scorer's `score` (plain data both ways), `info` and `stats`."""

    score: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
    info: Callable[[], Awaitable[ModelInfo]]
    stats: Callable[[], Awaitable[dict[str, Any]]]

    @classmethod
    def through(cls, scorer: DeploymentHandle) -> ScorerCalls:
        """Calls through a deployment handle, retried when the replica dies under them. Plain data both ways:
        pydantic models cost several times more to pickle across the handle call."""
        return cls(
            score=lambda req: call_with_retry(lambda: scorer.score.remote(req)),
            info=lambda: call_with_retry(lambda: scorer.info.remote()),
            stats=lambda: call_with_retry(lambda: scorer.stats.remote()),
        )


def make_api(scorer: ScorerCalls, limits: ServeConfig) -> FastAPI:
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
        start = time.perf_counter()
        check_limits(body, limits)
        response = await scorer.score(body.model_dump())
        response["timings"]["ingress_ms"] = 1000 * (time.perf_counter() - start)
        return ScoreResponse.model_validate(response)

    @api.get("/v1/model", responses=errors)
    async def model() -> ModelInfo:
        """The checkpoint being served and the store it reads."""
        return await scorer.info()

    @api.get("/v1/stats", responses=errors)
    async def stats() -> dict[str, Any]:
        """One Scorer replica's state caches: sizes, hits, misses, the store version they hold."""
        return await scorer.stats()

    @api.get("/healthz", responses=errors)
    async def healthz() -> dict[str, str]:
        """200 while a scorer replica answers with a loaded model."""
        info = await scorer.info()
        return {"status": "ok", "model_version": info.version}

    return api


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
    """HTTP ingress: validation and limits here, scoring on the Scorer replicas (scaled apart from them)."""

    def __init__(self, scorer: DeploymentHandle, limits: ServeConfig) -> None:
        self.scorer, self.limits = scorer, limits

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(ScorerCalls.through(self.scorer), self.limits)
