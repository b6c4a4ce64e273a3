"""samples.protocol: rella (ReLLa's MovieLens protocol): one joint history timeline capped at N, samples with
fewer than min_history earlier behaviours dropped, the split cut over the kept samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bahe_ray.config import load_config
from bahe_ray.samples import _ROWS, SplitCuts, read_split_table, read_summary, user_samples

CUTS = SplitCuts(val_from=100, test_from=200)


def _rows(events: list[tuple[int, str, int]], impressions: list[tuple[int, int, int]]) -> pa.Table:
    rows = [dict(user_id="u", ts=t, is_impression=False, field=f, atom_id=a, item_id=None, label=None) for t, f, a in events]
    rows += [dict(user_id="u", ts=t, is_impression=True, field=None, atom_id=a, item_id=str(a), label=y)
             for t, a, y in impressions]
    return pa.Table.from_pylist(rows, schema=_ROWS)


def test_rella_history_is_the_last_n_of_all_fields_together() -> None:
    # liked at 1..4, disliked at 5, 6: the last 3 of the joint timeline are liked 4, disliked 5, 6
    events = [(t, "liked", t) for t in (1, 2, 3, 4)] + [(5, "disliked", 50), (6, "disliked", 60)]
    rella = user_samples(_rows(events, [(10, 7, 1)]), ["liked", "disliked"], 3, CUTS, "rella", 0).to_pylist()[0]
    assert rella["hist_liked"] == [4] and rella["hist_disliked"] == [50, 60]
    own = user_samples(_rows(events, [(10, 7, 1)]), ["liked", "disliked"], 3, CUTS).to_pylist()[0]
    assert own["hist_liked"] == [2, 3, 4] and own["hist_disliked"] == [50, 60]


def test_rella_drops_samples_with_short_history_counting_all_fields() -> None:
    events = [(1, "liked", 1), (2, "disliked", 2), (3, "liked", 3), (4, "other", 4)]
    impressions = [(2, 70, 1), (3, 71, 0), (4, 72, 1), (9, 73, 0)]  # 1, 2, 3, 3 earlier behaviours of known fields
    out = user_samples(_rows(events, impressions), ["liked", "disliked"], 30, CUTS, "rella", 3).to_pylist()
    assert [r["item_atom_id"] for r in out] == [72, 73]
    assert out[0]["hist_liked"] == [1, 3] and out[0]["hist_disliked"] == [2]


def test_rella_leaves_the_split_for_later_without_cuts() -> None:
    out = user_samples(_rows([(1, "liked", 1)], [(5, 9, 1)]), ["liked"], 30, None, "rella", 1)
    assert out.column("split").null_count == 1


def test_rella_on_movielens_subset_matches_a_direct_count(ray_local: None, tmp_path: Path) -> None:
    """Real MovieLens-100K rows of 40 users through `bahe samples`' builder: the kept count equals ratings
    with >= 5 earlier ratings (strictly earlier seconds), histories are <= 30 long, the split is 8:1:1 in time."""
    from bahe_ray.data.prepare import prepare_inputs, prepared_dataset
    from bahe_ray.samples import build_samples
    from tests.conftest import write_movielens_subset

    paths = write_movielens_subset(tmp_path / "data", users=40)
    cfg = load_config(None, [
        "data.source=files", f"data.events_path={paths['events']}", f"data.impressions_path={paths['impressions']}",
        f"data.prepared_path={tmp_path / 'prepared'}", f"samples.path={tmp_path / 'samples'}",
        f"rejects_path={tmp_path / 'rejects'}", "samples.protocol=rella", "samples.max_behaviors=30",
    ])
    prepared = prepare_inputs(cfg, use_ray=True)
    summary = build_samples(prepared_dataset(prepared.events, cfg.storage),
                            prepared_dataset(prepared.impressions, cfg.storage), cfg)
    imp = pq.read_table(paths["impressions"])
    users, ts = np.asarray(imp.column("user_id").to_pylist()), imp.column("ts").to_numpy()
    expected = 0
    for user in np.unique(users):
        mine = ts[users == user]
        expected += int(((mine[:, None] > mine[None, :]).sum(axis=1) >= 5).sum())  # ratings at earlier seconds
    assert sum(summary.counts.values()) == expected and read_summary(cfg.samples.path, cfg.storage).protocol == "rella"
    fractions = np.array([summary.counts[s] for s in ("train", "val", "test")]) / expected
    assert np.allclose(fractions, [0.8, 0.1, 0.1], atol=0.03)
    tables = {s: read_split_table(cfg.samples.path, s, cfg.storage) for s in ("train", "val", "test")}
    assert tables["train"].column("ts").to_numpy().max() <= tables["val"].column("ts").to_numpy().min()
    assert tables["val"].column("ts").to_numpy().max() <= tables["test"].column("ts").to_numpy().min()
    lengths = sum(np.array([len(h) for h in tables["test"].column(f"hist_{f}").to_pylist()]) for f in cfg.samples.fields)
    assert lengths.min() >= 5 and lengths.max() == 30


def test_movielens_1m_folder_is_read_in_its_double_colon_format(tmp_path: Path) -> None:
    """data.movielens_path at a GroupLens ml-1m folder: `::`-separated ratings.dat and latin-1 movies.dat."""
    from bahe_ray.data.movielens import load_ratings, to_tables

    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    (tmp_path / "movies.dat").write_bytes("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                          "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                                          "7::Sabrina (1995)::Comedy|Romance\n".encode("latin-1"))
    ratings = load_ratings(str(tmp_path), tmp_path / "cache")
    assert ratings.user_id.tolist() == [1, 1, 2] and ratings.rating.tolist() == [5, 3, 4]
    assert ratings.ts.tolist() == [978300760, 978302109, 978298413]
    assert ratings.item_text[661] == "James and the Giant Peach (1996) | Animation, Children's, Musical"
    events, impressions = to_tables(ratings)
    assert impressions.column("label").to_pylist() == [1, 0, 1]  # a click is rating > 3
    assert events.column("field").to_pylist() == ["liked", "disliked", "liked"]
