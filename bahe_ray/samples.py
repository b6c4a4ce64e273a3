"""Point-in-time training samples: ids only, no vectors.

For an impression of user u at time t, and for each configured behaviour field f, the sample
holds the atom ids of u's last N behaviours in f with ts < t (strictly before: a behaviour at
the same second as the impression is excluded), oldest first. Columns:

    user_id, ts, item_id, item_atom_id, label, split, hist_<field> (list<int64>, <= N ids) per field

Split (by time, the same cut for every user): impressions with ts < q(1 - val - test) are
`train`, those before q(1 - test) are `val`, the rest `test`, q being quantiles of impression
timestamps. Behaviours from earlier splits feed later splits' histories, as in production.

The table is written as parquet under `<samples.path>/table/split=<split>/` plus `samples.json` (fields,
N, cut-offs, counts). Built with Ray Data from the prepared inputs (`bahe_ray.data.prepare`, the
validated tables the encode job reads): events and impressions are unioned, hash-grouped by
user and each user's rows are turned into samples by `user_samples`, a plain function.

Reading needs no Ray: `read_split_table` and `pad_histories` run where Ray is absent (the GPU
machine's single-process training), so Ray is imported only where used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bahe_ray.config import Config, SamplesConfig, StorageConfig
from bahe_ray.data.prepare import prepare_inputs, prepared_dataset
from bahe_ray.data.readers import BATCH_ROWS, remove_folder
from bahe_ray.fs import arrow_filesystem, filesystem, join, write_bytes_atomic

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_ROWS = pa.schema(
    [
        ("user_id", pa.string()),
        ("ts", pa.int64()),
        ("is_impression", pa.bool_()),
        ("field", pa.string()),
        ("atom_id", pa.int64()),
        ("item_id", pa.string()),
        ("label", pa.int8()),
    ]
)


def hist_column(field: str) -> str:
    return f"hist_{field}"


def sample_schema(fields: list[str]) -> pa.Schema:
    base = [
        ("user_id", pa.string()),
        ("ts", pa.int64()),
        ("item_id", pa.string()),
        ("item_atom_id", pa.int64()),
        ("label", pa.int8()),
        ("split", pa.string()),
    ]
    return pa.schema(base + [(hist_column(f), pa.list_(pa.int64())) for f in fields])


@dataclass(frozen=True)
class SplitCuts:
    """Impression timestamps below `val_from` are train, below `test_from` val, the rest test."""

    val_from: int
    test_from: int

    def label(self, ts: np.ndarray) -> np.ndarray:
        return np.where(ts < self.val_from, "train", np.where(ts < self.test_from, "val", "test"))


def user_samples(rows: pa.Table, fields: list[str], max_behaviors: int, cuts: SplitCuts) -> pa.Table:
    """All samples of one user from that user's event and impression rows (schema `_ROWS`)."""
    ts = rows.column("ts").to_numpy()
    order = np.argsort(ts, kind="stable")
    rows, ts = rows.take(pa.array(order)), ts[order]
    is_imp = rows.column("is_impression").to_numpy(zero_copy_only=False)
    imp = rows.filter(pa.array(is_imp))
    imp_ts = ts[is_imp]
    columns: dict[str, Any] = {
        "user_id": imp.column("user_id"),
        "ts": imp.column("ts"),
        "item_id": imp.column("item_id"),
        "item_atom_id": imp.column("atom_id"),
        "label": imp.column("label"),
        "split": pa.array(cuts.label(imp_ts), pa.string()),
    }
    event_field = np.asarray(rows.column("field").to_pylist(), dtype=object)
    ids = rows.column("atom_id").to_numpy()
    for field in fields:
        mine = ~is_imp & (event_field == field)
        f_ts, f_ids = ts[mine], ids[mine]
        ends = np.searchsorted(f_ts, imp_ts, side="left")  # events strictly before each impression
        starts = np.maximum(ends - max_behaviors, 0)
        lengths = ends - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        take = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(ends) else np.array([], int)
        values = pa.array(f_ids[take.astype(np.int64)], pa.int64())
        columns[hist_column(field)] = pa.ListArray.from_arrays(pa.array(offsets), values)
    return pa.table(columns, schema=sample_schema(fields))


