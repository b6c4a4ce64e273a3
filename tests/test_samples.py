"""Point-in-time samples: no leakage, last-N per field, time split, Ray Data build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from bahe_ray.config import Config
from bahe_ray.data.readers import read_table
from bahe_ray.data.schema import EVENTS, IMPRESSIONS
from bahe_ray.samples import (
    _ROWS,
    SplitCuts,
    build_samples,
    pad_histories,
    read_split,
    read_summary,
    split_cuts,
    user_samples,
)


def _rows(events: list[tuple[int, str, int]], impressions: list[tuple[int, int, int]]) -> pa.Table:
    """events: (ts, field, atom_id); impressions: (ts, item_atom_id, label) for one user 'u'."""
    rows = [dict(user_id="u", ts=t, is_impression=False, field=f, atom_id=a, item_id=None, label=None) for t, f, a in events]
    rows += [dict(user_id="u", ts=t, is_impression=True, field=None, atom_id=a, item_id=str(a), label=y)
             for t, a, y in impressions]
    return pa.Table.from_pylist(rows, schema=_ROWS)


CUTS = SplitCuts(val_from=100, test_from=200)


def test_same_second_behaviour_is_excluded() -> None:
    rows = _rows([(10, "liked", 1), (20, "liked", 2), (30, "liked", 3), (20, "disliked", 9)], [(20, 77, 1), (31, 78, 0)])
    out = user_samples(rows, ["liked", "disliked"], max_behaviors=10, cuts=CUTS).to_pylist()
    at20, at31 = out
    assert at20["hist_liked"] == [1], "behaviour at ts == impression ts must not be used"
    assert at20["hist_disliked"] == []
    assert at31["hist_liked"] == [1, 2, 3] and at31["hist_disliked"] == [9]
    assert at20["item_atom_id"] == 77 and at20["label"] == 1


def test_last_n_most_recent_oldest_first_and_unordered_input() -> None:
    events = [(t, "liked", t) for t in (5, 1, 4, 2, 3)]
    out = user_samples(_rows(events, [(10, 5, 0)]), ["liked"], max_behaviors=3, cuts=CUTS).to_pylist()[0]
    assert out["hist_liked"] == [3, 4, 5]


def test_split_by_time_and_unknown_fields_ignored() -> None:
    rows = _rows([(1, "other", 4)], [(50, 1, 0), (150, 2, 1), (250, 3, 0)])
    out = user_samples(rows, ["liked"], 5, CUTS).to_pylist()
    assert [r["split"] for r in out] == ["train", "val", "test"]
    assert all(r["hist_liked"] == [] for r in out)


def test_pad_histories_keeps_most_recent() -> None:
    lists = pa.array([[1, 2, 3, 4], [], [7]], pa.list_(pa.int64())).slice(0, 3)
    ids, mask = pad_histories(lists, 2)
    assert ids.tolist() == [[3, 4], [0, 0], [7, 0]]
    assert mask.tolist() == [[True, True], [False, False], [True, False]]


def test_split_cuts_are_exact_and_independent_of_row_order(ray_local: None) -> None:
    import ray

    cfg = Config().samples  # 10% validation, 10% test
    ts = np.arange(1_000, 2_000)
    cuts = [split_cuts(ray.data.from_items([{"ts": int(t)} for t in order], override_num_blocks=blocks), cfg)
            for order, blocks in ((ts, 1), (np.random.default_rng(1).permutation(ts), 7))]
    assert cuts[0] == cuts[1] == SplitCuts(val_from=1_800, test_from=1_900)
    wide = ray.data.from_items([{"ts": t} for t in (0, 10**9, 2 * 10**9)])  # bins wider than a second
    assert split_cuts(wide, cfg) == split_cuts(wide.random_shuffle(seed=3), cfg)


def test_build_samples_with_ray(ray_local: None, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    events, impressions = [], []
    for u in range(12):
        for t in rng.choice(1000, size=30, replace=False):
            events.append({"user_id": f"u{u}", "ts": int(t), "field": "liked" if t % 2 else "disliked", "text": f"b{t % 17}"})
        for t in rng.choice(1000, size=10, replace=False):
            impressions.append({"user_id": f"u{u}", "ts": int(t), "item_id": f"i{t % 5}", "item_text": f"item {t % 5}",
                                "label": int(t % 3 == 0)})
    pa.Table.from_pylist(events).to_pandas().to_parquet(tmp_path / "events.parquet")
    pa.Table.from_pylist(impressions).to_pandas().to_parquet(tmp_path / "impressions.parquet")
    cfg = Config.model_validate({"samples": {"path": str(tmp_path / "samples"), "max_behaviors": 5}})
    ev = read_table(str(tmp_path / "events.parquet"), EVENTS, "parquet", cfg.storage, str(tmp_path / "rej"), 100)
    im = read_table(str(tmp_path / "impressions.parquet"), IMPRESSIONS, "parquet", cfg.storage, str(tmp_path / "rej"), 100)
    summary = build_samples(ev, im, cfg)
    assert sum(summary.counts.values()) == 120
    assert summary.counts["train"] > summary.counts["test"] > 0
    assert read_summary(cfg.samples.path, cfg.storage).cuts == summary.cuts
    by_event = {}
    for e in events:
        by_event.setdefault(e["user_id"], []).append(e)
    from bahe_ray.atoms import atom_id

    total = 0
    for split in ("train", "val", "test"):
        rows = read_split(cfg.samples.path, split, cfg.storage).take_all()
        total += len(rows)
        for r in rows:  # recompute each history independently
            mine = sorted((e for e in by_event[r["user_id"]] if e["ts"] < r["ts"] and e["field"] == "liked"),
                          key=lambda e: e["ts"])
            assert list(r["hist_liked"]) == [atom_id(e["text"]) for e in mine][-5:]
    assert total == 120
