"""The store's files: writing immutable part files, reading them back checked, and the
listing and create-once primitives that commits and gc are built on.

Everything here is stateless (functions of a filesystem, a root and a record), so workers hold
only the small picklable `PartWriter` and the driver's `EmbeddingStore` holds the state.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from bahe_ray.config import StorageConfig
from bahe_ray.fs import filesystem, join, write_bytes_atomic
from bahe_ray.store.manifest import PARTS_DIR, PartInfo, StoreCorruptError, VectorDtype

IO_THREADS = 8  # parallel part reads (S3 latency bound)
_T = TypeVar("_T")
_R = TypeVar("_R")


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
        return self.write_table(part_table(ids, vectors, texts, self.dim, self.dtype))

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


def as_ids(ids: np.ndarray | Sequence[int]) -> np.ndarray:
    """`ids` as a 1-D int64 array; ValueError for other shapes or non-integer values."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D array of ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def part_table(
    ids: np.ndarray | Sequence[int], vectors: np.ndarray, texts: Sequence[str | None] | pa.Array | None, dim: int, dtype: str
) -> pa.Table:
    """A validated part table: unique int64 ids, (n, dim) finite vectors, texts or nulls."""
    id_arr = as_ids(ids)
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


def part_vectors(table: pa.Table, dim: int) -> np.ndarray:
    """The vector column as an (n, dim) array in its stored dtype."""
    column = table.column("vector").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def read_columns(fs: fsspec.AbstractFileSystem, root: str, part: PartInfo, columns: list[str]) -> pa.Table:
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


def load_part(fs: fsspec.AbstractFileSystem, root: str, part: PartInfo, dim: int, dtype: str) -> pa.Table:
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


def list_folder(fs: fsspec.AbstractFileSystem, folder: str) -> list[dict[str, Any]]:
    """Fresh (uncached) listing of a folder; empty if it does not exist."""
    fs.invalidate_cache(folder)
    try:
        return fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []


def modified_time(entry: Mapping[str, Any]) -> float:
    """Seconds since the epoch of a listing entry (local `mtime` or S3 `LastModified`)."""
    modified = entry.get("LastModified", entry.get("mtime", 0.0))
    return modified.timestamp() if isinstance(modified, datetime) else float(modified)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """A JSON file's content; None if it does not exist, StoreCorruptError if it is not JSON."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError as e:
        raise StoreCorruptError(f"{path}: not valid JSON ({e})") from e


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
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


def parallel(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """`fn` over items in a few threads (part reads are I/O bound), results in order."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(IO_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))
