"""`bahe store verify` on a damaged store: a truncated and an altered part file.

The library side (verify() problems and StoreCorruptError on lookup naming the file, for a
truncated, altered and deleted part, local and S3) is tests/test_store.py::test_corrupt_part_is_named
and test_s3_round_trip; this covers the command line an operator runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bahe_ray.encoders.base import EncoderFingerprint
from bahe_ray.store import EmbeddingStore

FP = EncoderFingerprint(model_name="tiny", weights_sha256="cd" * 32, k=2, pooling="mean", dtype="float32",
                        max_tokens=32)
DIM = 4


def bahe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bahe_ray.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A committed store of three parts."""
    path = tmp_path / "store"
    store = EmbeddingStore.open(str(path), FP, DIM)
    for start in (0, 100, 200):
        ids = np.arange(start, start + 100)
        store.add(ids, np.random.default_rng(start).normal(size=(100, DIM)), [f"atom {i}" for i in ids])
    store.commit()
    return path


def test_verify_passes_on_a_whole_store(store_path: Path) -> None:
    out = bahe("store", "verify", str(store_path))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ok"] is True


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_verify_names_the_damaged_part_and_exits_1(store_path: Path, damage: str) -> None:
    victim = EmbeddingStore.read(str(store_path)).parts[1].name
    file = store_path / "parts" / victim
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    else:  # one flipped bit in the vector data: same size, readable parquet, wrong sha256
        i = len(data) // 2
        file.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
    out = bahe("store", "verify", str(store_path))
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is False and len(report["problems"]) == 1
    assert victim in report["problems"][0]
    assert ("truncated" if damage == "truncate" else "altered") in report["problems"][0]
