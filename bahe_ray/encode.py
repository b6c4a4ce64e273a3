"""The offline encoding job: logs -> unique atoms -> new atoms -> shallow encoder -> store.

Ray Data plan (streaming; the driver sees only counts and part records):

    read + validate events ──> per-block unique atoms ─┐
    read + validate impressions ─> per-block unique ───┴─ union ─> hash groupby(atom_id) ─> materialize
    unique atoms ─> anti-join with the committed store ─> encoder actor pool (encode + write part)
    part records ─> driver commits a manifest every `store.commit_every_parts` parts and at the end

A run killed at any point leaves the committed store intact; a rerun encodes what is missing.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm
from transformers import AutoConfig

from bahe_ray.atoms import unique_atoms
from bahe_ray.config import Config, EncoderConfig, StorageConfig
from bahe_ray.data import movielens, synthetic
from bahe_ray.data.readers import ValidateRows, make_dirs, read_rejects, read_table, reject_counts, write_parquet_table
from bahe_ray.data.schema import EVENTS, IMPRESSIONS, TableKind
from bahe_ray.encoders import build_encoder, encoder_fingerprint
from bahe_ray.fs import arrow_filesystem, filesystem, join
from bahe_ray.models.registry import resolve_model_path
from bahe_ray.runtime import default_device
from bahe_ray.store import EmbeddingStore, PartWriter

if TYPE_CHECKING:  # Ray is imported where it is used, so the local path runs without it
    import ray.data

log = logging.getLogger(__name__)

MAX_BATCH_RETRIES = 3  # times one encode batch is retried after its actor died


@dataclass
class EncodeSummary:
    """What one encode run read, found and stored."""

    run_id: str
    events_read: int = 0
    impressions_read: int = 0
    events_valid: int = 0
    impressions_valid: int = 0
    rejects: dict[str, int] = field(default_factory=dict)
    atoms_seen: int = 0  # valid behaviour occurrences + impression items
    unique_atoms: int = 0
    collisions: int = 0  # ids shared by different texts: reported, not encoded
    new_atoms: int = 0
    encoded: int = 0
    store_version: int = 0
    store_atoms: int = 0
    fingerprint_id: str = ""
    seconds: float = 0.0

    @property
    def dedup_ratio(self) -> float:
        return self.atoms_seen / self.unique_atoms if self.unique_atoms else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dedup_ratio": round(self.dedup_ratio, 3)}

    def format(self) -> str:
        lines = [
            f"encode run {self.run_id} ({self.seconds:.1f} s, encoder {self.fingerprint_id})",
            f"  events read        {self.events_read:>12,}  valid {self.events_valid:,}",
            f"  impressions read   {self.impressions_read:>12,}  valid {self.impressions_valid:,}",
            f"  atoms seen         {self.atoms_seen:>12,}",
            f"  unique atoms       {self.unique_atoms:>12,}  dedup ratio {self.dedup_ratio:.2f}x",
            f"  new atoms          {self.new_atoms:>12,}  encoded {self.encoded:,}",
            f"  hash collisions    {self.collisions:>12,}",
            f"  store              v{self.store_version}, {self.store_atoms:,} atoms",
        ]
        lines += [f"  rejected  {count:>8,}  {reason}" for reason, count in self.rejects.items()]
        return "\n".join(lines)


def prepare_inputs(cfg: Config) -> tuple[str, str | None, str]:
    """(events path, impressions path, format) for the configured source, writing adapters' output."""
    data = cfg.data
    if data.source == "files":
        return data.events_path or "", data.impressions_path, data.format
    if data.source == "synthetic":
        events, impressions = synthetic.generate(data.synthetic, data.prepared_path, cfg.storage)
        return events, impressions, "parquet"
    ratings = movielens.load_ratings(data.movielens_path, Path(data.cache_dir))
    events, impressions = movielens.to_tables(ratings, data.movielens_users)
    return (
        write_parquet_table(events, join(data.prepared_path, "events"), cfg.storage),
        write_parquet_table(impressions, join(data.prepared_path, "impressions"), cfg.storage),
        "parquet",
    )


