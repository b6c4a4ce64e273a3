"""Ray Serve scorer: `POST /v1/score` answers the CTR scores offline evaluation gives.

Three deployments composed with handles (the HTTP proxy calls the ingress):

    Ingress ──────────────────> Scorer ─────────────────────────> AtomEncoder
    FastAPI: parse, validate,   checkpoint + embedding store;     shallow encoder for atoms the
    limits, error bodies        @serve.batch: one model call      store lacks, LRU cache; refuses
                                for many requests                 to start on another fingerprint

A request carries one user's behaviours per field (texts, or atom ids of texts already in the
store), oldest first as in training, and the candidates to score; each field keeps its most
recent N (the checkpoint's max_behaviors). A new checkpoint rolls out through the Scorer's
`user_config` ({"checkpoint": path}): the replica loads it beside the old one and swaps; requests
prepared on the old one finish on it.

Modules: `schema` (request/response models, limits), `http` (Ingress, FastAPI app, error bodies),
`scorer` (Scorer, AtomEncoder, the batched forward), `app` (the application and how to run it).
"""

from bahe_ray.serve.app import APP_NAME, AppArgs, build_app, running_scorer, scorer_app, serve_blocking
from bahe_ray.serve.http import Ingress, make_api
from bahe_ray.serve.schema import (
    Candidate,
    CandidateScore,
    ErrorBody,
    FieldError,
    ModelInfo,
    RequestError,
    ScoreRequest,
    ScoreResponse,
    check_limits,
)
from bahe_ray.serve.scorer import AtomEncoder, Scorer, ScorerConfig, load_scorer_state

__all__ = [
    "APP_NAME",
    "AppArgs",
    "AtomEncoder",
    "Candidate",
    "CandidateScore",
    "ErrorBody",
    "FieldError",
    "Ingress",
    "ModelInfo",
    "RequestError",
    "ScoreRequest",
    "ScoreResponse",
    "Scorer",
    "ScorerConfig",
    "build_app",
    "check_limits",
    "load_scorer_state",
    "make_api",
    "running_scorer",
    "scorer_app",
    "serve_blocking",
]
