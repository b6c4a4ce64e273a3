"""CTR model checkpoints: a folder (local path or s3://) of safetensors weights and a JSON record.

Layout:

  model.safetensors      every tensor of the model's state_dict (safetensors only; never pickle)
  optimizer.safetensors  optional (Ray Train epoch checkpoints, for resuming): AdamW's per-parameter
                         state as tensors "<param index>.<name>"; its param_groups (plain numbers)
                         sit in the file's metadata as JSON
  checkpoint.json        CheckpointMeta: format version, model kind, the full Config dump, the
                         embedding store's encoder fingerprint and its id, store path, fields,
                         max_behaviors, input dim, epoch, metrics, sha256 of the weight files, and
                         (epoch checkpoints) the training state needed to resume

checkpoint.json is written last, so a folder without it is not a checkpoint. Loading rebuilds the
model from the recorded config (`build_model`: the pretrained backbone named by encoder.model,
then the recorded weights, loaded strictly) and refuses, with CheckpointCorruptError naming the
file, weights whose sha256 differs from the record (altered or truncated), unreadable files, and
weights whose tensor names or shapes differ from the model's.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn
from transformers.utils import logging as hf_logging

from bahe_ray.config import Config, StorageConfig
from bahe_ray.features import ModelKind
from bahe_ray.fs import filesystem, join, write_bytes_atomic
from bahe_ray.models.backbone import Backbone
from bahe_ray.models.ctr import BaheCTR, BaheHybridCTR, IdCTR, TokenCTR
from bahe_ray.models.din import DinCTR
from bahe_ray.models.registry import resolve_model_path

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "checkpoint.json"


class CheckpointCorruptError(Exception):
    """A checkpoint file is unreadable, altered, truncated or does not fit the recorded model."""


class CheckpointMeta(BaseModel):
    """checkpoint.json: everything needed to rebuild, check and compare a trained model."""

    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT_VERSION
    model_kind: ModelKind
    config: dict[str, Any]  # Config.model_dump(mode="json")
    fields: list[str]
    max_behaviors: int
    dim: int  # width of the model's inputs (stored vectors, hidden size or id embedding)
    encoder_fingerprint: dict[str, Any] | None = None  # of the store the model read (bahe, token)
    encoder_fingerprint_id: str | None = None
    store_path: str | None = None
    epoch: int = 0
    metrics: dict[str, float | None] = {}
    model_sha256: str = ""
    optimizer_sha256: str | None = None
    train_state: dict[str, Any] | None = None  # epoch checkpoints: see train.TrainState
    created_at: str = ""

    @property
    def cfg(self) -> Config:
        return Config.model_validate(self.config)


def build_model(kind: ModelKind, cfg: Config) -> nn.Module:
    """A fresh model of `kind` from the config: pretrained backbone (fp32) + new head, fields from samples.fields."""
    # transformers' weight-loading progress bar takes tqdm's process-wide lock, on which a Ray
    # driver printing worker logs was seen to deadlock; training logs per epoch instead.
    hf_logging.disable_progress_bar()
    n_fields = len(cfg.samples.fields)
    if kind == "id":
        return IdCTR(n_fields, cfg.model, cfg.model.id_buckets)
    if kind == "din":
        return DinCTR(n_fields, cfg.model, cfg.model.id_buckets)
    backbone = Backbone.load(resolve_model_path(cfg.encoder.model), trust_remote_code=cfg.encoder.trust_remote_code)
    if kind == "bahe":
        return BaheCTR(backbone, cfg.encoder.k, n_fields, cfg.model)
    if kind == "bahe_hybrid":
        return BaheHybridCTR(backbone, cfg.encoder.k, n_fields, cfg.model)
    if kind == "token":
        return TokenCTR(backbone, n_fields, cfg.model)
    raise ValueError(f"unknown model kind {kind!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(
    folder: str,
    model: nn.Module,
    meta: CheckpointMeta,
    storage: StorageConfig | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> CheckpointMeta:
    """Write model (and optimizer) weights, then checkpoint.json with their sha256; returns the written meta."""
    fs, root = filesystem(folder, storage)
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    data = save_tensors(weights, metadata={"format": "pt"})
    write_bytes_atomic(fs, join(root, MODEL_FILE), data)
    update: dict[str, Any] = {"model_sha256": _sha256(data), "optimizer_sha256": None}
    if optimizer is not None:
        opt_data = _optimizer_bytes(optimizer)
        write_bytes_atomic(fs, join(root, OPTIMIZER_FILE), opt_data)
        update["optimizer_sha256"] = _sha256(opt_data)
    update["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = meta.model_copy(update=update)
    write_bytes_atomic(fs, join(root, META_FILE), meta.model_dump_json(indent=1).encode())
    return meta


def read_meta(folder: str, storage: StorageConfig | None = None) -> CheckpointMeta:
    """checkpoint.json of a checkpoint folder (FileNotFoundError if there is none)."""
    fs, root = filesystem(folder, storage)
    where = join(root, META_FILE)
    try:
        raw = fs.cat_file(where)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no checkpoint at {folder} (missing {META_FILE})") from e
    try:
        meta = CheckpointMeta.model_validate_json(raw)
    except ValidationError as e:
        raise CheckpointCorruptError(f"{where}: not a valid checkpoint record ({e})") from e
    if meta.format != FORMAT_VERSION:
        raise CheckpointCorruptError(f"{where}: unsupported checkpoint format {meta.format}")
    return meta


def load_weights(folder: str, model: nn.Module, storage: StorageConfig | None = None) -> CheckpointMeta:
    """Load a checkpoint's weights into `model` (after checking their sha256); every tensor must match; returns its meta."""
    meta = read_meta(folder, storage)
    where, tensors, _ = _read_tensors(folder, MODEL_FILE, meta.model_sha256, storage)
    try:
        keys = unwrap(model).load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointCorruptError(f"{where}: weights do not fit the {meta.model_kind} model: {' '.join(str(e).split())}") from e
    if keys.missing_keys or keys.unexpected_keys:
        raise CheckpointCorruptError(
            f"{where}: weights do not fit the {meta.model_kind} model: missing {keys.missing_keys[:5]}, "
            f"unexpected {keys.unexpected_keys[:5]}"
        )
    return meta


