"""`EmbeddingStore`: one encoder's atom id -> vector table, with atomic exactly-once commits.

Readers see one committed version at a time (`lookup`, `texts`); writers add parts and `commit`
them under optimistic concurrency; `verify` and `gc` are the operator's checks and cleanup.
File formats are in `manifest`, file I/O in `parts`; the layout is in the package docstring.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bahe_ray.atoms import AtomCollisionError
from bahe_ray.config import StorageConfig, StoreReaderConfig
from bahe_ray.encoders.base import EncoderFingerprint, FingerprintMismatchError, ensure_compatible
from bahe_ray.fs import filesystem, is_remote, join
from bahe_ray.store.compact import merge_parts, plan_compaction
from bahe_ray.store.maintenance import collect_garbage, verify_problems
from bahe_ray.store.manifest import (
    MANIFEST_NAME,
    MANIFESTS_DIR,
    STORE_FILE,
    CommitConflictError,
    CommitResult,
    CompactResult,
    Manifest,
    PartInfo,
    StoreCorruptError,
    StoreMismatchError,
    StoreSummary,
    VectorDtype,
    VerifyReport,
    manifest_name,
    parse_store_meta,
    store_meta,
)
from bahe_ray.store.node_cache import NodeLayout, default_cache_dir, open_layout
from bahe_ray.store.parts import (
    PartWriter,
    as_ids,
    create_exclusive,
    list_folder,
    load_part,
    parallel,
    read_columns,
    read_json,
)
from bahe_ray.store.sorted_ids import isin_sorted, take_rows

COMMIT_ATTEMPTS = 20  # optimistic-concurrency retries before CommitConflictError


class EmbeddingStore:
    """Atom id -> vector, for one encoder fingerprint. Not thread-safe: one instance per thread.

    Writers: `missing()` -> encode -> `add()` (or `PartWriter.write_part` on workers) ->
    `commit()`. Readers: `lookup()`; `refresh()` picks up versions committed elsewhere.
    """

    def __init__(self, path: str, storage: StorageConfig | None = None, reader: StoreReaderConfig | None = None) -> None:
        """Bind the existing store at `path`, taking fingerprint, dim and dtype from it.

        `reader` sets where the node-shared lookup layout lives and how often lookups look for a
        newer version; without it, lookups read the node cache under the system temp folder and
        move to a newer version only on `refresh()`.
        """
        self.path = path
        self.storage = storage
        self.reader = reader or StoreReaderConfig(refresh_s=0)
        self._fs, self._root = filesystem(path, storage)
        meta_path = join(self._root, STORE_FILE)
        meta = read_json(self._fs, meta_path)
        if meta is None:
            raise FileNotFoundError(f"no embedding store at {path} (missing {STORE_FILE})")
        self.fingerprint, self.dim, self.dtype = parse_store_meta(meta, meta_path)
        self.fingerprint_id = self.fingerprint.id
        self._writer = PartWriter(path, storage, self.dim, self.dtype, self.fingerprint_id)
        self._pending: list[PartInfo] = []
        self._part_ids: dict[str, np.ndarray] = {}  # committed part name -> its ids (unsorted)
        self._sorted_ids: tuple[int, np.ndarray] | None = None  # (version, sorted committed ids)
        self._table: NodeLayout | None = None
        self._manifest = self._read_head()
        self._checked_at = time.monotonic()

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
            fs, root = filesystem(path, storage)
            create_exclusive(fs, join(root, STORE_FILE), store_meta(fingerprint, dim, dtype))
            store = cls(path, storage)  # ours, or a concurrent creator's: checked below either way
        ensure_compatible(f"store {path}", {"store": store.fingerprint, "encoder": fingerprint})
        if store.dim != dim:
            raise StoreMismatchError(f"store {path} holds {store.dim}-d vectors, the encoder produces {dim}-d")
        if store.dtype != dtype:
            raise StoreMismatchError(f"store {path} holds {store.dtype} vectors, asked for {dtype}")
        return store

    @classmethod
    def read(
        cls, path: str, storage: StorageConfig | None = None, reader: StoreReaderConfig | None = None
    ) -> EmbeddingStore:
        """Open an existing store, taking fingerprint, dim and dtype from it (training, serving)."""
        return cls(path, storage, reader)

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
        self._checked_at = time.monotonic()
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
        return isin_sorted(as_ids(ids), self.ids())

    def missing(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """The ids of `ids` that are not committed, in input order (duplicates kept)."""
        query = as_ids(ids)
        return query[~isin_sorted(query, self.ids())]

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
        for attempt in range(COMMIT_ATTEMPTS):
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
            path = join(self._root, MANIFESTS_DIR, manifest_name(manifest.version))
            if create_exclusive(self._fs, path, manifest.to_json()):
                self._manifest = manifest
                added = sum(p.rows for p in candidates)
                result = CommitResult(manifest.version, added, candidates, skipped, rewritten, dropped, attempt)
                break
        else:
            raise CommitConflictError(
                f"store {self.path}: gave up after {COMMIT_ATTEMPTS} attempts; other writers kept committing"
            )
        if parts is None:
            self._pending = []
        return result

    def compact(self, target_part_rows: int = 1_000_000) -> CompactResult:
        """Merge small committed parts into parts of about `target_part_rows` rows, as a new version.

        Every id, text and vector is kept bit for bit; the version is published like a commit (one
        new manifest key), so readers see the old parts or the merged ones, never half. Readers of
        the old version keep reading: its parts stay until `gc(min_age_s)` finds it replaced for
        longer than `min_age_s`. A commit by another writer meanwhile is kept (compaction retries
        on top of it); another compaction meanwhile raises CommitConflictError.
        """
        head = self._read_head()
        groups = plan_compaction(head.parts, target_part_rows)
        replaced = [part for group in groups for part in group]
        merged = [merge_parts(self._fs, self._root, self._writer, group, self.dim, self.dtype) for group in groups]
        for _ in range(COMMIT_ATTEMPTS):
            self._manifest = head
            if not groups:
                return CompactResult(head.version, len(head.parts), len(head.parts))
            if not {p.name for p in replaced} <= {p.name for p in head.parts}:
                raise CommitConflictError(f"store {self.path}: another compaction published v{head.version} first")
            manifest = head.compacted(replaced, merged)
            path = join(self._root, MANIFESTS_DIR, manifest_name(manifest.version))
            if create_exclusive(self._fs, path, manifest.to_json()):
                self._manifest = manifest
                return CompactResult(
                    manifest.version, len(head.parts), len(manifest.parts),
                    [p.name for p in replaced], [p.name for p in merged],
                )
            head = self._read_head()
        raise CommitConflictError(f"store {self.path}: gave up after {COMMIT_ATTEMPTS} attempts to compact")

    def gc(self, min_age_s: float = 0.0) -> list[str]:
        """Delete files that no current version references; returns their paths.

        Removes orphan parts (written but never committed, skipped or rewritten by commit,
        half-written temporaries), parts that compaction replaced more than `min_age_s` ago, and
        stale temporary manifest files. A part written by a writer that has not committed yet is
        an orphan too: run gc when no writer is active, or pass `min_age_s` longer than any
        write-to-commit delay (and than readers take to move to a compacted version).
        """
        head = self._read_head()
        self._manifest = head
        return collect_garbage(self._fs, self._root, head, min_age_s)

    def verify(self) -> VerifyReport:
        """Check every committed part: present, size and sha256 as recorded, readable, row
        counts and id ranges as recorded, ids unique within and across parts, vectors finite."""
        m = self._manifest
        problems = verify_problems(self._fs, self._root, m, self.dim, self.dtype)
        return VerifyReport(self.path, m.version, len(m.parts), m.total_atoms, sum(p.bytes for p in m.parts), problems)

    # ---- reading vectors -----------------------------------------------------------------

    def lookup(self, ids: np.ndarray | Sequence[int], dtype: str | None = "float32") -> np.ndarray:
        """Vectors of `ids` (any shape) as `dtype` (None: the store's) of shape ids.shape + (dim,).

        Raises KeyError when some id is not committed, naming how many and a few of them.
        """
        vectors, found = self.lookup_with_mask(ids, dtype)
        if not found.all():
            absent = np.asarray(ids, dtype=np.int64)[~found]
            raise KeyError(
                f"{absent.size} of {found.size} ids not in store {self.path} (version {self.version}), "
                f"e.g. {absent[:5].tolist()}"
            )
        return vectors

    def lookup_with_mask(
        self, ids: np.ndarray | Sequence[int], dtype: str | None = "float32"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(vectors with zero rows for uncommitted ids, boolean found mask), shaped like ids.

        Vectors come as `dtype`; None gives the store's own, which skips widening a float16 store
        to float32 for callers that cast anyway, e.g. on the GPU (half the bytes to copy there).
        """
        query = np.asarray(ids, dtype=np.int64)
        table = self._layout()
        out, found = take_rows(table.index, table.vectors, query.reshape(-1), np.dtype(dtype or self.dtype))
        return out.reshape(*query.shape, self.dim), found.reshape(query.shape)

    def texts(self, ids: np.ndarray | Sequence[int]) -> list[str | None]:
        """Stored normalised texts of committed `ids` (1-D), in order; KeyError if any is absent."""
        query = as_ids(ids)
        found = self.contains(query)
        if not found.all():
            raise KeyError(f"{int((~found).sum())} ids not in store {self.path}, e.g. {query[~found][:5].tolist()}")
        return self._committed_texts(self._manifest, query).to_pylist()

    # ---- internals -----------------------------------------------------------------------

    def _read_head(self) -> Manifest:
        folder = join(self._root, MANIFESTS_DIR)
        versions = [
            int(match.group(1))
            for entry in list_folder(self._fs, folder)
            if (match := MANIFEST_NAME.fullmatch(entry["name"].rsplit("/", 1)[-1]))
        ]
        if not versions:
            return Manifest(version=0, parent=0, fingerprint_id=self.fingerprint_id)
        where = join(folder, manifest_name(max(versions)))
        manifest = Manifest.from_json(self._fs.cat_file(where), where)
        if manifest.version != max(versions) or manifest.fingerprint_id != self.fingerprint_id:
            raise StoreCorruptError(f"{where}: version or fingerprint id does not match the store")
        return manifest

    def _ids_of(self, part: PartInfo) -> np.ndarray:
        if part.name not in self._part_ids:
            table = read_columns(self._fs, self._root, part, ["atom_id"])
            self._part_ids[part.name] = table.column("atom_id").to_numpy()
        return self._part_ids[part.name]

    def _committed_ids(self, manifest: Manifest) -> np.ndarray:
        if self._sorted_ids is None or self._sorted_ids[0] != manifest.version:
            arrays = parallel(self._ids_of, manifest.parts)
            merged = np.sort(np.concatenate(arrays)) if arrays else np.empty(0, np.int64)
            self._sorted_ids = (manifest.version, merged)
        return self._sorted_ids[1]

    def _committed_texts(self, manifest: Manifest, query: np.ndarray) -> pa.Array:
        """Texts of committed `query` ids, aligned with it (every id must be committed)."""
        if query.size == 0:
            return pa.array([], pa.string())
        wanted = np.unique(query)
        touched = [p for p in manifest.parts if isin_sorted(self._ids_of(p), wanted).any()]
        table = pa.concat_tables(
            parallel(lambda p: read_columns(self._fs, self._root, p, ["atom_id", "text"]), touched)
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
        tables = parallel(lambda p: read_columns(self._fs, self._root, p, ["atom_id", "text"]), fresh)
        ids = np.concatenate([t.column("atom_id").to_numpy() for t in tables])
        texts = pa.concat_arrays([t.column("text").combine_chunks() for t in tables])
        in_store = isin_sorted(ids, self._committed_ids(head))
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
                full = load_part(self._fs, self._root, part, self.dim, self.dtype)
                copy = self._writer.write_table(full.filter(pa.array(mask)))
                plan.rewritten[part.name] = copy.name
                kept.append(copy)
        return kept, plan

    def _layout(self) -> NodeLayout:
        """The node-shared layout of `version`, after a check for a newer version every `refresh_s`."""
        if self.reader.refresh_s and time.monotonic() - self._checked_at >= self.reader.refresh_s:
            self.refresh()
        m = self._manifest
        if self._table is None or self._table.version != m.version:
            self._table = None  # drop the old mapping before mapping the new one
            cache_dir = Path(self.reader.cache_dir) if self.reader.cache_dir else default_cache_dir()
            key = f"{(self.storage or StorageConfig()).endpoint_url}|{self.path if is_remote(self.path) else self._root}"
            self._table = open_layout(
                self._fs, self._root, key, m, self.dim, self.dtype, cache_dir, self.reader.keep_versions
            )
        return self._table


@dataclass
class _DedupPlan:
    skipped: list[str] = field(default_factory=list)
    rewritten: dict[str, str] = field(default_factory=dict)
    dropped: int = 0


# ---- helpers -------------------------------------------------------------------------------


def _as_part(part: PartInfo | Mapping[str, Any]) -> PartInfo:
    return part if isinstance(part, PartInfo) else PartInfo.from_dict(part)


def _check_same_texts(ids: np.ndarray, texts: pa.Array, stored: pa.Array) -> None:
    """Raise AtomCollisionError where one id carries two different (non-null) texts."""
    differs = pc.fill_null(pc.not_equal(texts, stored), False).to_numpy(zero_copy_only=False)
    if differs.any():
        rows = np.flatnonzero(differs)[:3]
        examples = [(int(ids[i]), stored[i].as_py(), texts[i].as_py()) for i in rows]
        raise AtomCollisionError(f"{int(differs.sum())} atom ids carry two different texts, e.g. {examples}")
