"""The shallow-encoder contract shared by every backend, and the encoder fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BackendChoice:
    """The backend an encoder runs on and why (shown in the encode run's summary)."""

    backend: str  # "transformers" | "vllm"
    reason: str

    def __str__(self) -> str:
        return f"{self.backend} ({self.reason})"


class FingerprintMismatchError(ValueError):
    """Vectors of two different encoders would mix."""


def ensure_compatible(
    where: str, parties: Mapping[str, EncoderFingerprint | str | None], fields: Sequence[str] | None = None
) -> None:
    """Check that every party (checkpoint, store, encoder...) holds vectors of one encoder.

    A party is a fingerprint, its id (what travels between Serve replicas), or None (no vectors:
    skipped). `fields` narrows the check to those fields of full fingerprints (training continues
    the model and k of the store, whatever dtype the trainer's device computes in). The error
    names the parties, their ids and the fields that differ.
    """
    given = {name: fp for name, fp in parties.items() if fp is not None}
    if len(given) < 2:
        return
    (first, reference), *others = given.items()
    diffs: list[str] = []
    for name, fp in others:
        if isinstance(reference, EncoderFingerprint) and isinstance(fp, EncoderFingerprint):
            a, b = reference.model_dump(mode="json"), fp.model_dump(mode="json")
            keys = fields if fields is not None else sorted(a.keys() | b.keys())
            diffs += [f"{k}: {first} {a.get(k)!r} != {name} {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
        elif fields is None and _fingerprint_id(fp) != _fingerprint_id(reference):
            diffs.append(f"{first} {_fingerprint_id(reference)} != {name} {_fingerprint_id(fp)}")
    if diffs:
        ids = ", ".join(f"{name} {_fingerprint_id(fp)}" for name, fp in given.items())
        raise FingerprintMismatchError(
            f"{where}: encoder fingerprints differ ({ids}); differing fields: {'; '.join(diffs)}. "
            "Vectors of different encoders must not mix."
        )


def _fingerprint_id(fp: EncoderFingerprint | str) -> str:
    return fp.id if isinstance(fp, EncoderFingerprint) else fp


class ShallowEncoder(Protocol):
    """`encode(texts) -> (n, dim) float32`: pooled output of the first k layers."""

    fingerprint: EncoderFingerprint
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...
