"""One committed store version as memory-mapped files on the node: every reader process maps one copy.

Training workers, evaluation and Serve replicas on a node all look vectors up in the same two files,
so the OS page cache holds the vectors once per node, however many processes read them (each process
adds only its directory over the ids, `sorted_ids.IdIndex`: 2 bytes per atom):

  <cache_dir>/<store key>/v<8 digits>-<parts digest>/
      ids.npy       int64 (n,), ascending
      vectors.npy   the store's dtype, (n, dim); row i is the vector of ids[i]
      layout.json   store path, version, atoms, dim, dtype, the parts it holds, the layout it extended

Why files rather than Ray's object store: the layout outlives a Ray session (a Serve replica, a
training job and a hand-run evaluation share it, a restarted replica maps it in milliseconds), and
a search over the mapped ids keeps a lookup one vectorised call per batch. The folder name
carries a digest of the version's part names, so a store re-created at the same path never meets
an older layout.

The first process on a node builds a version under an exclusive file lock, into a temporary folder
renamed into place; the others wait on the lock and map the result. The build holds ids (32 bytes
per atom at its peak) and a window of parts (WINDOW_BYTES) in memory: pass 1 reads the id columns
and sorts them, pass 2 loads a few parts at a time and scatters their rows into their sorted
positions in the mapped vector file. A new version of an append-only history (the daily update)
starts from the node's layout of an earlier version instead: its rows are copied, and only the
parts added since are read from the store.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
from tqdm import tqdm

from bahe_ray.store.manifest import PARTS_DIR, Manifest, PartInfo, StoreCorruptError
from bahe_ray.store.parts import IO_THREADS, list_folder, load_part, parallel, part_vectors, read_columns
from bahe_ray.store.sorted_ids import IdIndex

log = logging.getLogger(__name__)

LAYOUT_NAME = re.compile(r"v(\d{8})-[0-9a-f]{12}")
STALE_BUILD_S = 3600.0  # a temporary build folder this old belongs to a killed builder
COPY_ROWS = 262_144  # rows of a base layout copied at once
WINDOW_BYTES = 512 << 20  # parts read at once while building (each is held twice: file bytes, then columns)


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "bahe-ray-store-cache"


@dataclass(frozen=True)
class NodeLayout:
    """The mapped ids (with this process's directory over them) and vectors of one committed version."""

    version: int
    index: IdIndex  # over the mapped int64 ids, ascending
    vectors: np.ndarray  # (len(ids), dim) in the store's dtype
    folder: Path | None = None


def layout_folder(cache_dir: Path, store_key: str, manifest: Manifest) -> Path:
    """Where `manifest`'s layout lives: one folder per store (`store_key`) and version."""
    store = hashlib.sha256(store_key.encode()).hexdigest()[:16]
    digest = hashlib.sha256("\n".join(p.name for p in manifest.parts).encode()).hexdigest()[:12]
    return cache_dir / store / f"v{manifest.version:08d}-{digest}"


def open_layout(
    fs: fsspec.AbstractFileSystem,
    root: str,
    store_key: str,
    manifest: Manifest,
    dim: int,
    dtype: str,
    cache_dir: Path,
    keep_versions: int = 2,
) -> NodeLayout:
    """Map `manifest`'s layout, building it first if no process on this node has.

    Raises StoreCorruptError, naming the file, when a committed part is missing, truncated or
    altered (while building), or when an existing layout was built from parts now gone.
    """
    if not manifest.parts:
        return NodeLayout(manifest.version, IdIndex.build(np.empty(0, np.int64)), np.empty((0, dim), dtype))
    folder = layout_folder(cache_dir, store_key, manifest)
    if folder.exists():
        _check_parts_present(fs, root, manifest)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _locked(folder.parent / f"{folder.name}.lock"):
            if not folder.exists():
                _build(fs, root, manifest, dim, dtype, folder, _base_layout(folder.parent, manifest))
        remove_old_layouts(folder.parent, keep_versions)
    return _map(folder, manifest, dim, dtype)


def remove_old_layouts(store_folder: Path, keep_versions: int) -> list[Path]:
    """Delete all but the newest `keep_versions` layouts of one store, and stale temporary builds.

    Safe while other processes still map a deleted layout: their mapping keeps the file's data
    until they drop it (POSIX unlink semantics); only new readers no longer find it.
    """
    layouts = sorted(
        (p for p in store_folder.iterdir() if p.is_dir() and LAYOUT_NAME.fullmatch(p.name)),
        key=lambda p: (int(LAYOUT_NAME.fullmatch(p.name).group(1)), p.stat().st_mtime),
    )
    stale = [p for p in store_folder.iterdir() if ".tmp-" in p.name and time.time() - p.stat().st_mtime > STALE_BUILD_S]
    removed = layouts[: max(0, len(layouts) - keep_versions)] + stale
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
        path.with_name(f"{path.name}.lock").unlink(missing_ok=True)
    return removed


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of this node (released if the holder dies)."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _base_layout(store_folder: Path, manifest: Manifest) -> Path | None:
    """The newest layout on this node of an earlier version whose parts `manifest` still lists (the
    daily update only adds parts): the new layout copies its rows and reads only the new parts."""
    names = {p.name for p in manifest.parts}
    for folder in sorted((p for p in store_folder.iterdir() if p.is_dir() and LAYOUT_NAME.fullmatch(p.name)),
                         key=lambda p: p.name, reverse=True):
        try:
            if set(json.loads((folder / "layout.json").read_text())["parts"]) <= names:
                return folder
        except (OSError, ValueError, KeyError):
            continue
    return None


def _build(
    fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest, dim: int, dtype: str, folder: Path, base: Path | None
) -> None:
    started = time.perf_counter()
    base_parts = set(json.loads((base / "layout.json").read_text())["parts"]) if base else set()
    parts = [p for p in manifest.parts if p.name not in base_parts]
    base_ids = np.load(base / "ids.npy", mmap_mode="r") if base else np.empty(0, np.int64)
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        ids = np.concatenate(
            [base_ids, *parallel(lambda p: read_columns(fs, root, p, ["atom_id"]).column("atom_id").to_numpy(), parts)]
        )
        order = np.argsort(ids, kind="stable")  # timsort: the base's ids are one sorted run already
        sorted_ids = ids[order]
        if (sorted_ids[1:] == sorted_ids[:-1]).any():
            raise StoreCorruptError(f"store {root} v{manifest.version}: some ids are stored in more than one part")
        np.save(tmp / "ids.npy", sorted_ids)
        rank = np.empty_like(order)  # rank[i]: the sorted position of the i-th stored row
        rank[order] = np.arange(order.size)
        del ids, order, sorted_ids
        vectors = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.dtype(dtype), shape=(rank.size, dim))
        starts = base_ids.size + np.concatenate([[0], np.cumsum([p.rows for p in parts])])
        with tqdm(total=rank.size, desc=f"store v{manifest.version} layout", unit="atoms", disable=rank.size < 1e6) as bar:
            if base:
                base_vectors = np.load(base / "vectors.npy", mmap_mode="r")
                for first in range(0, base_ids.size, COPY_ROWS):  # rank is ascending here: a near-sequential copy
                    last = min(base_ids.size, first + COPY_ROWS)
                    vectors[rank[first:last]] = base_vectors[first:last]
                    bar.update(last - first)
                del base_vectors
            for first, last in _windows(parts):
                tables = parallel(lambda p: load_part(fs, root, p, dim, dtype), parts[first:last])
                for i, table in enumerate(tables, start=first):
                    vectors[rank[starts[i] : starts[i + 1]]] = part_vectors(table, dim)
                    bar.update(parts[i].rows)
                del tables
        vectors.flush()
        del vectors
        info = {"store": root, "version": manifest.version, "atoms": int(rank.size), "dim": dim, "dtype": dtype,
                "base": base.name if base else None, "parts": [p.name for p in manifest.parts]}
        (tmp / "layout.json").write_text(json.dumps(info, indent=1))
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("store %s v%d: node layout of %d atoms (%d parts read) built in %.1f s at %s",
             root, manifest.version, manifest.total_atoms, len(parts), time.perf_counter() - started, folder)


