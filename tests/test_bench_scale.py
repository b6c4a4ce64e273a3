"""`bench scale` (issue 18, item 4): the Zipf log it grows, the memory sampler, and a tiny run of the
whole bench on local Ray. Nothing here asserts a timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bahe_ray.atoms import atom_ids, normalize_column
from bahe_ray.bench.cli import main as bench_main
from bahe_ray.bench.memory import TreeMemory
from bahe_ray.bench.scale import STAGES, growth
from bahe_ray.config import Config, SyntheticConfig, with_overrides
from bahe_ray.data import synthetic


def scaled_log(events: int, seed: int, out: Path) -> tuple[Path, Path]:
    """A log whose vocabulary and users grow with it, as `bench scale` makes them."""
    cfg = SyntheticConfig(n_events=events, n_atoms=events // 10, n_users=events // 100, seed=seed, rows_per_file=5_000)
    events_dir, impressions_dir = synthetic.generate(cfg, str(out))
    return Path(events_dir), Path(impressions_dir)


def test_zipf_log_distinct_behaviours_grow_with_its_size(tmp_path: Path) -> None:
    distinct = []
    for events in (4_000, 16_000, 64_000):
        events_dir, _ = scaled_log(events, 0, tmp_path / str(events))
        texts = pq.read_table(events_dir).column("text")
        assert len(texts) == events
        distinct.append(len(np.unique(texts.to_numpy(zero_copy_only=False))))
        assert distinct[-1] < events // 10, "behaviours are reused: fewer distinct than the vocabulary"
    assert distinct[1] > 2 * distinct[0] and distinct[2] > 2 * distinct[1], distinct


def test_zipf_log_is_the_same_for_a_seed_and_another_for_another_seed(tmp_path: Path) -> None:
    first, first_imp = scaled_log(12_000, 7, tmp_path / "a")
    again, again_imp = scaled_log(12_000, 7, tmp_path / "b")
    other, _ = scaled_log(12_000, 8, tmp_path / "c")
    assert pq.read_table(first).equals(pq.read_table(again))
    assert pq.read_table(first_imp).equals(pq.read_table(again_imp))
    assert not pq.read_table(first).column("text").equals(pq.read_table(other).column("text"))


def test_tree_memory_sees_a_child_process_peak_between_samples() -> None:
    """A child holds 200 MB for a moment and frees it: its peak (VmHWM) is kept though no sample
    fell inside the moment; the driver's own peak and the node's figures are there too."""
    child = "x = bytearray(200 * 2**20); del x; import time; time.sleep(1.0)"
    with TreeMemory(interval=0.5) as memory:
        subprocess.run([sys.executable, "-c", child], check=True)
    summary = memory.summary()
    assert summary["worker_peak_rss_mb"] >= 200
    assert summary["largest_processes"][0]["peak_rss_mb"] == summary["worker_peak_rss_mb"]
    assert summary["driver_peak_rss_mb"] > 0 and summary["node_used_peak_mb"] >= summary["node_used_start_mb"] > 0


def fake_size(events: int, seconds: float = 2.0, pss: float = 50.0) -> dict:
    """A size's row as `bench_scale` writes it, with the figures that `growth`, the table and the plot read."""
    row = {"seconds": seconds, "rows_per_s": events / seconds, "tree_pss_peak_mb": pss, "driver_peak_rss_mb": 100.0,
           "worker_peak_rss_mb": 0.0, "node_used_peak_mb": 900.0}
    return {"events": events, "store": {"atoms": events // 10, "bytes": events * 20},
            "stages": {stage: row for stage in STAGES}}


def test_growth_is_the_ratio_of_each_figure_over_the_ratio_of_events() -> None:
    result = growth([fake_size(1_000, 2.0, 50.0), fake_size(2_000, 3.0, 60.0), fake_size(10_000, 30.0, 100.0)])
    assert result["train"] == {"seconds": 1.5, "tree_pss_peak_mb": 0.2, "driver_peak_rss_mb": 0.1}
    assert growth([fake_size(1_000)]) == {}


@pytest.mark.usefixtures("ray_local")
def test_bench_scale_runs_every_stage_and_stores_the_logs_atoms(tmp_path: Path) -> None:
    """One tiny size through the CLI (each size costs a minute or more of Ray start-ups on 2 cores),
    added to an earlier result of another size (`--add-to`): both sizes in the JSON, growth computed."""
    cfg = with_overrides(Config(), ["data.synthetic.impressions_per_user=10", "train.eval_batch_size=128"])
    out, work = tmp_path / "out", tmp_path / "work"
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"sizes": [fake_size(1_000)]}))
    assert bench_main(cfg, ["scale", "--sizes", "3000", "--n", "10", "--workdir", str(work), "--out", str(out),
                            "--interval", "0.1", "--add-to", str(earlier)]) == 0
    result = json.loads((out / "scale.json").read_text())
    assert (out / "scale.png").stat().st_size > 0
    assert [s["events"] for s in result["sizes"]] == [1_000, 3_000]
    assert set(result["growth"]) == set(STAGES)
    for size in result["sizes"][1:]:
        assert list(size["stages"]) == list(STAGES)
        for stage, row in size["stages"].items():
            for figure in ("seconds", "rows", "rows_per_s", "driver_peak_rss_mb", "worker_peak_rss_mb",
                           "tree_pss_peak_mb", "node_used_peak_mb"):
                assert row[figure] > 0, (size["events"], stage, figure)
        log = work / f"events-{size['events']}" / "data" / "source"
        texts = [pq.read_table(log / "events").column("text"), pq.read_table(log / "impressions").column("item_text")]
        distinct = np.unique(np.concatenate([atom_ids(normalize_column(t).to_pylist()) for t in texts]))
        assert size["store"]["atoms"] == len(distinct) == size["stages"]["encode"]["unique_atoms"]
        assert size["store"]["bytes"] > len(distinct) * size["store"]["dim"] * 2
        assert size["stages"]["data"]["rows"] == size["events"] + size["users"] * 10


def test_an_empty_test_slice_gets_no_interval_instead_of_failing_the_run() -> None:
    """bench scale's synthetic log has no new users in its test split: `bahe train` must still finish."""
    from bahe_ray.train.slices import bootstrap_auc, interval

    assert interval(bootstrap_auc(np.array([]), [np.array([])], resamples=20, seed=0)) == [None, None]
