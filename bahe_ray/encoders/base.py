"""The shallow-encoder contract shared by every backend, and the encoder fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

NORMALIZATION = "nfkc-collapse-ws-strip-v1"  # see bahe_ray.atoms


class EncoderFingerprint(BaseModel):
    """Everything that determines a stored vector. Vectors of two fingerprints never mix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str  # human-readable identity, e.g. "all-MiniLM-L6-v2"
    weights_sha256: str  # content hash of the checkpoint's weight files
    k: int  # layers kept
    pooling: str  # "mean" | "last"
    dtype: str  # compute dtype: "float32" | "bfloat16" | "float16"
    max_tokens: int
    normalization: str = NORMALIZATION

    @property
    def id(self) -> str:
        """A short stable digest of all fields, used to tag stores and checkpoints."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]


class ShallowEncoder(Protocol):
    """`encode(texts) -> (n, dim) float32`: pooled output of the first k layers."""

    fingerprint: EncoderFingerprint
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...
