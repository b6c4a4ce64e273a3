"""Synthetic behaviour logs with Zipf-distributed reuse, for scale tests and benchmarks.

Behaviour k of the vocabulary (k = 0..n_atoms-1) belongs to field `fields[k % F]` and reads like
"purchase: item 000123 amber lantern"; events pick behaviours with probability proportional to
1 / rank^a (rank order shuffled over the vocabulary). Users and timestamps are uniform. Labels
are random (p = 0.3): the data is for speed and scale, not for quality claims.

Generation is vectorised and chunked: 10M events take well under a minute per core and never
need more than one chunk in memory. Same config, same files.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from bahe_ray.config import StorageConfig, SyntheticConfig
from bahe_ray.data.readers import make_dirs
from bahe_ray.fs import arrow_filesystem, join

_WORDS = np.array(
    "amber basil cedar delta ember fable garnet harbor indigo jasper kelp lumen maple nectar onyx pebble "
    "quartz raven sable tundra umber velvet willow xenon yarrow zephyr".split()
)
T0 = 1_700_000_000  # first timestamp (2023-11-14)
SPAN = 90 * 86_400  # events spread over 90 days


def vocabulary(n: int, fields: list[str]) -> pa.Array:
    """Behaviour texts of ranks 0..n-1."""
    k = np.arange(n)
    field = np.asarray(fields)[k % len(fields)]
    words = _WORDS[k % len(_WORDS)] + " " + _WORDS[(k // len(_WORDS)) % len(_WORDS)]
    texts = np.char.add(np.char.add(field, ": item "), np.char.zfill(k.astype(str), 7))
    return pa.array(np.char.add(np.char.add(texts, " "), words))


def zipf_probabilities(n: int, a: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** a
    return weights / weights.sum()


def generate(cfg: SyntheticConfig, out_dir: str, storage: StorageConfig | None = None) -> tuple[str, str]:
    """Write `events/` and `impressions/` parquet folders under `out_dir`; return their paths."""
    storage = storage or StorageConfig()
    rng = np.random.default_rng(cfg.seed)
    vocab = vocabulary(cfg.n_atoms, cfg.fields)
    field_of = pa.array(np.asarray(cfg.fields)[np.arange(cfg.n_atoms) % len(cfg.fields)])
    rank_to_atom = rng.permutation(cfg.n_atoms)
    probs = zipf_probabilities(cfg.n_atoms, cfg.zipf_a)
    events_dir, impressions_dir = join(out_dir, "events"), join(out_dir, "impressions")
    for path in (events_dir, impressions_dir):
        make_dirs(path, storage)
    fs, _ = arrow_filesystem(out_dir, storage)
    events_inner, impressions_inner = arrow_filesystem(events_dir, storage)[1], arrow_filesystem(impressions_dir, storage)[1]

    with tqdm(total=cfg.n_events, desc="synthetic events", unit="ev") as bar:
        for part, start in enumerate(range(0, cfg.n_events, cfg.rows_per_file)):
            n = min(cfg.rows_per_file, cfg.n_events - start)
            atom = pa.array(rank_to_atom[rng.choice(cfg.n_atoms, size=n, p=probs)])
            table = pa.table(
                {
                    "user_id": pa.array(rng.integers(0, cfg.n_users, size=n).astype(str)),
                    "ts": pa.array(np.sort(rng.integers(T0, T0 + SPAN, size=n))),
                    "field": field_of.take(atom),
                    "text": vocab.take(atom),
                }
            )
            pq.write_table(table, f"{events_inner}/part-{part:05d}.parquet", filesystem=fs)
            bar.update(n)

    n_imp = cfg.n_users * cfg.impressions_per_user
    items = rank_to_atom[rng.choice(cfg.n_atoms, size=n_imp, p=probs)]
    impressions = pa.table(
        {
            "user_id": pa.array(np.repeat(np.arange(cfg.n_users), cfg.impressions_per_user).astype(str)),
            "ts": pa.array(rng.integers(T0 + SPAN // 2, T0 + SPAN, size=n_imp)),
            "item_id": pa.array(items.astype(str)),
            "item_text": vocab.take(pa.array(items)),
            "label": pa.array((rng.random(n_imp) < 0.3).astype(np.int8)),
        }
    )
    pq.write_table(impressions, f"{impressions_inner}/part-00000.parquet", filesystem=fs)
    return events_dir, impressions_dir
