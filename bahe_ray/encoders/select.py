"""`encoder.backend: auto`: the faster backend for this model shape on this hardware, by measurement.

On a GPU with a CUDA build of vLLM, both backends encode the same synthetic texts in calls of the
actor's batch size (at most CALIBRATION_TEXTS) and the faster one is kept. The rates are stored in
a calibration table, `<encoder.cache_dir>/calibration.json`, under a key of everything that decides
speed (model shape, k, tokens, dtype, pooling, the backends' settings, GPU name, package versions),
so later actors and runs on the same hardware read the choice instead of measuring again.
Without a GPU, auto is the transformers backend (vLLM's CPU build is not faster; docs/vllm.md).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np

from bahe_ray.config import EncoderConfig, StorageConfig
from bahe_ray.encoders.base import BackendChoice, ShallowEncoder
from bahe_ray.fs import filesystem, join, write_bytes_atomic
from bahe_ray.models.registry import resolve_model_path

log = logging.getLogger(__name__)

TABLE_FILE = "calibration.json"
CALIBRATION_TEXTS = 4096  # most texts per timed call
SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size")


def decide(device: str, vllm_usable: bool, rates: Mapping[str, float] | None, source: str = "") -> BackendChoice:
    """The choice from what is known: no GPU or no usable vLLM -> transformers; else the higher atoms/s
    of `rates` (measured by `source`), transformers on a tie (it starts in seconds)."""
    if device != "cuda":
        return BackendChoice("transformers", "no GPU")
    if not vllm_usable:
        return BackendChoice("transformers", "no CUDA build of vLLM installed")
    if not rates or set(rates) != {"transformers", "vllm"}:
        raise ValueError(f"auto needs atoms/s of both backends, got {dict(rates or {})}")
    backend = "vllm" if rates["vllm"] > rates["transformers"] else "transformers"
    measured = ", ".join(f"{name} {rate:,.0f}" for name, rate in sorted(rates.items(), key=lambda x: -x[1]))
    return BackendChoice(backend, f"{source}: {measured} atoms/s")


def vllm_cuda_build() -> bool:
    """Whether `import vllm` gives a build that runs on CUDA (not the CPU build, which imports as vllm too)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda_alike())


def calibration_key(cfg: EncoderConfig, device: str) -> dict[str, Any]:
    """Everything that decides either backend's speed, and nothing that does not (the weights' values)."""
    import torch

    config = json.loads((resolve_model_path(cfg.model) / "config.json").read_text())
    settings = cfg.model_dump(include={"k", "pooling", "max_tokens", "dtype", "compile"})
    settings.update({k: v for k, v in cfg.model_dump().items() if k.startswith("vllm_")})
    versions = {}
    for package in ("torch", "transformers", "vllm"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "shape": {name: config.get(name) for name in SHAPE_FIELDS},
        "settings": settings,
        "batch": min(cfg.batch_size, CALIBRATION_TEXTS),
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "versions": versions,
    }


def key_id(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_table(cfg: EncoderConfig, storage: StorageConfig | None = None) -> dict[str, Any]:
    """The calibration table (empty when there is none, or it is unreadable: then it is measured again)."""
    fs, path = filesystem(join(cfg.cache_dir, TABLE_FILE), storage)
    if not fs.exists(path):
        return {}
    try:
        return json.loads(fs.cat_file(path))
    except ValueError as error:
        log.warning("calibration table %s unreadable (%s): measuring again", path, error)
        return {}


def record(cfg: EncoderConfig, key: Mapping[str, Any], rates: Mapping[str, float],
           storage: StorageConfig | None = None) -> None:
    """Add (or replace) one measurement in the table; concurrent writers: the last one's table stays."""
    table = read_table(cfg, storage)
    table[key_id(key)] = {"key": dict(key), "atoms_per_s": dict(rates),
                          "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    fs, path = filesystem(join(cfg.cache_dir, TABLE_FILE), storage)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    write_bytes_atomic(fs, path, json.dumps(table, indent=1, sort_keys=True).encode())


def calibration_texts(n: int, max_tokens: int, seed: int = 0) -> list[str]:
    """n texts of random lowercase words, each about half of max_tokens long: a behaviour's size."""
    rng = np.random.default_rng(seed)
    words = max(1, max_tokens // 4)
    return [" ".join("".join(chr(c) for c in rng.integers(97, 123, size=rng.integers(3, 9))) for _ in range(words))
            for _ in range(n)]


def atoms_per_s(encoder: ShallowEncoder, texts: list[str]) -> float:
    """The better of two timed calls of all `texts`, after a warm-up call."""
    encoder.encode(texts)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        encoder.encode(texts)
        seconds.append(time.perf_counter() - start)
    return round(len(texts) / min(seconds), 1)


def calibrate(cfg: EncoderConfig, device: str, storage: StorageConfig | None = None
              ) -> tuple[dict[str, float], dict[str, ShallowEncoder]]:
    """Atoms/s of each backend on calibration texts in calls of the actor's batch size, and the encoders
    built for it (the caller keeps the one it picks)."""
    from bahe_ray.encoders import build_encoder

    texts = calibration_texts(min(cfg.batch_size, CALIBRATION_TEXTS), cfg.max_tokens)
    encoders: dict[str, ShallowEncoder] = {}
    rates: dict[str, float] = {}
    for backend in ("transformers", "vllm"):  # the small model first: vLLM's engine sizes itself after it
        encoders[backend] = build_encoder(cfg.model_copy(update={"backend": backend}), device, storage)
        rates[backend] = atoms_per_s(encoders[backend], texts)
        log.info("calibration: %s %.0f atoms/s on %d texts", backend, rates[backend], len(texts))
    return rates, encoders


def auto_encoder(cfg: EncoderConfig, device: str, storage: StorageConfig | None = None
                 ) -> tuple[ShallowEncoder, BackendChoice]:
    """The encoder `backend: auto` runs on `device`, and why: from the table, else measured here (and recorded)."""
    from bahe_ray.encoders import build_encoder

    usable = device == "cuda" and vllm_cuda_build()
    if not usable:
        choice = decide(device, usable, None)
        return build_encoder(cfg.model_copy(update={"backend": choice.backend}), device, storage), choice
    key = calibration_key(cfg, device)
    entry = read_table(cfg, storage).get(key_id(key))
    if entry is not None:
        choice = decide(device, True, entry["atoms_per_s"], f"calibration table of {entry['date']}")
        return build_encoder(cfg.model_copy(update={"backend": choice.backend}), device, storage), choice
    rates, encoders = calibrate(cfg, device, storage)
    record(cfg, key, rates, storage)
    choice = decide(device, True, rates, f"measured at start on {key['batch']} texts")
    encoder = encoders.pop(choice.backend)
    encoders.clear()
    gc.collect()  # the other backend's weights or engine: freed now, not at some later collection
    return encoder, choice