def _block_atoms(kind: TableKind, count_column: str):
    """Batch function: validated rows -> unique (atom_id, text) with per-source counts."""

    def fn(batch: pa.Table) -> pa.Table:
        table = pa.table({"atom_id": batch.column(kind.id_column), "text": batch.column(kind.text_column)})
        unique = unique_atoms(table).drop(["n_texts"])
        other = "impression_count" if count_column == "event_count" else "event_count"
        zeros = pa.array(np.zeros(unique.num_rows, dtype=np.int64))
        return unique.rename_columns(["atom_id", "text", count_column]).append_column(other, zeros)

    return fn


def unique_atom_dataset(events: ray.data.Dataset, impressions: ray.data.Dataset | None, partitions: int) -> ray.data.Dataset:
    """Globally unique atoms: atom_id, text, event_count, impression_count, collision."""
    from ray.data.aggregate import Max, Min, Sum

    parts = events.map_batches(_block_atoms(EVENTS, "event_count"), batch_format="pyarrow")
    if impressions is not None:
        items = impressions.map_batches(_block_atoms(IMPRESSIONS, "impression_count"), batch_format="pyarrow")
        parts = parts.union(items.select_columns(["atom_id", "text", "event_count", "impression_count"]))
    grouped = parts.groupby("atom_id", num_partitions=partitions).aggregate(
        Sum("event_count", alias_name="event_count"),
        Sum("impression_count", alias_name="impression_count"),
        Min("text", alias_name="text"),
        Max("text", alias_name="text_max"),
    )

    def flag(batch: pa.Table) -> pa.Table:
        collision = pc.cast(pc.not_equal(batch.column("text"), batch.column("text_max")), pa.int8())
        return batch.drop(["text_max"]).append_column("collision", collision)

    return grouped.map_batches(flag, batch_format="pyarrow")


class MissingFilter:
    """Batch function: keep atoms whose id is not in the committed store (sorted id array)."""

    def __init__(self, committed: np.ndarray) -> None:
        self.committed = committed

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("atom_id").to_numpy()
        pos = np.searchsorted(self.committed, ids).clip(max=max(len(self.committed) - 1, 0))
        present = (self.committed[pos] == ids) if len(self.committed) else np.zeros(len(ids), dtype=bool)
        keep = ~present & (batch.column("collision").to_numpy() == 0)
        return batch.filter(pa.array(keep)).select(["atom_id", "text"])


class EncodeAndWrite:
    """Actor: encode a batch of atom texts and write them as one (uncommitted) store part.

    Built on `actor_device`, the device the driver's fingerprint names, whatever this actor sees.
    """

    def __init__(self, encoder_cfg: EncoderConfig, writer: PartWriter, storage: StorageConfig) -> None:
        self.encoder = build_encoder(encoder_cfg, device=actor_device(encoder_cfg), storage=storage)
        self.writer = writer

    def __call__(self, batch: pa.Table) -> dict[str, list[Any]]:
        ids = batch.column("atom_id").to_numpy()
        texts = batch.column("text").to_pylist()
        vectors = self.encoder.encode(texts)
        part = self.writer.write_part(ids, vectors, texts)
        return {"part": [json.dumps(part.to_dict())]}  # JSON text: one plain column per part


def actor_device(cfg: EncoderConfig) -> str:
    """Where the encoder actors compute: a GPU when they get one."""
    return "cuda" if cfg.num_gpus_per_actor > 0 else "cpu"