def load_checkpoint(
    folder: str, storage: StorageConfig | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the recorded model, load its checked weights, and return it in eval mode on `device`."""
    meta = read_meta(folder, storage)
    model = build_model(meta.model_kind, meta.cfg)
    load_weights(folder, model, storage)
    return model.to(device).eval(), meta


def load_optimizer_state(folder: str, optimizer: torch.optim.Optimizer, storage: StorageConfig | None = None) -> None:
    """Restore AdamW state saved by `save_checkpoint(..., optimizer=...)` (resuming a run)."""
    meta = read_meta(folder, storage)
    if meta.optimizer_sha256 is None:
        raise FileNotFoundError(f"checkpoint {folder} holds no optimizer state")
    where, tensors, header = _read_tensors(folder, OPTIMIZER_FILE, meta.optimizer_sha256, storage)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    try:
        groups = json.loads(header["param_groups"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, ValueError) as e:
        raise CheckpointCorruptError(f"{where}: optimizer state does not fit the optimizer ({e})") from e


def export_checkpoint(src: str, dst: str, storage: StorageConfig | None = None) -> CheckpointMeta:
    """Copy a checkpoint's model and record (not its optimizer state) to `dst`, checking the weights on the way."""
    meta = read_meta(src, storage)
    _, data = _read_checked(src, MODEL_FILE, meta.model_sha256, storage)
    fs, root = filesystem(dst, storage)
    write_bytes_atomic(fs, join(root, MODEL_FILE), data)
    meta = meta.model_copy(update={"optimizer_sha256": None})
    write_bytes_atomic(fs, join(root, META_FILE), meta.model_dump_json(indent=1).encode())
    return meta


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_checked(folder: str, name: str, sha256: str, storage: StorageConfig | None) -> tuple[str, bytes]:
    fs, root = filesystem(folder, storage)
    where = join(root, name)
    try:
        data = fs.cat_file(where)
    except FileNotFoundError as e:
        raise CheckpointCorruptError(f"{where}: missing") from e
    if _sha256(data) != sha256:
        raise CheckpointCorruptError(f"{where}: sha256 differs from {META_FILE} (file altered or truncated)")
    return where, data


def _read_tensors(
    folder: str, name: str, sha256: str, storage: StorageConfig | None
) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """(path, tensors, header metadata) of a checked safetensors file."""
    where, data = _read_checked(folder, name, sha256, storage)
    try:
        tensors = load_tensors(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as e:
        raise CheckpointCorruptError(f"{where}: unreadable safetensors file ({e})") from e
    return where, tensors, header


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    """An optimizer's state_dict as safetensors: tensors per parameter, param_groups as JSON metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {name!r} is not a tensor; only tensor state is saved")
            tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
    return save_tensors(tensors, metadata={"param_groups": json.dumps(state["param_groups"])})
