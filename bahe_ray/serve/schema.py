"""The scorer's wire format: request and response models, the ServeConfig limits, and field errors.

Texts are checked and normalised here exactly as offline (`bahe_ray.atoms`), so the atom id the
Scorer computes from a request's text is the one the store holds for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from bahe_ray.atoms import is_utf8, normalize_text
from bahe_ray.config import ServeConfig


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


class ScoreTimings(BaseModel):
    """Where one request's time went (ms), and what the state caches gave it (`bahe bench serve` sums these up)."""

    ingress_ms: float | None = None  # in the Ingress's handler: validation, limits, the Scorer call
    scorer_ms: float  # in the Scorer, from arrival to answer
    prepare_ms: float  # atom ids, store lookup
    encode_ms: float  # the AtomEncoder call for atoms the store lacks (0 when none)
    queue_ms: float  # waiting to join a batch and for the batch before it
    model_ms: float  # the batch's model call: cached states, misses through the upper layers, head
    batch_requests: int  # requests in that model call
    item_states_cached: int  # candidates whose item state came from the cache
    user_states_cached: int  # fields whose user state came from the cache


class ScoreResponse(BaseModel):
    request_id: str | None
    scores: list[CandidateScore]  # one per candidate, in request order
    model_version: str
    encoder_fingerprint: str
    store_version: int
    atoms_encoded: int  # atoms of this request missing from the store, encoded online
    timings: ScoreTimings | None = None


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
