"""Malformed and hostile log rows (tests/faults/corpus/bad_log_rows.jsonl) mixed into real MovieLens
rows, through the real JSON Lines readers and the encode job (MiniLM k=2).

Every malformed row gets exactly one reject record naming the field and the reason; text that
only looks like an attack (SQL, HTML, templates, paths, RTL overrides, an escaped NUL) is valid:
it is accepted and stored verbatim, after the documented normalisation (NFKC, whitespace runs
to one space), as inert text whose vector is the encoder's vector of that text. Nothing in the
pipeline interprets behaviour text: no SQL, no templating, no HTML, no paths.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bahe_ray.atoms import atom_ids, normalize_text
from bahe_ray.config import load_config
from bahe_ray.data import movielens
from bahe_ray.data.readers import read_rejects, reject_counts
from bahe_ray.data.schema import MAX_RAW_CHARS
from bahe_ray.encode import run_encode
from bahe_ray.encoders.hf import TransformersEncoder
from bahe_ray.store import EmbeddingStore

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).with_name("corpus") / "bad_log_rows.jsonl"
GOOD_ROWS = 40  # real MovieLens rows per table, interleaved with the corpus
COLUMNS = {"events": {"user_id", "ts", "field", "text"},
           "impressions": {"user_id", "ts", "item_id", "item_text", "label"}}


@dataclass(frozen=True)
class Case:
    name: str
    table: str
    expect: str  # reject reason without its detail, or "accept"
    line: bytes
    row: dict[str, Any] | None  # the parsed row of an accepted case


def load_corpus() -> list[Case]:
    cases = []
    for text in CORPUS.read_text(encoding="utf-8").splitlines():
        record = json.loads(text)
        line = record["raw"] if "raw" in record else json.dumps(record["row"])
        data = line.encode("utf-8", "surrogateescape")
        if "fill" in record:
            chars, count = record["fill"]
            data = data.replace(b"{FILL}", chars.encode() * count)
        row = record.get("row") if record["expect"] == "accept" else None
        cases.append(Case(record["case"], record["table"], record["expect"], data, row))
    return cases


def text_of(case: Case) -> str:
    return case.row["text" if case.table == "events" else "item_text"]


def test_corpus_covers_enough_cases() -> None:
    cases = load_corpus()
    assert len({c.name for c in cases}) == len(cases)
    assert sum(c.expect != "accept" for c in cases) >= 50
    assert {c.table for c in cases if c.expect != "accept"} == {"events", "impressions"}
    assert max(len(c.line) for c in cases) >= 10 * 2**20


def test_every_bad_row_is_rejected_with_its_reason_and_the_rest_is_encoded(ray_local: None, tmp_path: Path) -> None:
    cases = load_corpus()
    tables = movielens.to_tables(movielens.load_ratings(None, REPO / "outputs" / "cache"), max_users=1)
    good = {name: table.slice(0, GOOD_ROWS).to_pylist() for name, table in zip(("events", "impressions"), tables)}
    paths = {}
    for name in ("events", "impressions"):
        mine = [c.line for c in cases if c.table == name]
        lines = [json.dumps(row).encode() for row in good[name]]
        mixed = [line for i in range(max(len(lines), len(mine))) for line in (lines[i:i + 1] + mine[i:i + 1])]
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_bytes(b"\n".join(mixed) + b"\n")
    cfg = load_config(REPO / "configs" / "local.yaml", [
        "data.source=files", "data.format=jsonl", f"data.events_path={paths['events']}",
        f"data.impressions_path={paths['impressions']}", f"data.prepared_path={tmp_path / 'data'}",
        f"store.path={tmp_path / 'store'}", f"rejects_path={tmp_path / 'rejects'}",
    ])

    summary = run_encode(cfg)

    bad = [c for c in cases if c.expect != "accept"]
    accepted = [c for c in cases if c.expect == "accept"]
    for name in ("events", "impressions"):
        mine = [c for c in cases if c.table == name]
        assert getattr(summary, f"{name}_read") == GOOD_ROWS + len(mine)
        assert getattr(summary, f"{name}_valid") == GOOD_ROWS + sum(c.expect == "accept" for c in mine)
    rejects = read_rejects(f"{cfg.rejects_path}/{summary.run_id}", cfg.storage)
    assert rejects.num_rows == len(bad)
    assert reject_counts(rejects) == dict(Counter(f"{c.table}: {c.expect}" for c in bad))
    for source, reason, row in zip(*(rejects.column(k).to_pylist() for k in ("source", "reason", "row"))):
        assert reason.split(":")[0] in COLUMNS[source] | {"row"}, reason  # names the field
        assert 0 < len(row) <= MAX_RAW_CHARS  # the raw row kept for inspection, bounded

    texts = {normalize_text(r["text"]) for r in good["events"]} | {normalize_text(r["item_text"]) for r in good["impressions"]}
    inert = [normalize_text(text_of(c)) for c in accepted]
    assert summary.unique_atoms == summary.encoded == len(texts | set(inert))
    store = EmbeddingStore.read(cfg.store.path)
    assert store.verify().ok
    ids = atom_ids(inert)
    assert store.texts(ids) == inert  # verbatim: '{{7*7}}' stays '{{7*7}}', the NUL and RTL override stay
    np.testing.assert_allclose(store.lookup(ids), TransformersEncoder(cfg.encoder, "cpu").encode(inert),
                               rtol=1e-5, atol=1e-5)
    assert "'; DROP TABLE users; --" in inert and "{{7*7}}" in inert and "a\x00b" in inert


@pytest.mark.parametrize("text, stored", [
    ("x\r\nSet-Cookie: session=1", "x Set-Cookie: session=1"),  # line breaks are whitespace: one space
    ("Ｆｕｌｌｗｉｄｔｈ ｍｏｖｉｅ", "Fullwidth movie"),  # NFKC
    ("rated 5/5: \u202egnp.exe", "rated 5/5: \u202egnp.exe"),  # kept: a character, not an instruction
])
def test_normalisation_of_hostile_text_is_the_documented_one(text: str, stored: str) -> None:
    assert normalize_text(text) == stored
