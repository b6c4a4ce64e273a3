"""`bahe compare` over seeds with the new kinds: DIN and BAHE hybrid train through the same path, every run
reports test slices with intervals, the table averages seeds per slice, and `--reuse` keeps finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from bahe_ray.config import Config, dump_config, with_overrides
from bahe_ray.train import compare
from bahe_ray.train.slices import SLICES, split_slices


def test_compare_din_and_hybrid_over_two_seeds(ml: Config, tmp_path: Path) -> None:
    profile = tmp_path / "profile.yaml"
    profile.write_text(dump_config(ml))
    out = tmp_path / "compare"
    sets = ["model.id_buckets=4096", "train.max_epochs=1", "eval.bootstrap_samples=50", "eval.cold_max_impressions=2"]
    table = compare(str(profile), sets, str(out), use_ray=False, command="pytest", kinds=("din", "bahe_hybrid"),
                    seeds=(0, 1), parallel=2)
    assert [r["model"] for r in table["rows"]] == ["din", "bahe_hybrid"] and table["seeds"] == [0, 1]
    test, masks = split_slices(with_overrides(ml, sets))  # cold: <= 2 train impressions, as compare was told
    labels = test.column("label").to_numpy()
    for row in table["rows"]:
        reports = [json.loads((out / f"{row['model']}-seed{s}.json").read_text()) for s in (0, 1)]
        assert all(r["config"]["train"]["seed"] == s for r, s in zip(reports, (0, 1)))
        for name in SLICES:
            mine = row["slices"][name]
            assert mine["samples"] == int(masks[name].sum()) == reports[0]["test_slices"][name]["samples"]
            if mine["auc_ci95"][0] is not None:
                assert mine["auc_seeds"] == pytest.approx([r["test_slices"][name]["auc"] for r in reports])
                assert mine["auc_ci95"][0] <= mine["auc_mean"] <= mine["auc_ci95"][1]
        scores = pq.read_table(Path(reports[1]["run_dir"]) / "test_scores.parquet").column("score").to_numpy()
        assert row["slices"]["overall"]["auc_seeds"][1] == pytest.approx(roc_auc_score(labels, scores))
    assert masks["cold_items"].any() and masks["warm_items"].any()
    assert "| din |" in (out / "compare.md").read_text()
    before = (out / "din-seed0.json").stat().st_mtime_ns
    again = compare(str(profile), sets, str(out), use_ray=False, command="pytest", kinds=("din",), seeds=(0,),
                    reuse=True)
    assert (out / "din-seed0.json").stat().st_mtime_ns == before  # not trained again
    assert again["rows"][0]["slices"]["overall"]["auc_seeds"][0] == table["rows"][0]["slices"]["overall"]["auc_seeds"][0]
    assert np.isfinite(again["rows"][0]["test_auc"])
