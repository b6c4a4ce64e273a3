"""Atomic behaviours: text normalisation and stable 64-bit ids.

Normalisation (the contract; changing it changes every id):
  1. Unicode NFKC (full-width letters, ligatures and compatibility forms fold together);
  2. every run of whitespace (spaces, tabs, newlines, NBSP...) becomes one ASCII space;
  3. leading and trailing whitespace is removed.
Case and punctuation are kept: the LLM reads them.

Atom id: xxHash64 (seed 0) of the normalised text's UTF-8 bytes, read as a signed int64 so it
fits Arrow/NumPy int64 columns. Same text, same id, on every machine and run.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

_WS = re.compile(r"\s+")


def is_utf8(text: str) -> bool:
    """False for a string with lone surrogates (undecodable input bytes kept by surrogateescape, or
    JSON escapes such as \\ud800): it is not text, cannot be hashed to an atom id, nor written back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def normalize_text(text: str) -> str:
    """Apply the documented normalisation to one behaviour text."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def atom_id(normalized: str) -> int:
    """The signed 64-bit id of an already-normalised text."""
    unsigned = xxhash.xxh64_intdigest(normalized.encode("utf-8"))
    return unsigned - (1 << 64) if unsigned >= (1 << 63) else unsigned


def atom_ids(normalized: Iterable[str]) -> np.ndarray:
    """Ids of many normalised texts as an int64 array."""
    unsigned = np.fromiter(
        (xxhash.xxh64_intdigest(t.encode("utf-8")) for t in normalized), dtype=np.uint64
    )
    return unsigned.view(np.int64)


def normalize_column(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Normalise an Arrow string column (nulls stay null)."""
    values = texts.to_pylist()
    return pa.array([None if t is None else normalize_text(t) for t in values], type=pa.string())


class AtomCollisionError(ValueError):
    """Two different normalised texts hashed to the same 64-bit id."""


def unique_atoms(table: pa.Table) -> pa.Table:
    """Collapse (atom_id, text) rows to one row per id with its occurrence count.

    Input columns: `atom_id`, `text`, and optionally `count` (pre-aggregated occurrences).
    Output columns: `atom_id`, `text`, `count`, `n_texts` (distinct texts under that id;
    anything above 1 is a hash collision, reported by the caller, never merged silently).
    """
    if "count" not in table.column_names:
        table = table.append_column("count", pa.array(np.ones(table.num_rows, dtype=np.int64)))
    grouped = table.group_by("atom_id").aggregate(
        [("text", "min"), ("count", "sum"), ("text", "count_distinct")]
    )
    return pa.table(
        {
            "atom_id": grouped["atom_id"],
            "text": grouped["text_min"],
            "count": grouped["count_sum"],
            "n_texts": pc.cast(grouped["text_count_distinct"], pa.int64()),
        }
    )
