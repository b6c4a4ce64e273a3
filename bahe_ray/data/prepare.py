"""Inputs prepared once: the configured source read, every row validated, the result written as
parquet tables that `bahe encode` and `bahe samples` both read.

Layout under `data.prepared_path` (local or s3://):

    source/events/, source/impressions/  raw rows written by the MovieLens or synthetic adapter
    events/, impressions/                 the valid rows with their atom ids (`bahe_ray.data.schema`)
    prepared.json                         what made them (`key`), the counts, the rejects folder

Why: the stages of one run (encode then samples: `bahe demo`, the daily update, training that
builds its samples) read the same inputs. Preparing once means each input row is validated once
and each bad row is set aside once, in one rejects folder (`<rejects_path>/<run id>`), and later
stages neither regenerate the adapter's output nor re-validate row by row in Python. The key is
a hash of the data config and, for `source: files`, of the input files' names, sizes and
modification stamps: a changed config or changed input files make the next stage prepare again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from bahe_ray.config import Config, StorageConfig
from bahe_ray.data import movielens, synthetic
from bahe_ray.data.readers import (
    ValidateRows,
    make_dirs,
    read_rejects,
    read_table,
    reject_counts,
    remove_folder,
    write_parquet_table,
)
from bahe_ray.data.schema import EVENTS, IMPRESSIONS, TableKind
from bahe_ray.fs import arrow_filesystem, filesystem, join, write_bytes_atomic

if TYPE_CHECKING:  # Ray is imported where it is used: the local encode path runs without it
    import ray.data

log = logging.getLogger(__name__)

PREPARED_FILE = "prepared.json"
FORMAT_VERSION = 1  # bump when the prepared layout or the validation rules change: old tables are re-prepared


@dataclass(frozen=True)
class PreparedInputs:
    """The content of prepared.json: where the valid rows are and what preparing them found."""

    key: str  # see `input_key`
    run_id: str  # the run that prepared them
    events: str  # folder of valid events
    impressions: str | None  # folder of valid impressions; None when the source has none
    rejects_dir: str
    events_read: int
    events_valid: int
    impressions_read: int
    impressions_valid: int
    rejects: dict[str, int] = field(default_factory=dict)  # by `source: field: reason`
    data: dict[str, Any] = field(default_factory=dict)  # the data config that made them
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_run_id(tag: str = "") -> str:
    """A sortable, unique run id: `<local time>-[<tag>-]<6 hex digits>`, e.g. 20250101T120000-local-a1b2c3."""
    return "-".join([time.strftime("%Y%m%dT%H%M%S"), *([tag] if tag else []), uuid.uuid4().hex[:6]])


def prepare_inputs(cfg: Config, use_ray: bool, run_id: str | None = None) -> PreparedInputs:
    """The prepared inputs of `cfg`: the recorded ones when the same inputs made them, else
    prepared now, with Ray Data (`use_ray`) or in this process, rejects under
    `<rejects_path>/<run_id>` (default: a new id tagged "prepare")."""
    key = input_key(cfg)
    found = load_prepared(cfg.data.prepared_path, cfg.storage)
    if found is not None and found.key == key:
        log.info("inputs prepared by run %s (%s): reusing them", found.run_id, cfg.data.prepared_path)
        return found
    return _prepare(cfg, key, run_id or new_run_id("prepare"), use_ray)


def load_prepared(prepared_path: str, storage: StorageConfig) -> PreparedInputs | None:
    """The record of the inputs prepared under `prepared_path`; None if there are none."""
    fs, inner = filesystem(join(prepared_path, PREPARED_FILE), storage)
    try:
        return PreparedInputs(**json.loads(fs.cat_file(inner)))
    except FileNotFoundError:
        return None
    except (TypeError, ValueError):  # another format's record: prepare again
        log.warning("%s: unreadable record of prepared inputs; preparing them again", inner)
        return None


def input_key(cfg: Config) -> str:
    """A hash of what the prepared tables are made from (see the module docstring)."""
    made_from: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "data": cfg.data.model_dump(mode="json", exclude={"prepared_path", "cache_dir"}),
    }
    if cfg.data.source == "files":
        paths = [p for p in (cfg.data.events_path, cfg.data.impressions_path) if p]
        made_from["files"] = [_listing(p, cfg.storage) for p in paths]
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16]


def prepared_dataset(path: str, storage: StorageConfig, columns: list[str] | None = None) -> ray.data.Dataset:
    """One prepared table (`PreparedInputs.events` or `.impressions`) as a Ray Dataset."""
    import ray.data

    fs, inner = arrow_filesystem(path, storage)
    return ray.data.read_parquet(inner, filesystem=fs, columns=columns)


def prepared_table(path: str, storage: StorageConfig, columns: list[str] | None = None) -> pa.Table:
    """One prepared table read into this process with pyarrow (no Ray)."""
    fs, inner = arrow_filesystem(path, storage)
    return pq.read_table(inner, filesystem=fs, columns=columns)


# ---- preparing -------------------------------------------------------------------------------


def _prepare(cfg: Config, key: str, run_id: str, use_ray: bool) -> PreparedInputs:
    data, storage = cfg.data, cfg.storage
    marker_fs, marker = filesystem(join(data.prepared_path, PREPARED_FILE), storage)
    if marker_fs.exists(marker):  # a run killed from here on leaves no record: the next one prepares again
        marker_fs.rm_file(marker)
    events_src, impressions_src, fmt = _source_tables(cfg)
    rejects_dir = join(cfg.rejects_path, run_id)
    make_dirs(rejects_dir, storage)
    validate = _validate_with_ray if use_ray else _validate_here
    paths = {kind.name: join(data.prepared_path, kind.name) for kind in (EVENTS, IMPRESSIONS)}
    remove_folder(paths[IMPRESSIONS.name], storage)  # an earlier config's impressions must not look prepared
    jobs = [(src, kind, paths[kind.name]) for src, kind in ((events_src, EVENTS), (impressions_src, IMPRESSIONS)) if src]
    with ThreadPoolExecutor(len(jobs)) as pool:  # the tables' Ray jobs overlap: start-up latency dominates small tables
        list(pool.map(lambda job: validate(*job, fmt, rejects_dir, cfg), jobs))
    events, impressions = paths[EVENTS.name], paths[IMPRESSIONS.name] if impressions_src else None
    rejects = read_rejects(rejects_dir, storage)
    rejected = {name: int(pc.sum(pc.equal(rejects.column("source"), name)).as_py() or 0) for name in ("events", "impressions")}
    events_valid = _count_rows(events, storage)
    impressions_valid = _count_rows(impressions, storage) if impressions else 0
    prepared = PreparedInputs(
        key=key,
        run_id=run_id,
        events=events,
        impressions=impressions,
        rejects_dir=rejects_dir,
        events_read=events_valid + rejected["events"],
        events_valid=events_valid,
        impressions_read=impressions_valid + rejected["impressions"],
        impressions_valid=impressions_valid,
        rejects=reject_counts(rejects),
        data=data.model_dump(mode="json"),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_bytes_atomic(marker_fs, marker, json.dumps(prepared.to_dict(), indent=2).encode())
    log.info("prepared inputs (run %s): %d/%d events and %d/%d impressions valid, %d rejected into %s", run_id,
             events_valid, prepared.events_read, impressions_valid, prepared.impressions_read, rejects.num_rows,
             rejects_dir)
    return prepared


def _source_tables(cfg: Config) -> tuple[str, str | None, str]:
    """(events, impressions, format) to validate: the configured files, or the adapter's rows
    written under `<prepared_path>/source`."""
    data, storage = cfg.data, cfg.storage
    if data.source == "files":
        return data.events_path or "", data.impressions_path or None, data.format
    raw = join(data.prepared_path, "source")
    remove_folder(raw, storage)  # a smaller synthetic config writes fewer files than the last one
    if data.source == "synthetic":
        events, impressions = synthetic.generate(data.synthetic, raw, storage)
        return events, impressions, "parquet"
    ratings = movielens.load_ratings(data.movielens_path, Path(data.cache_dir))
    events_table, impressions_table = movielens.to_tables(ratings, data.movielens_users)
    return (
        write_parquet_table(events_table, join(raw, "events"), storage),
        write_parquet_table(impressions_table, join(raw, "impressions"), storage),
        "parquet",
    )


def _validate_with_ray(src: str, kind: TableKind, out: str, fmt: str, rejects_dir: str, cfg: Config) -> None:
    """Validate `src` in Ray Data tasks and write the valid rows under `out`."""
    remove_folder(out, cfg.storage)
    rows = read_table(src, kind, fmt, cfg.storage, rejects_dir, cfg.data.max_text_chars)
    fs, inner = arrow_filesystem(out, cfg.storage)
    rows.write_parquet(inner, filesystem=fs)
    _ensure_a_file(out, kind, cfg.storage)


def _validate_here(src: str, kind: TableKind, out: str, fmt: str, rejects_dir: str, cfg: Config) -> None:
    """Validate `src` in this process, file by file, and write the valid rows under `out`."""
    remove_folder(out, cfg.storage)
    make_dirs(out, cfg.storage)
    validate = ValidateRows(kind, cfg.data.max_text_chars, rejects_dir, cfg.storage, jsonl=fmt == "jsonl")
    fs, _ = filesystem(src, cfg.storage)
    src_fs, _ = arrow_filesystem(src, cfg.storage)
    out_fs, out_inner = arrow_filesystem(out, cfg.storage)
    for i, (name, _, _) in enumerate(_listing(src, cfg.storage)):
        raw = pa.table({"bytes": [fs.cat_file(name)]}) if fmt == "jsonl" else pq.read_table(name, filesystem=src_fs)
        pq.write_table(validate(raw), f"{out_inner}/part-{i:05d}.parquet", filesystem=out_fs)
    _ensure_a_file(out, kind, cfg.storage)


def _ensure_a_file(out: str, kind: TableKind, storage: StorageConfig) -> None:
    """Write an empty table with the kind's schema when no valid row was written (readers need a file)."""
    fs, inner = filesystem(out, storage)
    if not fs.exists(inner) or not any(f.endswith(".parquet") for f in fs.find(inner)):
        make_dirs(out, storage)
        afs, ainner = arrow_filesystem(out, storage)
        pq.write_table(kind.schema.empty_table(), f"{ainner}/empty.parquet", filesystem=afs)


def _count_rows(path: str, storage: StorageConfig) -> int:
    """Rows of a prepared table, from the parquet footers."""
    fs, inner = arrow_filesystem(path, storage)
    return pads.dataset(inner, filesystem=fs, format="parquet").count_rows()


def _listing(path: str, storage: StorageConfig) -> list[tuple[str, int, str]]:
    """(name, size, modification stamp) of the input files at `path` (a file, a folder or a glob),
    sorted; files named `.*` or `_*` are skipped, as the readers skip them."""
    fs, inner = filesystem(path, storage)
    fs.invalidate_cache()
    if fs.isdir(inner):
        entries = fs.find(inner, detail=True)
    elif glob.has_magic(inner):
        entries = fs.glob(inner, detail=True)
    else:
        entries = {inner: fs.info(inner)}
    return sorted(
        (name, int(info["size"]), str(info.get("ETag") or info.get("mtime") or info.get("LastModified")))
        for name, info in entries.items()
        if info["type"] == "file" and not name.rsplit("/", 1)[-1].startswith((".", "_"))
    )