def _windows(parts: Sequence[PartInfo]) -> Iterator[tuple[int, int]]:
    """[first, last) ranges of parts to read together: up to IO_THREADS parts and WINDOW_BYTES (one at least)."""
    first = 0
    while first < len(parts):
        last, size = first + 1, parts[first].bytes
        while last < len(parts) and last - first < IO_THREADS and size + parts[last].bytes <= WINDOW_BYTES:
            size += parts[last].bytes
            last += 1
        yield first, last
        first = last


def _map(folder: Path, manifest: Manifest, dim: int, dtype: str) -> NodeLayout:
    try:
        ids = np.load(folder / "ids.npy", mmap_mode="r")
        vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise StoreCorruptError(f"{folder}: unreadable node layout ({e}); delete the folder to rebuild it") from e
    n = manifest.total_atoms
    if ids.shape != (n,) or ids.dtype != np.int64 or vectors.shape != (n, dim) or vectors.dtype != np.dtype(dtype):
        raise StoreCorruptError(f"{folder}: node layout does not match v{manifest.version}; delete it to rebuild it")
    return NodeLayout(manifest.version, IdIndex.build(np.asarray(ids)), np.asarray(vectors), folder)


def _check_parts_present(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> None:
    """The parts behind an existing layout are still there with their recorded sizes (one listing)."""
    sizes = {e["name"].rsplit("/", 1)[-1]: e["size"] for e in list_folder(fs, f"{root}/{PARTS_DIR}")}
    for part in manifest.parts:
        if sizes.get(part.name) != part.bytes:
            state = "missing" if part.name not in sizes else f"{sizes[part.name]} bytes, the manifest records {part.bytes}"
            raise StoreCorruptError(f"{root}/{PARTS_DIR}/{part.name}: part file is {state}")


def mapped_vectors_kb(pid: int) -> dict[str, int]:
    """Rss and Pss (kB) of process `pid`'s mappings of layout vector files, from /proc/<pid>/smaps (Linux).

    Rss counts every resident page the process maps; Pss divides each page by the number of processes
    mapping it, so the Pss of all readers on a node adds up to the memory the vectors really hold.
    """
    usage = {"Rss": 0, "Pss": 0}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        key, *rest = line.split()
        if not key.endswith(":"):  # a mapping's header: address range, permissions, ..., path
            inside = line.endswith("/vectors.npy")
        elif inside and key[:-1] in usage:
            usage[key[:-1]] += int(rest[0])
    return usage