def run_encode(cfg: Config) -> EncodeSummary:
    """Run the whole encode job on the current Ray instance and return its summary."""
    import ray
    from ray.data import ActorPoolStrategy

    start = time.time()
    summary = EncodeSummary(run_id=time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6])
    events_path, impressions_path, fmt = prepare_inputs(cfg)
    rejects_dir = join(cfg.rejects_path, summary.run_id)
    max_chars = cfg.data.max_text_chars
    events = read_table(events_path, EVENTS, fmt, cfg.storage, rejects_dir, max_chars)
    impressions = (
        read_table(impressions_path, IMPRESSIONS, fmt, cfg.storage, rejects_dir, max_chars) if impressions_path else None
    )
    partitions = max(1, int(ray.cluster_resources().get("CPU", 1)))
    atoms = unique_atom_dataset(events, impressions, partitions).materialize()

    unique = atoms.count()
    count_atoms(summary, cfg, rejects_dir, int(atoms.sum("event_count") or 0) if unique else 0,
                int(atoms.sum("impression_count") or 0) if unique and impressions is not None else 0,
                unique, int(atoms.sum("collision") or 0) if unique else 0)
    store = open_store(cfg, actor_device(cfg.encoder), summary)
    new_atoms = atoms.map_batches(MissingFilter, fn_constructor_args=(store.ids(),), batch_format="pyarrow",
                                  compute=ActorPoolStrategy(size=1)).materialize()
    summary.new_atoms = new_atoms.count()
    log.info("unique atoms %d, new %d: encoding with %d actor(s)", summary.unique_atoms, summary.new_atoms,
             cfg.encoder.num_actors)
    if summary.new_atoms:
        summary.encoded = encode_into_store(new_atoms, cfg, store)
    summary.store_version = store.version
    summary.store_atoms = store.num_atoms
    summary.seconds = round(time.time() - start, 2)
    return summary


def count_atoms(summary: EncodeSummary, cfg: Config, rejects_dir: str, events_valid: int, impressions_valid: int,
                unique: int, collisions: int) -> None:
    """Fill the summary's counts from the atom table and the rejects this run wrote."""
    summary.events_valid, summary.impressions_valid = events_valid, impressions_valid
    summary.atoms_seen = events_valid + impressions_valid
    summary.unique_atoms, summary.collisions = unique, collisions
    if collisions:
        log.error("%d atom ids are shared by different texts; those atoms are not encoded", collisions)
    rejects = read_rejects(rejects_dir, cfg.storage)
    summary.rejects = reject_counts(rejects)
    n_rejected = {name: int(pc.sum(pc.equal(rejects.column("source"), name)).as_py() or 0) for name in ("events", "impressions")}
    summary.events_read = events_valid + n_rejected["events"]
    summary.impressions_read = impressions_valid + n_rejected["impressions"]


def open_store(cfg: Config, device: str, summary: EncodeSummary) -> EmbeddingStore:
    """The configured store for the encoder's vectors on `device` (created if absent)."""
    fingerprint = encoder_fingerprint(cfg.encoder, device)
    dim = AutoConfig.from_pretrained(resolve_model_path(cfg.encoder.model)).hidden_size
    summary.fingerprint_id = fingerprint.id
    return EmbeddingStore.open(cfg.store.path, fingerprint, dim, storage=cfg.storage, dtype=cfg.store.dtype)


