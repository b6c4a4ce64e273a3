"""The offline embedding store: atom id (int64) -> one shallow-encoder vector of `dim` floats.

Layout under the store path (a local folder or an s3:// URI, reached through `bahe_ray.fs`):

  STORE.json                  written once, at creation: format version, encoder fingerprint
                              (EncoderFingerprint JSON) and its id, dim, vector dtype
                              (float32 | float16).
  parts/part-<uuid>.parquet   immutable data files with columns atom_id int64, text string
                              (the normalised atom text, for audit and re-encoding; may be
                              null), vector fixed_size_list<dtype>[dim].
  manifests/v<8 digits>.json  one per committed version: version, parent version, fingerprint
                              id, the committed parts (name, rows, bytes, sha256, min_id,
                              max_id), total atoms. The highest version is the committed
                              state; no manifest means version 0, the empty store.

Why this shape. Parts are written in parallel by many workers (Ray tasks or actors, through
the picklable `PartWriter`) and never change. A commit publishes them all at once by creating
one new manifest key that must not exist yet (local: hard link of a synced temporary file;
S3: conditional PUT), so readers see the old table or the new one, never half, and two writers
can never both publish version n: the loser re-reads the newer state and deduplicates against
it. A manifest lists every part of its parent plus the new ones, so a part referenced by any
version stays referenced by all later ones. Commit drops ids that are already committed or
repeated within the commit, so retried batches and reruns store every atom exactly once. A
killed writer leaves at most orphan part files (or temporary files), invisible to readers;
`gc()` deletes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from bahe_ray.atoms import AtomCollisionError
from bahe_ray.config import StorageConfig
from bahe_ray.encoders.base import EncoderFingerprint, FingerprintMismatchError, ensure_compatible
from bahe_ray.fs import filesystem, join, write_bytes_atomic

FORMAT_VERSION = 1
STORE_FILE = "STORE.json"
PARTS_DIR = "parts"
MANIFESTS_DIR = "manifests"
VectorDtype = Literal["float32", "float16"]

_MANIFEST_NAME = re.compile(r"v(\d{8})\.json")
_COMMIT_ATTEMPTS = 20  # optimistic-concurrency retries before CommitConflictError
_IO_THREADS = 8  # parallel part reads (S3 latency bound)
_T = TypeVar("_T")
_R = TypeVar("_R")


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreMismatchError(StoreError, ValueError):
    """The store holds vectors of another shape or dtype than the caller expects."""


class StoreCorruptError(StoreError):
    """A committed file is missing, truncated, altered or inconsistent with its manifest."""


class CommitConflictError(StoreError):
    """Other writers kept committing; this commit gave up after many optimistic retries."""


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


@dataclass(frozen=True)
class PartWriter:
    """Writes uncommitted part files; small and picklable, so Ray workers can hold one.

    Get one from `EmbeddingStore.part_writer()`; send the returned `PartInfo` records (or their
    `to_dict()`) back to the driver, which passes them to `EmbeddingStore.commit(parts)`.
    """

    path: str
    storage: StorageConfig | None
    dim: int
    dtype: VectorDtype
    fingerprint_id: str

    def write_part(
        self, ids: np.ndarray | Sequence[int], vectors: np.ndarray, texts: Sequence[str | None] | pa.Array | None = None
    ) -> PartInfo:
        """Validate and write one part file (unique ids, finite vectors); not committed."""
        return self.write_table(_part_table(ids, vectors, texts, self.dim, self.dtype))

    def write_table(self, table: pa.Table) -> PartInfo:
        """Write an already-validated part table (columns atom_id, text, vector)."""
        table = table.replace_schema_metadata({"bahe.fingerprint_id": self.fingerprint_id})
        sink = pa.BufferOutputStream()
        pq.write_table(
            table,
            sink,
            compression={"atom_id": "none", "text": "zstd", "vector": "none"},
            use_dictionary=False,
        )
        data = sink.getvalue().to_pybytes()
        name = f"part-{uuid.uuid4().hex}.parquet"
        fs, root = self._filesystem()
        write_bytes_atomic(fs, join(root, PARTS_DIR, name), data)
        ids = table.column("atom_id")
        return PartInfo(
            name=name,
            rows=table.num_rows,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            min_id=int(pc.min(ids).as_py()),
            max_id=int(pc.max(ids).as_py()),
            fingerprint_id=self.fingerprint_id,
        )

    def _filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """One filesystem per writer and process: an S3 client costs ~0.1-0.3 s to set up."""
        if "_fs" not in self.__dict__:
            object.__setattr__(self, "_fs", filesystem(self.path, self.storage))
        return self.__dict__["_fs"]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_fs"}


class EmbeddingStore:
    """Atom id -> vector, for one encoder fingerprint. Not thread-safe: one instance per thread.

    Writers: `missing()` -> encode -> `add()` (or `PartWriter.write_part` on workers) ->
    `commit()`. Readers: `lookup()`; `refresh()` picks up versions committed elsewhere.
    """

    def __init__(self, path: str, storage: StorageConfig | None = None) -> None:
        """Bind the existing store at `path`, taking fingerprint, dim and dtype from it."""
        self.path = path
        self.storage = storage
        self._fs, self._root = filesystem(path, storage)
        meta_path = join(self._root, STORE_FILE)
        meta = _read_json(self._fs, meta_path)
        if meta is None:
            raise FileNotFoundError(f"no embedding store at {path} (missing {STORE_FILE})")
        self.fingerprint, self.dim, self.dtype = _parse_meta(meta, meta_path)
        self.fingerprint_id = self.fingerprint.id
        self._writer = PartWriter(path, storage, self.dim, self.dtype, self.fingerprint_id)
        self._pending: list[PartInfo] = []
        self._part_ids: dict[str, np.ndarray] = {}  # committed part name -> its ids (unsorted)
        self._sorted_ids: tuple[int, np.ndarray] | None = None  # (version, sorted committed ids)
        self._table: _LookupTable | None = None
        self._manifest = self._read_head()

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str,
        fingerprint: EncoderFingerprint,
        dim: int,
        storage: StorageConfig | None = None,
        dtype: VectorDtype = "float32",
        create: bool = True,
    ) -> EmbeddingStore:
        """Open the store at `path` for this encoder, creating it if absent (and `create`).

        Raises FingerprintMismatchError (naming the differing fields) or StoreMismatchError
        (dim, dtype) when the existing store was built differently.
        """
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
        try:
            store = cls(path, storage)
        except FileNotFoundError:
            if not create:
                raise
            doc = {
                "format": FORMAT_VERSION,
                "fingerprint": fingerprint.model_dump(mode="json"),
                "fingerprint_id": fingerprint.id,
                "dim": dim,
                "dtype": dtype,
            }
            fs, root = filesystem(path, storage)
            _create_exclusive(fs, join(root, STORE_FILE), json.dumps(doc, indent=1).encode())
            store = cls(path, storage)  # ours, or a concurrent creator's: checked below either way
        ensure_compatible(f"store {path}", {"store": store.fingerprint, "encoder": fingerprint})
        if store.dim != dim:
            raise StoreMismatchError(f"store {path} holds {store.dim}-d vectors, the encoder produces {dim}-d")
        if store.dtype != dtype:
            raise StoreMismatchError(f"store {path} holds {store.dtype} vectors, asked for {dtype}")
        return store

    @classmethod
    def read(cls, path: str, storage: StorageConfig | None = None) -> EmbeddingStore:
        """Open an existing store, taking fingerprint, dim and dtype from it (training, serving)."""
        return cls(path, storage)

    # ---- committed state -----------------------------------------------------------------

    @property
    def version(self) -> int:
        """The committed version this instance sees (as of open, refresh or commit)."""
        return self._manifest.version

    @property
    def num_atoms(self) -> int:
        return self._manifest.total_atoms

    @property
    def parts(self) -> tuple[PartInfo, ...]:
        """The committed parts of `version`."""
        return self._manifest.parts

    @property
    def pending(self) -> tuple[PartInfo, ...]:
        """Parts added by `add()` and not yet committed."""
        return tuple(self._pending)

    def refresh(self) -> int:
        """Re-read the newest manifest (versions committed by other writers); returns it."""
        self._manifest = self._read_head()
        return self.version

    def info(self) -> StoreSummary:
        m = self._manifest
        return StoreSummary(
            path=self.path,
            version=m.version,
            atoms=m.total_atoms,
            parts=len(m.parts),
            bytes=sum(p.bytes for p in m.parts),
            dim=self.dim,
            dtype=self.dtype,
            fingerprint_id=self.fingerprint_id,
            fingerprint=self.fingerprint.model_dump(mode="json"),
        )

    def ids(self) -> np.ndarray:
        """Sorted ids committed in `version`."""
        return self._committed_ids(self._manifest)

    def contains(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Boolean mask: which of `ids` (1-D) are committed."""
        return _isin_sorted(_as_ids(ids), self.ids())

    def missing(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """The ids of `ids` that are not committed, in input order (duplicates kept)."""
        query = _as_ids(ids)
        return query[~_isin_sorted(query, self.ids())]

    # ---- writing -------------------------------------------------------------------------

    def part_writer(self) -> PartWriter:
        """A picklable writer of uncommitted parts for this store (for Ray workers)."""
        return self._writer

    def write_part(
        self, ids: np.ndarray | Sequence[int], vectors: np.ndarray, texts: Sequence[str | None] | pa.Array | None = None
    ) -> PartInfo:
        """Write one part file; not committed and not remembered (see `add`)."""
        return self._writer.write_part(ids, vectors, texts)

    def add(
        self, ids: np.ndarray | Sequence[int], vectors: np.ndarray, texts: Sequence[str | None] | pa.Array | None = None
    ) -> PartInfo:
        """Write one part and remember it for the next `commit()`."""
        part = self.write_part(ids, vectors, texts)
        self._pending.append(part)
        return part

    def commit(self, parts: Iterable[PartInfo | Mapping[str, Any]] | None = None) -> CommitResult:
        """Atomically publish the pending parts (or `parts`) as a new version, exactly once.

        Ids already committed, or repeated within the commit (first occurrence wins), are
        dropped: a part with no new id is skipped, a part with some is rewritten without the
        others. If another writer publishes first, re-read its version and deduplicate again.
        An id already stored under a different text raises AtomCollisionError. Commits with
        nothing new publish no version. Skipped and rewritten originals are left for `gc()`.
        """
        candidates = list(self._pending) if parts is None else [_as_part(p) for p in parts]
        skipped: list[str] = []
        rewritten: dict[str, str] = {}
        dropped = 0
        for attempt in range(_COMMIT_ATTEMPTS):
            head = self._read_head()
            self._manifest = head
            candidates, plan = self._dedup(head, candidates)
            skipped += plan.skipped
            rewritten.update(plan.rewritten)
            dropped += plan.dropped
            if not candidates:
                result = CommitResult(head.version, 0, [], skipped, rewritten, dropped, attempt)
                break
            manifest = head.child(candidates)
            path = join(self._root, MANIFESTS_DIR, f"v{manifest.version:08d}.json")
            if _create_exclusive(self._fs, path, manifest.to_json()):
                self._manifest = manifest
                added = sum(p.rows for p in candidates)
                result = CommitResult(manifest.version, added, candidates, skipped, rewritten, dropped, attempt)
                break
        else:
            raise CommitConflictError(
                f"store {self.path}: gave up after {_COMMIT_ATTEMPTS} attempts; other writers kept committing"
            )
        if parts is None:
            self._pending = []
        return result

    def gc(self, min_age_s: float = 0.0) -> list[str]:
        """Delete files that no committed version references; returns their paths.

        Removes orphan parts (written but never committed, skipped or rewritten by commit,
        half-written temporaries) and stale temporary manifest files. A part written by a
        writer that has not committed yet is an orphan too: run gc when no writer is active,
        or pass `min_age_s` longer than any write-to-commit delay.
        """
        head = self._read_head()
        self._manifest = head
        referenced = {p.name for p in head.parts}
        now = time.time()
        removed = []
        for folder, keep in (
            (PARTS_DIR, lambda name: name in referenced),
            (MANIFESTS_DIR, lambda name: _MANIFEST_NAME.fullmatch(name) is not None),
            ("", lambda name: ".tmp-" not in name),
        ):
            for entry in _list(self._fs, join(self._root, folder) if folder else self._root):
                name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
                if entry["type"] != "file" or keep(name) or now - _mtime(entry) < min_age_s:
                    continue
                self._fs.rm_file(entry["name"])
                removed.append(entry["name"])
        return removed

    def verify(self) -> VerifyReport:
        """Check every committed part: present, size and sha256 as recorded, readable, row
        counts and id ranges as recorded, ids unique within and across parts, vectors finite."""
        m = self._manifest
        problems: list[str] = []
        if m.total_atoms != sum(p.rows for p in m.parts):
            problems.append(f"manifest v{m.version}: total_atoms {m.total_atoms} != sum of part rows")

        def check(part: PartInfo) -> tuple[list[str], np.ndarray]:
            try:
                table = _load_part(self._fs, self._root, part, self.dim, self.dtype)
            except StoreCorruptError as e:
                return [str(e)], np.empty(0, np.int64)
            where = join(self._root, PARTS_DIR, part.name)
            found = []
            ids = table.column("atom_id").to_numpy()
            if int(ids.min()) != part.min_id or int(ids.max()) != part.max_id:
                found.append(f"{where}: id range differs from the manifest")
            if np.unique(ids).size != ids.size:
                found.append(f"{where}: repeated ids within the part")
            if not np.isfinite(_vectors(table, self.dim)).all():
                found.append(f"{where}: non-finite vector values")
            return found, ids

        results = _parallel(check, m.parts)
        for found, _ in results:
            problems += found
        all_ids = np.concatenate([ids for _, ids in results]) if results else np.empty(0, np.int64)
        owner = np.repeat(np.arange(len(results)), [ids.size for _, ids in results])
        order = np.argsort(all_ids, kind="stable")
        sorted_ids = all_ids[order]
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if dup.size:
            names = sorted({m.parts[owner[order[i]]].name for i in np.concatenate([dup, dup + 1])[:20]})
            problems.append(
                f"{dup.size} ids stored in more than one part, e.g. {sorted_ids[dup[:5]].tolist()} in {names}"
            )
        return VerifyReport(self.path, m.version, len(m.parts), m.total_atoms, sum(p.bytes for p in m.parts), problems)

    # ---- reading vectors -----------------------------------------------------------------

    def lookup(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Vectors of `ids` (any shape) as float32 of shape ids.shape + (dim,).

        Raises KeyError when some id is not committed, naming how many and a few of them.
        """
        vectors, found = self.lookup_with_mask(ids)
        if not found.all():
            absent = np.asarray(ids, dtype=np.int64)[~found]
            raise KeyError(
                f"{absent.size} of {found.size} ids not in store {self.path} (version {self.version}), "
                f"e.g. {absent[:5].tolist()}"
            )
        return vectors

    def lookup_with_mask(self, ids: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float32 with zero rows for uncommitted ids, boolean found mask), shaped like ids."""
        table = self._lookup_table()
        query = np.asarray(ids, dtype=np.int64)
        if table.ids.size == 0:
            return np.zeros((*query.shape, self.dim), np.float32), np.zeros(query.shape, bool)
        pos, found = _find(table.ids, query.reshape(-1))
        out = np.take(table.vectors, pos, axis=0).astype(np.float32, copy=False)
        out[~found] = 0.0
        return out.reshape(*query.shape, self.dim), found.reshape(query.shape)

    def texts(self, ids: np.ndarray | Sequence[int]) -> list[str | None]:
        """Stored normalised texts of committed `ids` (1-D), in order; KeyError if any is absent."""
        query = _as_ids(ids)
        found = self.contains(query)
        if not found.all():
            raise KeyError(f"{int((~found).sum())} ids not in store {self.path}, e.g. {query[~found][:5].tolist()}")
        return self._committed_texts(self._manifest, query).to_pylist()

    # ---- internals -----------------------------------------------------------------------

    def _read_head(self) -> Manifest:
        folder = join(self._root, MANIFESTS_DIR)
        versions = [
            int(match.group(1))
            for entry in _list(self._fs, folder)
            if (match := _MANIFEST_NAME.fullmatch(entry["name"].rsplit("/", 1)[-1]))
        ]
        if not versions:
            return Manifest(version=0, parent=0, fingerprint_id=self.fingerprint_id)
        where = join(folder, f"v{max(versions):08d}.json")
        manifest = Manifest.from_json(self._fs.cat_file(where), where)
        if manifest.version != max(versions) or manifest.fingerprint_id != self.fingerprint_id:
            raise StoreCorruptError(f"{where}: version or fingerprint id does not match the store")
        return manifest

    def _ids_of(self, part: PartInfo) -> np.ndarray:
        if part.name not in self._part_ids:
            table = _read_columns(self._fs, self._root, part, ["atom_id"])
            self._part_ids[part.name] = table.column("atom_id").to_numpy()
        return self._part_ids[part.name]

    def _committed_ids(self, manifest: Manifest) -> np.ndarray:
        if self._sorted_ids is None or self._sorted_ids[0] != manifest.version:
            arrays = _parallel(self._ids_of, manifest.parts)
            merged = np.sort(np.concatenate(arrays)) if arrays else np.empty(0, np.int64)
            self._sorted_ids = (manifest.version, merged)
        return self._sorted_ids[1]

    def _committed_texts(self, manifest: Manifest, query: np.ndarray) -> pa.Array:
        """Texts of committed `query` ids, aligned with it (every id must be committed)."""
        if query.size == 0:
            return pa.array([], pa.string())
        wanted = np.unique(query)
        touched = [p for p in manifest.parts if _isin_sorted(self._ids_of(p), wanted).any()]
        table = pa.concat_tables(
            _parallel(lambda p: _read_columns(self._fs, self._root, p, ["atom_id", "text"]), touched)
        )
        ids = table.column("atom_id").to_numpy()
        order = np.argsort(ids)
        pos = order[np.searchsorted(ids, query, sorter=order)]
        return table.column("text").combine_chunks().take(pa.array(pos))

    def _dedup(self, head: Manifest, candidates: list[PartInfo]) -> tuple[list[PartInfo], _DedupPlan]:
        """Candidates reduced to new, unique ids against `head` (see `commit`)."""
        plan = _DedupPlan()
        committed_names = {p.name for p in head.parts}
        fresh = []
        for part in candidates:
            if part.name in committed_names:
                plan.skipped.append(part.name)  # committed by an earlier (retried) commit call
            elif part.fingerprint_id != self.fingerprint_id:
                raise FingerprintMismatchError(
                    f"part {part.name} was written for fingerprint {part.fingerprint_id}, "
                    f"store {self.path} is {self.fingerprint_id}"
                )
            else:
                fresh.append(part)
        if not fresh:
            return [], plan
        tables = _parallel(lambda p: _read_columns(self._fs, self._root, p, ["atom_id", "text"]), fresh)
        ids = np.concatenate([t.column("atom_id").to_numpy() for t in tables])
        texts = pa.concat_arrays([t.column("text").combine_chunks() for t in tables])
        in_store = _isin_sorted(ids, self._committed_ids(head))
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        repeated = np.ones(ids.size, bool)
        repeated[first] = False
        _check_same_texts(ids[repeated], texts.filter(pa.array(repeated)), texts.take(pa.array(first[inverse][repeated])))
        if in_store.any():
            _check_same_texts(ids[in_store], texts.filter(pa.array(in_store)), self._committed_texts(head, ids[in_store]))
        keep = ~in_store & ~repeated
        plan.dropped = int((~keep).sum())
        kept: list[PartInfo] = []
        offset = 0
        for part, table in zip(fresh, tables):
            mask = keep[offset : offset + part.rows]
            offset += part.rows
            if mask.all():
                kept.append(part)
            elif not mask.any():
                plan.skipped.append(part.name)
            else:
                full = _load_part(self._fs, self._root, part, self.dim, self.dtype)
                copy = self._writer.write_table(full.filter(pa.array(mask)))
                plan.rewritten[part.name] = copy.name
                kept.append(copy)
        return kept, plan

    def _lookup_table(self) -> _LookupTable:
        """The in-memory table of `version`; extended with new parts when the version moves."""
        m = self._manifest
        if self._table is not None and self._table.version == m.version:
            return self._table
        base = self._table or _LookupTable(0, frozenset(), np.empty(0, np.int64), np.empty((0, self.dim), self.dtype))
        new_parts = [p for p in m.parts if p.name not in base.part_names]
        loaded = _parallel(lambda p: _load_part(self._fs, self._root, p, self.dim, self.dtype), new_parts)
        ids = np.concatenate([base.ids, *(t.column("atom_id").to_numpy() for t in loaded)])
        vectors = np.concatenate([base.vectors, *(_vectors(t, self.dim) for t in loaded)])
        order = np.argsort(ids)
        ids, vectors = ids[order], vectors[order]
        if (ids[1:] == ids[:-1]).any():
            raise StoreCorruptError(f"store {self.path} v{m.version}: some ids are stored in more than one part")
        self._table = _LookupTable(m.version, base.part_names | {p.name for p in new_parts}, ids, vectors)
        return self._table


@dataclass
class _DedupPlan:
    skipped: list[str] = field(default_factory=list)
    rewritten: dict[str, str] = field(default_factory=dict)
    dropped: int = 0


@dataclass(frozen=True)
class _LookupTable:
    version: int
    part_names: frozenset[str]
    ids: np.ndarray  # sorted
    vectors: np.ndarray  # (n, dim) in the store dtype, rows aligned with ids


# ---- helpers -------------------------------------------------------------------------------


def _as_ids(ids: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D array of ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _as_part(part: PartInfo | Mapping[str, Any]) -> PartInfo:
    return part if isinstance(part, PartInfo) else PartInfo.from_dict(part)


def _find(sorted_ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `query` (1-D) in the ascending `sorted_ids`, and which are really there.

    The query is sorted first: searchsorted over sorted keys is cache friendly, which makes
    1M random lookups about twice as fast even after paying for the argsort.
    """
    if sorted_ids.size == 0:
        return np.zeros(query.size, np.intp), np.zeros(query.size, bool)
    order = np.argsort(query)
    pos = np.empty(query.size, np.intp)
    pos[order] = np.searchsorted(sorted_ids, query[order])
    np.minimum(pos, sorted_ids.size - 1, out=pos)
    return pos, sorted_ids[pos] == query


def _isin_sorted(query: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Vectorised membership of `query` (1-D) in an ascending array."""
    return _find(sorted_ids, query)[1]


def _check_same_texts(ids: np.ndarray, texts: pa.Array, stored: pa.Array) -> None:
    """Raise AtomCollisionError where one id carries two different (non-null) texts."""
    differs = pc.fill_null(pc.not_equal(texts, stored), False).to_numpy(zero_copy_only=False)
    if differs.any():
        rows = np.flatnonzero(differs)[:3]
        examples = [(int(ids[i]), stored[i].as_py(), texts[i].as_py()) for i in rows]
        raise AtomCollisionError(f"{int(differs.sum())} atom ids carry two different texts, e.g. {examples}")


def _part_table(
    ids: np.ndarray | Sequence[int], vectors: np.ndarray, texts: Sequence[str | None] | pa.Array | None, dim: int, dtype: str
) -> pa.Table:
    """A validated part table: unique int64 ids, (n, dim) finite vectors, texts or nulls."""
    id_arr = _as_ids(ids)
    n = id_arr.size
    if n == 0:
        raise ValueError("a part needs at least one atom")
    if np.unique(id_arr).size != n:
        raise ValueError("ids must be unique within a part")
    with np.errstate(over="ignore"):  # float16 overflow becomes inf, refused just below
        vec = np.ascontiguousarray(np.asarray(vectors), dtype=np.dtype(dtype))
    if vec.shape != (n, dim):
        raise ValueError(f"vectors must have shape ({n}, {dim}), got {np.shape(vectors)}")
    if not np.isfinite(vec).all():
        raise ValueError(f"vectors contain NaN or inf (after casting to {dtype})")
    text_arr = pa.nulls(n, pa.string()) if texts is None else pa.array(texts, type=pa.string())
    if len(text_arr) != n:
        raise ValueError(f"got {len(text_arr)} texts for {n} ids")
    return pa.table(
        {
            "atom_id": pa.array(id_arr, pa.int64()),
            "text": text_arr,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim),
        }
    )


def _vectors(table: pa.Table, dim: int) -> np.ndarray:
    """The vector column as an (n, dim) array in its stored dtype."""
    column = table.column("vector").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def _check_part_schema(table: pa.Table, where: str, dim: int, dtype: str) -> None:
    want = pa.float16() if dtype == "float16" else pa.float32()
    vector_type = table.schema.field("vector").type if "vector" in table.column_names else None
    if (
        table.schema.field("atom_id").type != pa.int64()
        or not pa.types.is_fixed_size_list(vector_type)
        or vector_type.list_size != dim
        or vector_type.value_type != want
        or table.column("vector").null_count
    ):
        raise StoreCorruptError(f"{where}: columns do not match the store (int64 ids, {dim} x {dtype} vectors)")


def _read_columns(fs: fsspec.AbstractFileSystem, root: str, part: PartInfo, columns: list[str]) -> pa.Table:
    """Some columns of a part, after checking its size and row count (reads little on S3)."""
    where = join(root, PARTS_DIR, part.name)
    try:
        size = fs.size(where)
        if size != part.bytes:
            raise StoreCorruptError(f"{where}: {size} bytes, the manifest records {part.bytes} (truncated or replaced)")
        with fs.open(where, "rb") as f:
            table = pq.read_table(f, columns=columns)
    except FileNotFoundError as e:
        raise StoreCorruptError(f"{where}: part file is missing") from e
    except (pa.ArrowException, OSError) as e:
        raise StoreCorruptError(f"{where}: unreadable part file ({e})") from e
    if table.num_rows != part.rows:
        raise StoreCorruptError(f"{where}: {table.num_rows} rows, the manifest records {part.rows}")
    return table


def _load_part(fs: fsspec.AbstractFileSystem, root: str, part: PartInfo, dim: int, dtype: str) -> pa.Table:
    """A whole part, after checking size, sha256, schema and row count against its record."""
    where = join(root, PARTS_DIR, part.name)
    try:
        data = fs.cat_file(where)
    except FileNotFoundError as e:
        raise StoreCorruptError(f"{where}: part file is missing") from e
    if len(data) != part.bytes:
        raise StoreCorruptError(f"{where}: {len(data)} bytes, the manifest records {part.bytes} (truncated or replaced)")
    if hashlib.sha256(data).hexdigest() != part.sha256:
        raise StoreCorruptError(f"{where}: sha256 differs from the manifest (file altered)")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as e:
        raise StoreCorruptError(f"{where}: unreadable part file ({e})") from e
    _check_part_schema(table, where, dim, dtype)
    if table.num_rows != part.rows:
        raise StoreCorruptError(f"{where}: {table.num_rows} rows, the manifest records {part.rows}")
    return table


def _parallel(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """`fn` over items in a few threads (part reads are I/O bound), results in order."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(_IO_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def _list(fs: fsspec.AbstractFileSystem, folder: str) -> list[dict[str, Any]]:
    """Fresh (uncached) listing of a folder; empty if it does not exist."""
    fs.invalidate_cache(folder)
    try:
        return fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []


def _mtime(entry: Mapping[str, Any]) -> float:
    modified = entry.get("LastModified", entry.get("mtime", 0.0))
    return modified.timestamp() if isinstance(modified, datetime) else float(modified)


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError as e:
        raise StoreCorruptError(f"{path}: not valid JSON ({e})") from e


def _parse_meta(meta: dict[str, Any], where: str) -> tuple[EncoderFingerprint, int, VectorDtype]:
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


def _create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` with `data` atomically, only if it does not exist; False if it did.

    Local: write and fsync a temporary sibling, then hard-link it to the target (link fails if
    the target exists). S3: one conditional PUT (If-None-Match: *); a server that ignores the
    condition is still guarded by the existence check just before it.
    """
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    fs.invalidate_cache(path)
    if fs.exists(path):
        return False
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
