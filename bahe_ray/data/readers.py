"""Streaming Ray Data readers for events and impressions (parquet or JSON Lines, local or s3://).

Each reader validates every row inside the Ray Data tasks (`bahe_ray.data.schema`): valid rows
flow on with their atom ids, invalid ones are written by the same task to
`<rejects_dir>/<table>-<uuid>.parquet` with their reason. Nothing is gathered on the driver.

JSON Lines files are read as bytes and split into lines by the reading task, so a line that
is not JSON or not UTF-8 becomes a reject instead of failing the whole file. Undecodable bytes
are kept as lone surrogates (`surrogateescape`) so the field that holds them is named.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from bahe_ray.config import StorageConfig
from bahe_ray.data.schema import REJECTS_SCHEMA, TableKind, reject_row, split_valid
from bahe_ray.fs import arrow_filesystem, filesystem, join

if TYPE_CHECKING:  # Ray is imported where it is used: the local encode path runs without it
    import ray.data

# Rows per Ray Data batch of input rows. Reads split even a small file into many blocks; batching
# them again keeps per-batch work (validation, per-block dedup) and later shuffles coarse.
BATCH_ROWS = 10_000


def parse_jsonl(data: bytes, source: str) -> tuple[list[Any], list[dict[str, str]]]:
    """Split JSON Lines bytes into parsed rows and rejects (bad JSON); blank lines are skipped."""
    rows: list[Any] = []
    rejects: list[dict[str, str]] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        text = line.decode("utf-8", "surrogateescape")
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as err:
            rejects.append(reject_row(source, f"row: not valid JSON (line {number}: {err.msg})", text))
        except (ValueError, RecursionError) as err:  # a number over int_max_str_digits; nesting too deep
            rejects.append(reject_row(source, f"row: not valid JSON (line {number}: {str(err)[:80]})", text))
    return rows, rejects


class ValidateRows:
    """Ray Data batch function: raw rows -> valid typed rows; rejects written to `rejects_dir`."""

    def __init__(self, kind: TableKind, max_chars: int, rejects_dir: str, storage: StorageConfig, jsonl: bool) -> None:
        self.kind = kind
        self.max_chars = max_chars
        self.rejects_dir = rejects_dir
        self.storage = storage
        self.jsonl = jsonl

    def __call__(self, batch: pa.Table) -> pa.Table:
        early_rejects: list[dict[str, str]] = []
        if self.jsonl:
            rows: list[Any] = []
            for data in batch.column("bytes").to_pylist():
                parsed, bad = parse_jsonl(data, self.kind.name)
                rows.extend(parsed)
                early_rejects.extend(bad)
        else:
            rows = batch.to_pylist()
        good, rejects = split_valid(rows, self.kind, self.max_chars)
        if early_rejects:
            rejects = pa.concat_tables([pa.Table.from_pylist(early_rejects, schema=REJECTS_SCHEMA), rejects])
        if rejects.num_rows:
            fs, root = arrow_filesystem(self.rejects_dir, self.storage)
            pq.write_table(rejects, f"{root}/{self.kind.name}-{uuid.uuid4().hex}.parquet", filesystem=fs)
        return good


def read_table(
    path: str | list[str],
    kind: TableKind,
    fmt: str,
    storage: StorageConfig,
    rejects_dir: str,
    max_chars: int,
) -> ray.data.Dataset:
    """A Dataset of validated rows of one input table (see `bahe_ray.data.schema`)."""
    import ray.data

    paths = [path] if isinstance(path, str) else path
    fs, _ = arrow_filesystem(paths[0], storage)
    inner = [arrow_filesystem(p, storage)[1] for p in paths]
    make_dirs(rejects_dir, storage)
    if fmt == "parquet":
        ds = ray.data.read_parquet(inner, filesystem=fs)
    elif fmt == "jsonl":
        ds = ray.data.read_binary_files(inner, filesystem=fs, file_extensions=None)
    else:
        raise ValueError(f"data.format: expected 'parquet' or 'jsonl', got {fmt!r}")
    validate = ValidateRows(kind, max_chars, rejects_dir, storage, jsonl=fmt == "jsonl")
    return ds.map_batches(validate, batch_format="pyarrow", batch_size=None if fmt == "jsonl" else BATCH_ROWS)


def make_dirs(path: str, storage: StorageConfig) -> None:
    fs, inner = filesystem(path, storage)
    fs.makedirs(inner, exist_ok=True)


def remove_folder(path: str, storage: StorageConfig) -> None:
    """Remove a folder written earlier, so a rewrite never mixes old and new files."""
    fs, inner = filesystem(path, storage)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def read_rejects(rejects_dir: str, storage: StorageConfig) -> pa.Table:
    """All rejects written under `rejects_dir` (empty table when none)."""
    fs, inner = filesystem(rejects_dir, storage)
    files = sorted(f for f in fs.find(inner) if f.endswith(".parquet")) if fs.exists(inner) else []
    if not files:
        return REJECTS_SCHEMA.empty_table()
    afs, _ = arrow_filesystem(rejects_dir, storage)
    return pa.concat_tables([pq.read_table(f, filesystem=afs, schema=REJECTS_SCHEMA) for f in files])


def reject_counts(rejects: pa.Table) -> dict[str, int]:
    """Reject counts by `source: field: reason`, without the row-specific detail in parentheses."""
    counts: dict[str, int] = {}
    for source, reason in zip(rejects.column("source").to_pylist(), rejects.column("reason").to_pylist()):
        key = f"{source}: " + reason.split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def write_parquet_table(table: pa.Table, path: str, storage: StorageConfig) -> str:
    """Write one table as `<path>/part-0.parquet` (for adapters that produce small inputs)."""
    make_dirs(path, storage)
    fs, inner = arrow_filesystem(path, storage)
    target = join(inner, "part-0.parquet")
    pq.write_table(table, target, filesystem=fs)
    return path