def run_encode_local(cfg: Config, device: str | None = None) -> EncodeSummary:
    """The encode job in this process without Ray (GPU machines without Ray, the benchmark's
    baseline): the same validation, rejects, dedup, anti-join, parts and commits as `run_encode`."""
    start = time.time()
    device = device or default_device()
    summary = EncodeSummary(run_id=time.strftime("%Y%m%dT%H%M%S") + "-local-" + uuid.uuid4().hex[:6])
    events_path, impressions_path, fmt = prepare_inputs(cfg)
    rejects_dir = join(cfg.rejects_path, summary.run_id)
    parts = [_block_atoms(EVENTS, "event_count")(validate_local(events_path, EVENTS, fmt, cfg, rejects_dir))]
    if impressions_path:
        items = _block_atoms(IMPRESSIONS, "impression_count")(validate_local(impressions_path, IMPRESSIONS, fmt, cfg,
                                                                             rejects_dir))
        parts.append(items.select(parts[0].column_names))
    grouped = pa.concat_tables(parts).group_by("atom_id").aggregate(
        [("event_count", "sum"), ("impression_count", "sum"), ("text", "min"), ("text", "max")]
    )
    collision = pc.not_equal(grouped["text_min"], grouped["text_max"])
    atoms = pa.table({"atom_id": grouped["atom_id"], "text": grouped["text_min"],
                      "collision": pc.cast(collision, pa.int8())})
    count_atoms(summary, cfg, rejects_dir, int(pc.sum(grouped["event_count_sum"]).as_py() or 0),
                int(pc.sum(grouped["impression_count_sum"]).as_py() or 0), atoms.num_rows,
                int(pc.sum(collision.cast(pa.int64())).as_py() or 0))
    store = open_store(cfg, device, summary)
    new_atoms = MissingFilter(store.ids())(atoms)
    summary.new_atoms = new_atoms.num_rows
    encoder = build_encoder(cfg.encoder, device=device, storage=cfg.storage)
    step = cfg.encoder.batch_size
    for offset in tqdm(range(0, new_atoms.num_rows, step), desc="encode", unit="batch"):
        batch = new_atoms.slice(offset, step)
        texts = batch.column("text").to_pylist()
        store.add(batch.column("atom_id").to_numpy(), encoder.encode(texts), texts)
        if len(store.pending) >= cfg.store.commit_every_parts:
            summary.encoded += store.commit().added
    summary.encoded += store.commit().added
    summary.store_version, summary.store_atoms = store.version, store.num_atoms
    summary.seconds = round(time.time() - start, 2)
    return summary


def validate_local(path: str, kind: TableKind, fmt: str, cfg: Config, rejects_dir: str) -> pa.Table:
    """All valid rows of one input table read in this process (rejects written as the Ray path does)."""
    validate = ValidateRows(kind, cfg.data.max_text_chars, rejects_dir, cfg.storage, jsonl=fmt == "jsonl")
    make_dirs(rejects_dir, cfg.storage)
    fs, inner = filesystem(path, cfg.storage)
    files = sorted(f for f in fs.find(inner) if not f.rsplit("/", 1)[-1].startswith((".", "_"))) \
        if fs.isdir(inner) else [inner]
    afs, _ = arrow_filesystem(path, cfg.storage)
    batches = [validate(pa.table({"bytes": [fs.cat_file(f)]}) if fmt == "jsonl" else pq.read_table(f, filesystem=afs))
               for f in files]
    return pa.concat_tables(batches) if batches else kind.schema.empty_table()


def encode_into_store(atoms: ray.data.Dataset, cfg: Config, store: EmbeddingStore) -> int:
    """Encode `atoms` (atom_id, text) with the actor pool; commit parts as they arrive.

    An actor that dies (killed, OOM, node lost) is restarted and its in-flight batches are
    retried on it (up to MAX_BATCH_RETRIES times each, so a batch that kills every actor it
    meets fails the job instead of looping); a retried batch writes a new part and the commit
    drops ids already stored, so each atom is stored once. A tensor-parallel actor holds all
    its engine's GPUs (num_gpus_per_actor == tensor_parallel_size).
    """
    from ray.data import ActorPoolStrategy

    enc = cfg.encoder
    parts = atoms.map_batches(
        EncodeAndWrite,
        fn_constructor_kwargs={"encoder_cfg": enc, "writer": store.part_writer(), "storage": cfg.storage},
        compute=ActorPoolStrategy(size=enc.num_actors),
        batch_size=enc.batch_size,
        batch_format="pyarrow",
        num_gpus=enc.num_gpus_per_actor,
        num_cpus=enc.num_cpus_per_actor,
        max_restarts=-1,
        max_task_retries=MAX_BATCH_RETRIES,
    )
    pending: list[Any] = []
    encoded = 0
    for row in parts.iter_rows():
        pending.append(json.loads(row["part"]))
        if len(pending) >= cfg.store.commit_every_parts:
            encoded += store.commit(pending).added
            pending = []
    if pending:
        encoded += store.commit(pending).added
    return encoded
