"""The offline encoding job: logs -> unique atoms -> new atoms -> shallow encoder -> store.

Ray Data plan (streaming; the driver sees only counts and part records):

    prepared inputs (`bahe_ray.data.prepare`: read + validated once per run, reused by samples)
    prepared events ──────> per-block unique atoms ─┐
    prepared impressions ─> per-block unique atoms ─┴─ union ─> hash groupby(atom_id) ─> materialize
    unique atoms ─> anti-join with the committed store ─> encoder actor pool (encode + write part)
    part records ─> driver commits a manifest every `store.commit_every_parts` parts and at the end

A run killed at any point leaves the committed store intact; a rerun encodes what is missing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm
from transformers import AutoConfig

from bahe_ray.config import Config, EncoderConfig, StorageConfig
from bahe_ray.data.prepare import PreparedInputs, new_run_id, prepare_inputs, prepared_dataset, prepared_table
from bahe_ray.data.readers import BATCH_ROWS
from bahe_ray.data.schema import EVENTS, IMPRESSIONS, TableKind
from bahe_ray.encoders import choose_encoder, encoder_fingerprint
from bahe_ray.models.registry import resolve_model_path
from bahe_ray.runtime import default_device
from bahe_ray.store import EmbeddingStore, PartWriter
from bahe_ray.store.sorted_ids import isin_sorted

if TYPE_CHECKING:  # Ray is imported where it is used, so the local path runs without it
    import ray.data

log = logging.getLogger(__name__)

# Times one encode batch is retried after its actor died or could not be reached. A lost node's actors are
# unreachable until the GCS declares the node dead (tens of seconds), and every refused call counts as a retry,
# backing off from 100 ms and doubling: 3 retries gave up after 2 s and failed the job (tests/test_fake_cluster.py);
# 10 outlast the detection. A batch that kills every actor it meets still fails the job after 10 restarts.
MAX_BATCH_RETRIES = 10


@dataclass
class EncodeSummary:
    """What one encode run read, found and stored."""

    run_id: str
    events_read: int = 0
    impressions_read: int = 0
    events_valid: int = 0
    impressions_valid: int = 0
    rejects: dict[str, int] = field(default_factory=dict)
    rejects_dir: str = ""  # where the run that prepared the inputs set the bad rows aside
    atoms_seen: int = 0  # valid behaviour occurrences + impression items
    unique_atoms: int = 0
    collisions: int = 0  # ids shared by different texts: reported, not encoded
    new_atoms: int = 0
    encoded: int = 0
    store_version: int = 0
    store_atoms: int = 0
    fingerprint_id: str = ""
    backends: list[str] = field(default_factory=list)  # each backend the encoders ran on, and why
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
        lines += [f"  encoder backend    {backend}" for backend in self.backends]
        lines += [f"  rejected  {count:>8,}  {reason}" for reason, count in self.rejects.items()]
        if self.rejects:
            lines.append(f"  rejected rows in   {self.rejects_dir}")
        return "\n".join(lines)


def atom_columns(kind: TableKind) -> list[str]:
    """The columns of a prepared table that hold its atoms: id and text."""
    return [kind.id_column, kind.text_column]


def atom_rows(table: pa.Table, kind: TableKind) -> pa.Table:
    """The atoms of prepared events or impressions as (atom_id, text) rows."""
    return pa.table({"atom_id": table.column(kind.id_column), "text": table.column(kind.text_column)})


def group_atoms(table: pa.Table) -> pa.Table:
    """One row per atom id: atom_id, text (the smallest), text_max (the largest; another text: a collision).

    Takes (atom_id, text) rows, or rows already grouped (atom_id, text, text_max), so the Ray
    path groups per block and then globally, and the local path groups once, alike.
    """
    if "text_max" not in table.column_names:
        table = table.append_column("text_max", table.column("text"))
    grouped = table.group_by("atom_id").aggregate([("text", "min"), ("text_max", "max")])
    return pa.table({"atom_id": grouped["atom_id"], "text": grouped["text_min"], "text_max": grouped["text_max_max"]})


def flag_collisions(table: pa.Table) -> pa.Table:
    """atom_id, text, collision (int8, 1 where the id carries two texts) from grouped atoms."""
    collision = pc.cast(pc.not_equal(table.column("text"), table.column("text_max")), pa.int8())
    return table.drop(["text_max"]).append_column("collision", collision)


def unique_atom_dataset(events: ray.data.Dataset, impressions: ray.data.Dataset | None, partitions: int) -> ray.data.Dataset:
    """Globally unique atoms of prepared tables: atom_id, text, collision."""
    from ray.data.aggregate import Max, Min

    def block_atoms(kind: TableKind):
        return lambda batch: group_atoms(atom_rows(batch, kind))

    parts = events.map_batches(block_atoms(EVENTS), batch_format="pyarrow", batch_size=BATCH_ROWS)
    if impressions is not None:
        parts = parts.union(impressions.map_batches(block_atoms(IMPRESSIONS), batch_format="pyarrow", batch_size=BATCH_ROWS))
    grouped = parts.groupby("atom_id", num_partitions=partitions).aggregate(
        Min("text", alias_name="text"), Max("text_max", alias_name="text_max")
    )
    return grouped.map_batches(flag_collisions, batch_format="pyarrow")


class MissingFilter:
    """Batch function: keep atoms whose id is not in the committed store (sorted id array) and
    that carry one text (collisions are reported, not encoded)."""

    def __init__(self, committed: np.ndarray) -> None:
        self.committed = committed

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("atom_id").to_numpy()
        keep = ~isin_sorted(ids, self.committed) & (batch.column("collision").to_numpy() == 0)
        return batch.filter(pa.array(keep)).select(["atom_id", "text"])


class EncodeAndWrite:
    """Actor: encode a batch of atom texts and write them as one (uncommitted) store part.

    Built on `device` (`actor_device`), the device the driver's fingerprint names, whatever this actor sees.
    """

    def __init__(self, encoder_cfg: EncoderConfig, device: str, writer: PartWriter, storage: StorageConfig) -> None:
        self.encoder, self.backend = choose_encoder(encoder_cfg, device=device, storage=storage)
        self.writer = writer

    def __call__(self, batch: pa.Table) -> dict[str, list[Any]]:
        ids = batch.column("atom_id").to_numpy()
        texts = batch.column("text").to_pylist()
        vectors = self.encoder.encode(texts)
        part = self.writer.write_part(ids, vectors, texts)
        # JSON text: one plain column per part
        return {"part": [json.dumps(part.to_dict())], "backend": [str(self.backend)]}


def actor_device(cfg: Config) -> str:
    """Where the encoder actors compute: a GPU when they get one, unless `ray.gpu_compute` is cpu."""
    return "cuda" if cfg.encoder.num_gpus_per_actor > 0 and cfg.ray.gpu_compute == "cuda" else "cpu"


def run_encode(cfg: Config) -> EncodeSummary:
    """Run the whole encode job on the current Ray instance and return its summary."""
    import ray
    from ray.data import ActorPoolStrategy

    start = time.time()
    summary = EncodeSummary(run_id=new_run_id())
    prepared = prepare_inputs(cfg, use_ray=True, run_id=summary.run_id)
    events = prepared_dataset(prepared.events, cfg.storage, atom_columns(EVENTS))
    impressions = (prepared_dataset(prepared.impressions, cfg.storage, atom_columns(IMPRESSIONS))
                   if prepared.impressions else None)
    partitions = max(1, int(ray.cluster_resources().get("CPU", 1)))
    atoms = unique_atom_dataset(events, impressions, partitions).materialize()
    unique = atoms.count()
    count_atoms(summary, prepared, unique, int(atoms.sum("collision") or 0) if unique else 0)
    store = open_store(cfg, actor_device(cfg), summary)
    new_atoms = atoms.map_batches(MissingFilter, fn_constructor_args=(store.ids(),), batch_format="pyarrow",
                                  compute=ActorPoolStrategy(size=1)).materialize()
    summary.new_atoms = new_atoms.count()
    log.info("unique atoms %d, new %d: encoding with %d actor(s)", summary.unique_atoms, summary.new_atoms,
             cfg.encoder.num_actors)
    if summary.new_atoms:
        summary.encoded, summary.backends = encode_into_store(new_atoms, cfg, store)
    summary.store_version = store.version
    summary.store_atoms = store.num_atoms
    summary.seconds = round(time.time() - start, 2)
    return summary


def count_atoms(summary: EncodeSummary, prepared: PreparedInputs, unique: int, collisions: int) -> None:
    """Fill the summary's counts: rows and rejects from preparing the inputs, atoms from the atom table."""
    summary.events_read, summary.events_valid = prepared.events_read, prepared.events_valid
    summary.impressions_read, summary.impressions_valid = prepared.impressions_read, prepared.impressions_valid
    summary.rejects, summary.rejects_dir = dict(prepared.rejects), prepared.rejects_dir
    summary.atoms_seen = prepared.events_valid + prepared.impressions_valid
    summary.unique_atoms, summary.collisions = unique, collisions
    if collisions:
        log.error("%d atom ids are shared by different texts; those atoms are not encoded", collisions)