def _as_rows(kind: str):
    """Batch function mapping validated events or impressions to the common `_ROWS` layout."""

    def fn(batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        if kind == "events":
            return pa.table(
                {
                    "user_id": batch.column("user_id"),
                    "ts": batch.column("ts"),
                    "is_impression": pa.array(np.zeros(n, dtype=bool)),
                    "field": batch.column("field"),
                    "atom_id": batch.column("atom_id"),
                    "item_id": pa.nulls(n, pa.string()),
                    "label": pa.nulls(n, pa.int8()),
                },
                schema=_ROWS,
            )
        return pa.table(
            {
                "user_id": batch.column("user_id"),
                "ts": batch.column("ts"),
                "is_impression": pa.array(np.ones(n, dtype=bool)),
                "field": pa.nulls(n, pa.string()),
                "atom_id": batch.column("item_atom_id"),
                "item_id": batch.column("item_id"),
                "label": batch.column("label"),
            },
            schema=_ROWS,
        )

    return fn


SPLIT_BINS = 1 << 20  # histogram bins over the impression time range: cut points exact to range / 2^20


def split_cuts(impressions: ray.data.Dataset, cfg: SamplesConfig) -> SplitCuts:
    """Time cut-offs at quantiles of impression timestamps, the same on every run.

    A count histogram of the timestamps over [min, max] in SPLIT_BINS equal bins (one second wide
    when the range allows) is summed over batches in any order, so the cuts do not depend on
    how the data streams; each cut is the first bin edge below which at least that fraction of
    impressions lies. The driver holds only the histogram (8 MiB); the timestamps stay in the
    object store.
    """
    ts_only = impressions.select_columns(["ts"]).materialize()  # read once for count, min, max and the histogram
    if ts_only.count() == 0:
        raise ValueError("impressions: no valid rows to split")
    low, high = int(ts_only.min("ts")), int(ts_only.max("ts"))
    width = -(-(high - low + 1) // SPLIT_BINS)
    counts = np.zeros(SPLIT_BINS, np.int64)
    for batch in ts_only.iter_batches(batch_format="numpy", batch_size=65_536):
        counts += np.bincount((batch["ts"].astype(np.int64) - low) // width, minlength=SPLIT_BINS)
    below = np.cumsum(counts)  # below[i]: impressions with ts < low + (i + 1) * width

    def cut(fraction: float) -> int:
        return low + (int(np.searchsorted(below, fraction * below[-1])) + 1) * width

    q_val = 1.0 - cfg.val_fraction - cfg.test_fraction
    return SplitCuts(val_from=cut(q_val), test_from=cut(1.0 - cfg.test_fraction))


@dataclass
class SamplesSummary:
    path: str
    fields: list[str]
    max_behaviors: int
    cuts: dict[str, int]
    counts: dict[str, int]
    positives: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_samples(events: ray.data.Dataset, impressions: ray.data.Dataset, cfg: Config) -> SamplesSummary:
    """Build and write the sample table for validated `events` and `impressions` datasets."""
    import ray

    scfg = cfg.samples
    cuts = split_cuts(impressions, scfg)
    rows = events.map_batches(_as_rows("events"), batch_format="pyarrow", batch_size=BATCH_ROWS).union(
        impressions.map_batches(_as_rows("impressions"), batch_format="pyarrow", batch_size=BATCH_ROWS)
    )
    partitions = max(1, int(ray.cluster_resources().get("CPU", 1)))
    samples = (
        rows.groupby("user_id", num_partitions=partitions)
        .map_groups(user_samples, fn_args=(scfg.fields, scfg.max_behaviors, cuts), batch_format="pyarrow")
        .materialize()
    )
    remove_folder(join(scfg.path, "table"), cfg.storage)
    fs, inner = arrow_filesystem(join(scfg.path, "table"), cfg.storage)
    samples.write_parquet(inner, filesystem=fs, partition_cols=["split"])
    counts, positives = {}, {}
    for split in SPLITS:
        labels = split_labels(scfg.path, split, cfg.storage)
        counts[split], positives[split] = len(labels), int(labels.sum())
    summary = SamplesSummary(scfg.path, list(scfg.fields), scfg.max_behaviors, asdict(cuts), counts, positives)
    fs, inner = filesystem(join(scfg.path, "samples.json"), cfg.storage)
    write_bytes_atomic(fs, inner, json.dumps(summary.to_dict(), indent=2).encode())
    log.info("samples: %s", counts)
    return summary


def build_configured_samples(cfg: Config) -> SamplesSummary:
    """Build the sample table from the prepared inputs: the tables `bahe encode` reads, prepared
    now only if no earlier stage prepared them from the same inputs."""
    prepared = prepare_inputs(cfg, use_ray=True)
    if prepared.impressions is None:
        raise ValueError("samples need impressions: set data.impressions_path")
    events = prepared_dataset(prepared.events, cfg.storage)
    impressions = prepared_dataset(prepared.impressions, cfg.storage)
    return build_samples(events, impressions, cfg)


def read_summary(path: str, storage: StorageConfig) -> SamplesSummary:
    fs, inner = filesystem(join(path, "samples.json"), storage)
    return SamplesSummary(**json.loads(fs.cat_file(inner)))


def read_split(path: str, split: str, storage: StorageConfig) -> ray.data.Dataset:
    """One split of a written sample table as a Dataset."""
    import ray.data

    fs, inner = arrow_filesystem(join(path, "table", f"split={split}"), storage)
    return ray.data.read_parquet(inner, filesystem=fs)


def read_split_table(path: str, split: str, storage: StorageConfig, columns: list[str] | None = None) -> pa.Table:
    """One written split (or some of its columns) as one in-memory table, read with pyarrow (no Ray)."""
    fs, inner = arrow_filesystem(join(path, "table", f"split={split}"), storage)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no {split!r} split in the sample table at {path} (run `bahe samples`)")
    return pq.read_table(inner, filesystem=fs, columns=columns)


def split_labels(path: str, split: str, storage: StorageConfig) -> np.ndarray:
    """The label column of one written split (empty if the split has no rows)."""
    try:
        return read_split_table(path, split, storage, ["label"]).column("label").to_numpy()
    except FileNotFoundError:
        return np.zeros(0, dtype=np.int8)


def pad_histories(lists: pa.ListArray | pa.ChunkedArray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (B, N), mask (B, N)) from a list<int64> column, oldest first, padded at the end with 0."""
    if isinstance(lists, pa.ChunkedArray):
        lists = pa.concat_arrays(lists.chunks) if lists.num_chunks else pa.array([], pa.list_(pa.int64()))
    lengths = np.minimum(pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False), max_len)
    rows = len(lists)
    ids = np.zeros((rows, max_len), dtype=np.int64)
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    flat = pc.list_flatten(lists).to_numpy()
    starts = lists.offsets.to_numpy()[:-1] - lists.offsets[0].as_py()
    full_lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
    first = starts + full_lengths - lengths  # keep the most recent max_len ids
    src = first[:, None] + np.arange(max_len)[None, :]
    ids[mask] = flat[src[mask]]
    return ids, mask
