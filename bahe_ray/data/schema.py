"""Input tables and row validation.

Behaviour events: `user_id, ts, field, text`; impressions: `user_id, ts, item_id, item_text, label`.

- `user_id`, `item_id`: string, or an integer (stored as its decimal string); at most 256 characters.
- Every string is valid UTF-8 (undecodable input bytes are named by field, never stored).
- `ts`: seconds since the Unix epoch (integer, integral float, digit string, ISO-8601 string or
  an Arrow timestamp); must lie in [1970-01-01, 2200-01-01).
- `field`: a non-empty behaviour field name (at most 64 characters), e.g. "purchase".
- `text` / `item_text`: UTF-8 text, normalised (`bahe_ray.atoms`), non-empty, at most
  `data.max_text_chars` characters.
- `label`: 0 or 1 (integer, boolean or 0.0 / 1.0).

A row that breaks a rule is not dropped: `split_valid` returns it in a rejects table with the
first reason found ("ts: not a timestamp ('abc')": the field, the
reason, and in parentheses the detail), the raw row as JSON, and its source.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from bahe_ray.atoms import atom_ids, is_utf8, normalize_text

MAX_TS = int(dt.datetime(2200, 1, 1, tzinfo=dt.timezone.utc).timestamp())
MAX_FIELD_CHARS = 64
MAX_ID_CHARS = 256
MAX_RAW_CHARS = 2_000  # of a rejected row's JSON, kept for inspection

EVENTS_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("ts", pa.int64()), ("field", pa.string()), ("text", pa.string()), ("atom_id", pa.int64())]
)
IMPRESSIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("ts", pa.int64()),
        ("item_id", pa.string()),
        ("item_text", pa.string()),
        ("label", pa.int8()),
        ("item_atom_id", pa.int64()),
    ]
)
REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("row", pa.string())])


class RowError(ValueError):
    """One field of one row is invalid; the message names the field and the reason."""


def _missing(name: str, value: Any) -> None:
    if value is None:
        raise RowError(f"{name}: missing")


def _utf8(name: str, text: str) -> str:
    """`text`, if it encodes as UTF-8 (lone surrogates mark undecodable input bytes: surrogateescape)."""
    if not is_utf8(text):
        raise RowError(f"{name}: not valid UTF-8")
    return text


def _bounded(name: str, text: str, max_chars: int) -> str:
    """`text` if it is non-empty and at most `max_chars` long; a RowError naming the field otherwise."""
    if not text:
        raise RowError(f"{name}: empty")
    if len(text) > max_chars:
        raise RowError(f"{name}: longer than {max_chars} characters ({len(text)})")
    return text


def parse_id(name: str, value: Any) -> str:
    _missing(name, value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(f"{name}: expected a string or integer (got {type(value).__name__})")
    return _bounded(name, _utf8(name, str(value).strip()), MAX_ID_CHARS)


def parse_ts(value: Any) -> int:
    _missing("ts", value)
    if isinstance(value, bool):
        raise RowError("ts: expected seconds since the epoch (got bool)")
    if isinstance(value, dt.datetime):
        value = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        seconds = value.timestamp()
    elif isinstance(value, (int, float)):
        seconds = value
    elif isinstance(value, str):
        try:
            seconds = int(value) if value.strip().lstrip("-").isdigit() else _iso_seconds(value)
        except ValueError:
            raise RowError(f"ts: not a timestamp ({value[:40]!r})") from None
    else:
        raise RowError(f"ts: expected seconds since the epoch (got {type(value).__name__})")
    if isinstance(seconds, float) and (not math.isfinite(seconds) or seconds != int(seconds)):
        raise RowError(f"ts: not a whole number of seconds ({seconds!r})")
    seconds = int(seconds)
    if not 0 <= seconds < MAX_TS:
        raise RowError(f"ts: out of range [0, {MAX_TS}) ({seconds})")
    return seconds


def _iso_seconds(text: str) -> float:
    parsed = dt.datetime.fromisoformat(text.strip())
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp()


def parse_field(value: Any) -> str:
    _missing("field", value)
    if not isinstance(value, str):
        raise RowError(f"field: expected a string (got {type(value).__name__})")
    name = _utf8("field", value.strip())
    if not name:
        raise RowError("field: empty")
    if len(name) > MAX_FIELD_CHARS:
        raise RowError(f"field: longer than {MAX_FIELD_CHARS} characters")
    return name


def parse_text(name: str, value: Any, max_chars: int) -> str:
    _missing(name, value)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RowError(f"{name}: not valid UTF-8") from None
    if not isinstance(value, str):
        raise RowError(f"{name}: expected a string (got {type(value).__name__})")
    return _bounded(name, normalize_text(_utf8(name, value)), max_chars)


def parse_label(value: Any) -> int:
    _missing("label", value)
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return int(value)
    raise RowError(f"label: expected 0 or 1 ({value!r:.60})")


def _event(row: dict[str, Any], max_chars: int) -> dict[str, Any]:
    return {
        "user_id": parse_id("user_id", row.get("user_id")),
        "ts": parse_ts(row.get("ts")),
        "field": parse_field(row.get("field")),
        "text": parse_text("text", row.get("text"), max_chars),
    }


def _impression(row: dict[str, Any], max_chars: int) -> dict[str, Any]:
    return {
        "user_id": parse_id("user_id", row.get("user_id")),
        "ts": parse_ts(row.get("ts")),
        "item_id": parse_id("item_id", row.get("item_id")),
        "item_text": parse_text("item_text", row.get("item_text"), max_chars),
        "label": parse_label(row.get("label")),
    }


@dataclass(frozen=True)
class TableKind:
    """How to validate one input table and where its atom text lives."""

    name: str
    parse_row: Callable[[dict[str, Any], int], dict[str, Any]]
    schema: pa.Schema
    text_column: str
    id_column: str


EVENTS = TableKind("events", _event, EVENTS_SCHEMA, "text", "atom_id")
IMPRESSIONS = TableKind("impressions", _impression, IMPRESSIONS_SCHEMA, "item_text", "item_atom_id")


def raw_json(row: Any) -> str:
    """A rejected row as JSON text for the rejects file (bytes shown with escapes)."""
    text = json.dumps(row, default=lambda v: v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else repr(v))
    return text[:MAX_RAW_CHARS]  # ensure_ascii (the default) escapes lone surrogates


def reject_row(source: str, reason: str, row: Any) -> dict[str, str]:
    return {"source": source, "reason": reason, "row": raw_json(row)}


def split_valid(rows: list[Any], kind: TableKind, max_chars: int) -> tuple[pa.Table, pa.Table]:
    """Validate raw rows: (valid rows with atom ids, rejects with reasons)."""
    good: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    for row in rows:
        if not isinstance(row, dict):
            rejects.append(reject_row(kind.name, "row: expected a JSON object", row))
            continue
        try:
            good.append(kind.parse_row(row, max_chars))
        except RowError as err:
            rejects.append(reject_row(kind.name, str(err), row))
    columns = {name: [r[name] for r in good] for name in kind.schema.names if name != kind.id_column}
    columns[kind.id_column] = atom_ids(columns[kind.text_column])
    return (
        pa.table(columns, schema=kind.schema),
        pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
    )
