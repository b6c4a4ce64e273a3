"""The store's small JSON records: STORE.json, the versioned manifests, the errors and reports.

Kept apart from the data files (`parts`) and the store logic (`store`) so the on-disk formats
read in one place; see the package docstring for the layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from bahe_ray.encoders.base import EncoderFingerprint

FORMAT_VERSION = 1
STORE_FILE = "STORE.json"
PARTS_DIR = "parts"
MANIFESTS_DIR = "manifests"
MANIFEST_NAME = re.compile(r"v(\d{8})\.json")
VectorDtype = Literal["float32", "float16"]


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreMismatchError(StoreError, ValueError):
    """The store holds vectors of another shape or dtype than the caller expects."""


class StoreCorruptError(StoreError):
    """A committed file is missing, truncated, altered or inconsistent with its manifest."""


class CommitConflictError(StoreError):
    """Other writers kept committing; this commit gave up after many optimistic retries."""


def manifest_name(version: int) -> str:
    return f"v{version:08d}.json"


def store_meta(fingerprint: EncoderFingerprint, dim: int, dtype: VectorDtype) -> bytes:
    """The content of STORE.json for a new store."""
    doc = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint.model_dump(mode="json"),
        "fingerprint_id": fingerprint.id,
        "dim": dim,
        "dtype": dtype,
    }
    return json.dumps(doc, indent=1).encode()


def parse_store_meta(meta: dict[str, Any], where: str) -> tuple[EncoderFingerprint, int, VectorDtype]:
    """(fingerprint, dim, dtype) of a parsed STORE.json; StoreCorruptError if it is inconsistent."""
    try:
        if meta["format"] != FORMAT_VERSION:
            raise StoreCorruptError(f"{where}: unsupported store format {meta['format']!r}")
        fingerprint = EncoderFingerprint.model_validate(meta["fingerprint"])
        dim, dtype = int(meta["dim"]), meta["dtype"]
    except (KeyError, TypeError, ValueError) as e:
        raise StoreCorruptError(f"{where}: unreadable store metadata ({e!r})") from e
    if fingerprint.id != meta["fingerprint_id"] or dtype not in ("float32", "float16"):
        raise StoreCorruptError(f"{where}: fingerprint id or dtype inconsistent")
    return fingerprint, dim, dtype


@dataclass(frozen=True)
class PartInfo:
    """One written part file: a plain record that travels through Ray Data rows and JSON."""

    name: str
    rows: int
    bytes: int
    sha256: str
    min_id: int
    max_id: int
    fingerprint_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> PartInfo:
        """Accept a dict, a Ray Data row or a manifest entry (numpy scalars are fine)."""
        return cls(
            name=str(record["name"]),
            rows=int(record["rows"]),
            bytes=int(record["bytes"]),
            sha256=str(record["sha256"]),
            min_id=int(record["min_id"]),
            max_id=int(record["max_id"]),
            fingerprint_id=str(record["fingerprint_id"]),
        )


@dataclass(frozen=True)
class Manifest:
    """One committed version of the store."""

    version: int
    parent: int
    fingerprint_id: str
    parts: tuple[PartInfo, ...] = ()
    total_atoms: int = 0
    created_at: str = ""

    def child(self, new_parts: Sequence[PartInfo]) -> Manifest:
        """The next version: every part of this one plus `new_parts`."""
        return Manifest(
            version=self.version + 1,
            parent=self.version,
            fingerprint_id=self.fingerprint_id,
            parts=self.parts + tuple(new_parts),
            total_atoms=self.total_atoms + sum(p.rows for p in new_parts),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    def compacted(self, replaced: Sequence[PartInfo], merged: Sequence[PartInfo]) -> Manifest:
        """The next version with the `replaced` parts swapped for `merged` ones holding the same rows."""
        names = {p.name for p in replaced}
        kept = tuple(p for p in self.parts if p.name not in names)
        return Manifest(
            version=self.version + 1,
            parent=self.version,
            fingerprint_id=self.fingerprint_id,
            parts=kept + tuple(merged),
            total_atoms=self.total_atoms,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_VERSION,
            "version": self.version,
            "parent": self.parent,
            "fingerprint_id": self.fingerprint_id,
            "created_at": self.created_at,
            "total_atoms": self.total_atoms,
            "parts": [p.to_dict() for p in self.parts],
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(data)
            if doc["format"] != FORMAT_VERSION:
                raise StoreCorruptError(f"{where}: unsupported manifest format {doc['format']!r}")
            return cls(
                version=int(doc["version"]),
                parent=int(doc["parent"]),
                fingerprint_id=str(doc["fingerprint_id"]),
                parts=tuple(PartInfo.from_dict(p) for p in doc["parts"]),
                total_atoms=int(doc["total_atoms"]),
                created_at=str(doc["created_at"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise StoreCorruptError(f"{where}: unreadable manifest ({e!r})") from e


@dataclass(frozen=True)
class CommitResult:
    """What one commit published. `version` is the committed version after the call."""

    version: int
    added: int  # atoms newly committed
    parts: list[PartInfo] = field(default_factory=list)  # parts the new manifest added
    skipped: list[str] = field(default_factory=list)  # parts whose ids were all committed already
    rewritten: dict[str, str] = field(default_factory=dict)  # partly new part -> its new-rows copy
    duplicates_dropped: int = 0  # rows dropped as already committed or repeated in the commit
    conflicts: int = 0  # newer versions by other writers met and deduplicated against


@dataclass(frozen=True)
class CompactResult:
    """What one compaction published: `version` holds the same atoms in fewer parts."""

    version: int
    parts_before: int
    parts_after: int
    replaced: list[str] = field(default_factory=list)  # part names no longer referenced by `version`
    written: list[str] = field(default_factory=list)  # the merged parts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VerifyReport:
    """Result of `verify()`: every problem names the file or ids concerned."""

    path: str
    version: int
    parts: int
    atoms: int
    bytes: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class StoreSummary:
    """What `bahe store info` prints."""

    path: str
    version: int
    atoms: int
    parts: int
    bytes: int
    dim: int
    dtype: str
    fingerprint_id: str
    fingerprint: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
