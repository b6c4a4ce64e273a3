"""Point-in-time training samples: ids only, no vectors.

For an impression of user u at time t, and for each configured behaviour field f, the sample
holds the atom ids of u's last N behaviours in f with ts < t (strictly before: a behaviour at
the same second as the impression is excluded), oldest first. Columns:

    user_id, ts, item_id, item_atom_id, label, split, hist_<field> (list<int64>, <= N ids) per field

Split (by time, the same cut for every user): impressions with ts < q(1 - val - test) are
`train`, those before q(1 - test) are `val`, the rest `test`, q being quantiles of impression
timestamps. Behaviours from earlier splits feed later splits' histories, as in production.

`samples.protocol: rella` follows ReLLa's MovieLens protocol instead: the history is the last N
behaviours of all fields together (one timeline, N = 30 in configs/ml100k_rella.yaml), each kept in
its field's column; impressions with fewer than `samples.min_history` (5) earlier behaviours are
dropped; the time quantiles are taken over the kept samples (8:1:1 with the default fractions).

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


def history_windows(ts: np.ndarray, event_field: np.ndarray, is_imp: np.ndarray, imp_ts: np.ndarray,
                    fields: list[str], max_behaviors: int, protocol: str) -> tuple[dict[str, tuple], np.ndarray]:
    """Per field, the (starts, ends) of each impression's history among that field's events (time order), and
    each impression's history length before truncation.

    "point_in_time": each field's last `max_behaviors` events strictly before the impression, on its own.
    "rella": the last `max_behaviors` events of all fields together (one timeline), each kept in its field.
    """
    windows: dict[str, tuple] = {}
    events = ~is_imp & np.logical_or.reduce([event_field == f for f in fields])
    all_ends = np.searchsorted(ts[events], imp_ts, side="left")  # events strictly before each impression
    all_starts = np.maximum(all_ends - max_behaviors, 0)
    for field in fields:
        mine = event_field[events] == field
        if protocol == "rella":  # field f's events among the first i events of the joint timeline
            before = np.concatenate([[0], np.cumsum(mine)])
            windows[field] = (before[all_starts], before[all_ends])
        else:
            ends = np.searchsorted(ts[events][mine], imp_ts, side="left")
            windows[field] = (np.maximum(ends - max_behaviors, 0), ends)
    return windows, all_ends


def user_samples(rows: pa.Table, fields: list[str], max_behaviors: int, cuts: SplitCuts | None,
                 protocol: str = "point_in_time", min_history: int = 0) -> pa.Table:
    """All samples of one user from that user's event and impression rows (schema `_ROWS`).

    Impressions with fewer than `min_history` earlier events (all fields) are left out. `cuts=None` leaves
    the split empty, to be assigned once all samples exist (`samples.protocol: rella`).
    """
    ts = rows.column("ts").to_numpy()
    order = np.argsort(ts, kind="stable")
    rows, ts = rows.take(pa.array(order)), ts[order]
    is_imp = rows.column("is_impression").to_numpy(zero_copy_only=False)
    event_field = np.asarray(rows.column("field").to_pylist(), dtype=object)
    windows, history = history_windows(ts, event_field, is_imp, ts[is_imp], fields, max_behaviors, protocol)
    kept = history >= min_history
    imp = rows.filter(pa.array(is_imp)).filter(pa.array(kept))
    columns: dict[str, Any] = {
        "user_id": imp.column("user_id"),
        "ts": imp.column("ts"),
        "item_id": imp.column("item_id"),
        "item_atom_id": imp.column("atom_id"),
        "label": imp.column("label"),
        "split": pa.nulls(imp.num_rows, pa.string()) if cuts is None else pa.array(cuts.label(ts[is_imp][kept]), pa.string()),
    }
    ids = rows.column("atom_id").to_numpy()
    for field in fields:
        f_ids = ids[~is_imp & (event_field == field)]
        starts, ends = (w[kept] for w in windows[field])
        offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int32)
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
    """Time cut-offs at quantiles of the timestamps of `impressions` (any dataset with a ts column: the
    impressions, or the kept samples under `samples.protocol: rella`), the same on every run.

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
    protocol: str = "point_in_time"
    min_history: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, cfg: SamplesConfig) -> bool:
        """Whether this table is what `cfg` would build: fields, N, protocol (and rella's min_history)."""
        min_history = cfg.min_history if cfg.protocol == "rella" else 0
        return (self.fields, self.max_behaviors, self.protocol, self.min_history) == (
            list(cfg.fields), cfg.max_behaviors, cfg.protocol, min_history)


def build_samples(events: ray.data.Dataset, impressions: ray.data.Dataset, cfg: Config) -> SamplesSummary:
    """Build and write the sample table for validated `events` and `impressions` datasets.

    "point_in_time": split at quantiles of all impression timestamps. "rella": impressions with fewer than
    `samples.min_history` earlier behaviours are dropped first, and the split is cut over the kept samples.
    """
    import ray

    scfg = cfg.samples
    rella = scfg.protocol == "rella"
    cuts = None if rella else split_cuts(impressions, scfg)
    rows = events.map_batches(_as_rows("events"), batch_format="pyarrow", batch_size=BATCH_ROWS).union(
        impressions.map_batches(_as_rows("impressions"), batch_format="pyarrow", batch_size=BATCH_ROWS)
    )
    partitions = max(1, int(ray.cluster_resources().get("CPU", 1)))
    min_history = scfg.min_history if rella else 0
    samples = (
        rows.groupby("user_id", num_partitions=partitions)
        .map_groups(user_samples, fn_args=(scfg.fields, scfg.max_behaviors, cuts, scfg.protocol, min_history),
                    batch_format="pyarrow")
        .materialize()
    )
    if cuts is None:
        cuts = split_cuts(samples, scfg)
        samples = samples.map_batches(_with_split(cuts), batch_format="pyarrow").materialize()
    remove_folder(join(scfg.path, "table"), cfg.storage)
    fs, inner = arrow_filesystem(join(scfg.path, "table"), cfg.storage)
    samples.write_parquet(inner, filesystem=fs, partition_cols=["split"])
    counts, positives = {}, {}
    for split in SPLITS:
        labels = split_labels(scfg.path, split, cfg.storage)
        counts[split], positives[split] = len(labels), int(labels.sum())
    summary = SamplesSummary(scfg.path, list(scfg.fields), scfg.max_behaviors, asdict(cuts), counts, positives,
                             scfg.protocol, min_history)
    fs, inner = filesystem(join(scfg.path, "samples.json"), cfg.storage)
    write_bytes_atomic(fs, inner, json.dumps(summary.to_dict(), indent=2).encode())
    log.info("samples (%s): %s", scfg.protocol, counts)
    return summary


def _with_split(cuts: SplitCuts):
    """Batch function setting the split column of sample rows from their ts."""

    def fn(batch: pa.Table) -> pa.Table:
        split = pa.array(cuts.label(batch.column("ts").to_numpy()), pa.string())
        return batch.set_column(batch.schema.get_field_index("split"), "split", split)

    return fn


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
