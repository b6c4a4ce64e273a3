"""Input schema, validation with rejects, streaming readers (local and s3://), adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bahe_ray.atoms import atom_id, normalize_text, unique_atoms
from bahe_ray.config import Config, StorageConfig, SyntheticConfig, with_overrides
from bahe_ray.data import movielens, synthetic
from bahe_ray.data.prepare import prepare_inputs, prepared_table
from bahe_ray.data.readers import read_rejects, read_table, reject_counts
from bahe_ray.data.schema import EVENTS, IMPRESSIONS, split_valid

GOOD_EVENT = {"user_id": "u1", "ts": 1_700_000_000, "field": "purchase", "text": "Purchase  Starbucks\n"}


def test_normalisation_and_ids_are_stable() -> None:
    assert normalize_text("  Toy\u00a0Story\t(1995) \n") == "Toy Story (1995)"
    assert normalize_text("ｆｕｌｌ width") == "full width"  # NFKC
    # A fixed value: the id contract must not drift between releases or machines.
    assert atom_id("Toy Story (1995)") == atom_id(normalize_text(" Toy Story  (1995)"))
    assert atom_id("a") == -3292477735350538661


def test_unique_atoms_reports_collisions() -> None:
    table = pa.table({"atom_id": pa.array([7, 7, 9], pa.int64()), "text": ["x", "y", "z"]})
    out = {r["atom_id"]: r for r in unique_atoms(table).to_pylist()}
    assert out[7]["n_texts"] == 2 and out[7]["count"] == 2
    assert out[9]["n_texts"] == 1


BAD_EVENTS = [
    ({"ts": 1, "field": "f", "text": "t"}, "user_id: missing"),
    ({**GOOD_EVENT, "user_id": 1.5}, "user_id: expected a string or integer"),
    ({**GOOD_EVENT, "user_id": True}, "user_id: expected a string or integer"),
    ({**GOOD_EVENT, "ts": "yesterday"}, "ts: not a timestamp"),
    ({**GOOD_EVENT, "ts": -5}, "ts: out of range"),
    ({**GOOD_EVENT, "ts": float("nan")}, "ts: not a whole number of seconds"),
    ({**GOOD_EVENT, "ts": 1.5}, "ts: not a whole number of seconds"),
    ({**GOOD_EVENT, "ts": 10**12}, "ts: out of range"),
    ({**GOOD_EVENT, "ts": [1]}, "ts: expected seconds since the epoch"),
    ({**GOOD_EVENT, "field": ""}, "field: empty"),
    ({**GOOD_EVENT, "field": 3}, "field: expected a string"),
    ({**GOOD_EVENT, "text": "   "}, "text: empty"),
    ({**GOOD_EVENT, "text": None}, "text: missing"),
    ({**GOOD_EVENT, "text": 42}, "text: expected a string"),
    ({**GOOD_EVENT, "text": b"\xff\xfe bad"}, "text: not valid UTF-8"),
    ({**GOOD_EVENT, "text": "x" * 101}, "text: longer than 100 characters"),
]


@pytest.mark.parametrize(("row", "reason"), BAD_EVENTS)
def test_bad_event_rows_are_rejected_with_reason(row: dict, reason: str) -> None:
    good, rejects = split_valid([GOOD_EVENT, row], EVENTS, max_chars=100)
    assert good.num_rows == 1, "the good row in the same batch goes through"
    assert rejects.num_rows == 1
    assert rejects.column("reason")[0].as_py().startswith(reason)
    assert rejects.column("source")[0].as_py() == "events"


def test_valid_rows_are_typed_and_normalised() -> None:
    rows = [
        GOOD_EVENT,
        {**GOOD_EVENT, "user_id": 12, "ts": "2023-11-14T22:13:20", "text": b"caf\xc3\xa9"},
        {**GOOD_EVENT, "ts": 1_700_000_000.0},
    ]
    good, rejects = split_valid(rows, EVENTS, max_chars=100)
    assert rejects.num_rows == 0
    assert good.column("user_id").to_pylist() == ["u1", "12", "u1"]
    assert good.column("ts").to_pylist() == [1_700_000_000] * 3
    assert good.column("text").to_pylist()[0] == "Purchase Starbucks"
    assert good.column("atom_id").to_pylist()[0] == atom_id("Purchase Starbucks")
    assert good.column("text").to_pylist()[1] == "café"


def test_impression_labels() -> None:
    base = {"user_id": "u", "ts": 5, "item_id": 3, "item_text": "Item"}
    rows = [{**base, "label": 1}, {**base, "label": False}, {**base, "label": 1.0}, {**base, "label": 2},
            {**base, "label": "yes"}, {k: v for k, v in base.items() if k != "item_id"} | {"label": 0}]
    good, rejects = split_valid(rows, IMPRESSIONS, max_chars=100)
    assert good.column("label").to_pylist() == [1, 0, 1]
    assert good.column("item_id").to_pylist() == ["3"] * 3
    reasons = rejects.column("reason").to_pylist()
    assert reasons[0].startswith("label: expected 0 or 1") and reasons[1].startswith("label: expected 0 or 1")
    assert reasons[2] == "item_id: missing"


def _write_jsonl(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_jsonl_reader_rejects_bad_lines(ray_local: None, tmp_path: Path) -> None:
    good = [json.dumps({**GOOD_EVENT, "user_id": f"u{i}", "text": f"behaviour {i}"}).encode() for i in range(20)]
    bad = [
        b"{not json",
        b'{"user_id": "u", "ts": 1, "field": "f", "text": "caf\xff"}',  # invalid UTF-8 inside the text
        b"[1, 2, 3]",
        json.dumps({**GOOD_EVENT, "ts": "tomorrow"}).encode(),
    ]
    folder = tmp_path / "events"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", good[:10] + bad[:2])
    _write_jsonl(folder / "b.jsonl", good[10:] + bad[2:])
    rejects_dir = str(tmp_path / "rejects")
    ds = read_table(str(folder), EVENTS, "jsonl", StorageConfig(), rejects_dir, max_chars=100)
    rows = ds.take_all()
    assert sorted(r["user_id"] for r in rows) == sorted(f"u{i}" for i in range(20))
    rejects = read_rejects(rejects_dir, StorageConfig())
    assert reject_counts(rejects) == {
        "events: row: expected a JSON object": 1,
        "events: row: not valid JSON": 1,
        "events: text: not valid UTF-8": 1,
        "events: ts: not a timestamp": 1,
    }


def test_parquet_reader_on_s3(ray_local: None, s3_server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    storage = s3_server.storage
    table = pa.table({"user_id": ["a", "b", None], "ts": [1, 2, 3], "field": ["f", "f", "f"], "text": ["x", "y", "z"]})
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": storage.endpoint_url})
    with fs.open(f"{bucket[5:]}/in/events/part-0.parquet", "wb") as f:
        pq.write_table(table, f)
    rejects_dir = f"{bucket}/rejects/run1"
    ds = read_table(f"{bucket}/in/events", EVENTS, "parquet", storage, rejects_dir, max_chars=100)
    assert sorted(r["text"] for r in ds.take_all()) == ["x", "y"]
    assert reject_counts(read_rejects(rejects_dir, storage)) == {"events: user_id: missing": 1}


def test_movielens_adapter_builds_both_tables(tmp_path: Path) -> None:
    ratings = movielens.load_ratings(None, Path("outputs/cache"))
    assert len(ratings.user_id) == 100_000 and len(np.unique(ratings.user_id)) == 943
    events, impressions = movielens.to_tables(ratings, max_users=10)
    assert events.num_rows == impressions.num_rows and 0 < events.num_rows < 100_000
    first = events.slice(0, 1).to_pylist()[0]
    assert first["text"].startswith("rated ") and "/5: " in first["text"] and " | " in first["text"]
    liked = np.array(events.column("field").to_pylist()) == "liked"
    assert np.array_equal(liked, np.array(impressions.column("label").to_pylist()) == 1)
    _, rejects = split_valid(events.to_pylist(), EVENTS, max_chars=2000)
    assert rejects.num_rows == 0


def test_grouplens_ml100k_folder(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("1\t10\t5\t881250949\n2\t10\t2\t881250950\n")
    (tmp_path / "u.genre").write_text("unknown|0\nAction|1\nComedy|2\n\n")
    (tmp_path / "u.item").write_bytes("10|Caf\xe9 Movie (1995)|01-Jan-1995||http://x|0|1|1\n".encode("latin-1"))
    events, impressions = movielens.to_tables(movielens.load_ratings(str(tmp_path), tmp_path))
    assert impressions.column("item_text").to_pylist()[0] == "Café Movie (1995) | Action, Comedy"
    assert events.column("text").to_pylist() == ["rated 5/5: Café Movie (1995) | Action, Comedy",
                                                 "rated 2/5: Café Movie (1995) | Action, Comedy"]
    assert events.column("field").to_pylist() == ["liked", "disliked"]


def test_synthetic_generator_is_zipf_and_deterministic(tmp_path: Path) -> None:
    cfg = SyntheticConfig(n_events=20_000, n_users=50, n_atoms=5_000, rows_per_file=7_000, seed=3)
    events_dir, impressions_dir = synthetic.generate(cfg, str(tmp_path / "a"))
    again, _ = synthetic.generate(cfg, str(tmp_path / "b"))
    events = pq.read_table(events_dir)
    assert events.num_rows == 20_000 and len(list(Path(events_dir).glob("*.parquet"))) == 3
    assert events.equals(pq.read_table(again))
    counts = np.sort(np.unique(events.column("text").to_numpy(zero_copy_only=False), return_counts=True)[1])[::-1]
    assert counts[0] > 20 * np.median(counts), "a few behaviours are reused far more than the median one"
    assert pq.read_table(impressions_dir).num_rows == 50 * cfg.impressions_per_user


def test_inputs_are_prepared_once_until_the_config_or_the_files_change(tmp_path: Path) -> None:
    """Validated once: a second stage reads the recorded tables (not rewritten, no second rejects
    folder); changed input files or a changed data config prepare them again."""
    events = tmp_path / "logs" / "events.jsonl"
    events.parent.mkdir()
    lines = [json.dumps({**GOOD_EVENT, "user_id": f"u{i}", "text": f"behaviour {i}"}).encode() for i in range(6)]
    _write_jsonl(events, [*lines, b"{not json", json.dumps({**GOOD_EVENT, "ts": "soon"}).encode()])
    cfg = Config.model_validate({
        "data": {"source": "files", "format": "jsonl", "events_path": str(events), "prepared_path": str(tmp_path / "data")},
        "rejects_path": str(tmp_path / "rejects"),
    })

    first = prepare_inputs(cfg, use_ray=False, run_id="run-1")
    assert (first.events_read, first.events_valid, first.impressions) == (8, 6, None)
    assert first.rejects == {"events: row: not valid JSON": 1, "events: ts: not a timestamp": 1}
    assert first.rejects_dir == str(tmp_path / "rejects" / "run-1")
    assert sorted(prepared_table(first.events, cfg.storage).column("user_id").to_pylist()) == [f"u{i}" for i in range(6)]
    written = {f: f.stat().st_mtime_ns for f in (tmp_path / "data").rglob("*") if f.is_file()}

    again = prepare_inputs(cfg, use_ray=False, run_id="run-2")
    assert again == first
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "data").rglob("*") if f.is_file()} == written
    assert [d.name for d in (tmp_path / "rejects").iterdir()] == ["run-1"]

    _write_jsonl(events, [*lines, json.dumps({**GOOD_EVENT, "user_id": "u6", "text": "behaviour 6"}).encode()])
    changed_files = prepare_inputs(cfg, use_ray=False, run_id="run-3")
    assert (changed_files.run_id, changed_files.events_valid, changed_files.rejects) == ("run-3", 7, {})

    shorter = prepare_inputs(with_overrides(cfg, ["data.max_text_chars=10"]), use_ray=False, run_id="run-4")
    assert (shorter.run_id, shorter.events_valid) == ("run-4", 0)  # "behaviour N" is 11 characters
    assert shorter.rejects == {"events: text: longer than 10 characters": 7}
    assert prepared_table(shorter.events, cfg.storage).num_rows == 0
    assert sorted(d.name for d in (tmp_path / "rejects").iterdir()) == ["run-1", "run-3", "run-4"]
