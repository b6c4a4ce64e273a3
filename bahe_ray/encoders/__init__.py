"""Shallow encoders: choosing a backend, finding the checkpoint, and the fingerprint both backends share.

Both backends (transformers here in `hf.py`, vLLM in `vllm.py`) build their fingerprint with
`encoder_fingerprint`, from the ORIGINAL checkpoint (never a truncated copy), so vectors of the
same model, k, pooling, dtype and max_tokens are interchangeable whichever backend made them.
"""

from __future__ import annotations

from bahe_ray.config import EncoderConfig, StorageConfig
from bahe_ray.encoders.base import BackendChoice, EncoderFingerprint, ShallowEncoder
from bahe_ray.models.registry import model_name, resolve_model_path, weights_sha256
from bahe_ray.runtime import default_device, default_dtype


def compute_dtype(cfg: EncoderConfig, device: str) -> str:
    """The dtype the encoder computes in: cfg.dtype, where "auto" is fp32 on CPU and bf16 on GPU."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return str(default_dtype(device)).removeprefix("torch.")


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
    """The encoder `cfg.backend` asks for ("auto": see `choose_encoder`).

    `device` defaults to this process's best; the encode job's actors pass the device the
    driver's fingerprint names. `storage` reaches an s3:// `cfg.cache_dir` (vLLM's truncated
    checkpoints, the calibration table).
    """
    return choose_encoder(cfg, device, storage)[0]


def choose_encoder(
    cfg: EncoderConfig, device: str | None = None, storage: StorageConfig | None = None
) -> tuple[ShallowEncoder, BackendChoice]:
    """The encoder and the backend it runs on, with the reason: as configured, or for "auto" the faster
    backend measured on this hardware (`select.auto_encoder`; transformers without a GPU)."""
    device = device or default_device()
    if cfg.backend == "auto":
        from bahe_ray.encoders.select import auto_encoder

        return auto_encoder(cfg, device, storage)
    if cfg.backend == "vllm":
        from bahe_ray.encoders.vllm import VLLMEncoder

        return VLLMEncoder(cfg, device=device, storage=storage), BackendChoice("vllm", "configured")
    from bahe_ray.encoders.hf import TransformersEncoder

    return TransformersEncoder(cfg, device=device), BackendChoice("transformers", "configured")
