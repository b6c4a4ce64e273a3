"""The rehearsal cluster's files, without starting anything (fast tier): cluster/fake.yaml mirrors
cluster.yaml's node types and passes Ray's validator, and ray.gpu_compute: cpu keeps the GPU requests
of configs/fake_cluster.yaml while the encoder and training compute on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError

from bahe_ray.config import load_config
from bahe_ray.encode import actor_device
from bahe_ray.train.step import computes_on_gpu, train_device

ROOT = Path(__file__).resolve().parents[1]
FAKE_HEAD = "ray.head.default"  # the fake provider's fixed name for the head's type


def _load(path: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))


def test_fake_cluster_passes_ray_validation() -> None:
    """Ray's schema and node-type rules (prepare_config would merge the provider's example.yaml, which the
    wheel does not ship: the file spells out every field instead)."""
    from ray.autoscaler._private.util import validate_config

    validate_config(copy.deepcopy(_load("cluster/fake.yaml")))


def test_fake_cluster_mirrors_the_node_types_of_cluster_yaml() -> None:
    fake, real = _load("cluster/fake.yaml"), _load("cluster.yaml")
    fake_types, real_types = fake["available_node_types"], real["available_node_types"]
    assert fake["provider"]["type"] == "fake_multinode" and fake["head_node_type"] == FAKE_HEAD
    assert set(fake_types) - {FAKE_HEAD} == set(real_types) - {real["head_node_type"]}
    assert fake_types[FAKE_HEAD]["resources"]["CPU"] == real_types[real["head_node_type"]]["resources"]["CPU"] == 0
    for name, node_type in fake_types.items():
        if name == FAKE_HEAD:
            continue
        assert node_type["min_workers"] == 0, name  # everything scales out from nothing
        assert ("GPU" in node_type["resources"]) == ("GPU" in real_types[name]["resources"]), name
    assert fake["idle_timeout_minutes"] < 1  # nodes go away within a test


def test_fake_profile_asks_for_gpus_and_computes_on_cpu() -> None:
    cfg = load_config(ROOT / "configs" / "fake_cluster.yaml")
    assert cfg.encoder.num_gpus_per_actor == 1 and cfg.train.use_gpu  # the requests that scale gpu-workers
    assert actor_device(cfg) == "cpu" and train_device(cfg) == "cpu" and not computes_on_gpu(cfg)
    gpu_node = _load("cluster/fake.yaml")["available_node_types"]["gpu-workers"]["resources"]
    assert cfg.encoder.num_cpus_per_actor <= gpu_node["CPU"] and cfg.train.cpus_per_worker <= gpu_node["CPU"]


def test_gpu_requests_compute_on_cuda_by_default() -> None:
    cfg = load_config(ROOT / "configs" / "fake_cluster.yaml", ["ray.gpu_compute=cuda"])
    assert actor_device(cfg) == "cuda" and computes_on_gpu(cfg)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="ray.gpu_compute"):
            train_device(cfg)
    assert actor_device(load_config(None, ["encoder.num_gpus_per_actor=0"])) == "cpu"


def test_gpu_compute_rejects_other_devices_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="ray.gpu_compute"):
        load_config(None, ["ray.gpu_compute=gpu"])
