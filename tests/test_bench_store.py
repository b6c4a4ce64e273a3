"""`bahe bench store` end to end on a small store: 2 Ray Train workers and 1 Serve replica read it at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bahe_ray.bench.store import atom_ids
from bahe_ray.cli import main as cli_main
from tests.conftest import free_port


def test_atom_ids_are_distinct_and_spread() -> None:
    ids = atom_ids(np.arange(100_000))
    assert np.unique(ids).size == ids.size and ids.min() >= 0
    assert ids[:1000].max() > 2**60  # neighbours land far apart, like hashed atom ids


@pytest.mark.usefixtures("ray_local")
def test_bench_store_reads_one_layout_from_train_workers_and_a_replica(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli_main(["bench", "--set", f"serve.port={free_port()}", "store", "--atoms", "20000", "--dim", "64",
                     "--part-rows", "5000", "--seconds", "1", "--workdir", str(tmp_path / "work"),
                     "--out", str(out)]) == 0
    result = json.loads((out / "store-20000.json").read_text())
    assert (out / "store-20000.png").is_file()
    assert sorted(r["role"] for r in result["readers"]) == ["serve", "train-0", "train-1"]
    assert len({r["pid"] for r in result["readers"]}) == 3
    for reader in result["readers"]:
        assert reader["ids_per_s"] > 0 and reader["ids_per_s_float16"] > 0
        assert reader["version"] == 2 and reader["pickup_s"] >= 0  # the driver's commit, seen without a restart
        assert reader["mapped_kb"]["Rss"] * 1024 >= 0.9 * result["vector_bytes"]  # every page in each mapping
    assert result["node"]["pss_over_vector_bytes"] <= 1.3  # ...held once between the three
    assert result["parts"] == 4