def open_store(cfg: Config, device: str, summary: EncodeSummary) -> EmbeddingStore:
    """The configured store for the encoder's vectors on `device` (created if absent)."""
    fingerprint = encoder_fingerprint(cfg.encoder, device)
    dim = AutoConfig.from_pretrained(resolve_model_path(cfg.encoder.model)).hidden_size
    summary.fingerprint_id = fingerprint.id
    return EmbeddingStore.open(cfg.store.path, fingerprint, dim, storage=cfg.storage, dtype=cfg.store.dtype)


def run_encode_local(cfg: Config, device: str | None = None) -> EncodeSummary:
    """The encode job in this process without Ray (GPU machines without Ray, the benchmark's
    baseline): the same prepared inputs, dedup, anti-join, parts and commits as `run_encode`."""
    start = time.time()
    device = device or default_device()
    summary = EncodeSummary(run_id=new_run_id("local"))
    prepared = prepare_inputs(cfg, use_ray=False, run_id=summary.run_id)
    tables = ((prepared.events, EVENTS), (prepared.impressions, IMPRESSIONS))
    rows = [atom_rows(prepared_table(path, cfg.storage, atom_columns(kind)), kind) for path, kind in tables if path]
    atoms = flag_collisions(group_atoms(pa.concat_tables(rows)))
    count_atoms(summary, prepared, atoms.num_rows, int(pc.sum(atoms.column("collision")).as_py() or 0))
    store = open_store(cfg, device, summary)
    new_atoms = MissingFilter(store.ids())(atoms)
    summary.new_atoms = new_atoms.num_rows
    encoder, backend = choose_encoder(cfg.encoder, device=device, storage=cfg.storage)
    summary.backends = [str(backend)]
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


def encode_into_store(atoms: ray.data.Dataset, cfg: Config, store: EmbeddingStore) -> tuple[int, list[str]]:
    """Encode `atoms` (atom_id, text) with the actor pool; commit parts as they arrive. Returns the atoms
    added and the backends the actors ran on, with the reason (`encoder.backend: auto` may differ by node).

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
        fn_constructor_kwargs={"encoder_cfg": enc, "device": actor_device(cfg), "writer": store.part_writer(),
                               "storage": cfg.storage},
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
    backends: set[str] = set()
    for row in parts.iter_rows():
        backends.add(row["backend"])
        pending.append(json.loads(row["part"]))
        if len(pending) >= cfg.store.commit_every_parts:
            encoded += store.commit(pending).added
            pending = []
    if pending:
        encoded += store.commit(pending).added
    return encoded, sorted(backends)
