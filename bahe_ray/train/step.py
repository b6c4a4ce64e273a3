"""One optimisation step and what it needs: the seeded or warm-started model, AdamW with a backbone and
a head learning rate, the training device and the autocast precision (bf16 on GPU under "auto")."""

from __future__ import annotations

import logging
import random
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bahe_ray.checkpoint import build_model, load_weights, read_meta, unwrap
from bahe_ray.config import Config, TrainConfig
from bahe_ray.features import ModelKind

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def train_device(cfg: Config) -> str:
    if cfg.train.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu is set but no CUDA device is visible")
    return "cuda" if cfg.train.use_gpu else "cpu"


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """bf16 when asked, or on GPU under "auto"; None means plain fp32."""
    if precision == "bfloat16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: str | torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast to `dtype` on `device`'s type; no autocast when `dtype` is None."""
    return nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW: pretrained transformer parameters (backbone, BERT positions) at `lr`, the rest at `head_lr`."""
    pretrained, new = [], []
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            (pretrained if name.startswith(("backbone.", "positions.")) else new).append(param)
    groups = [{"params": p, "lr": lr} for p, lr in ((pretrained, tc.lr), (new, tc.head_lr)) if p]
    return torch.optim.AdamW(groups, weight_decay=tc.weight_decay)


def initial_model(kind: ModelKind, cfg: Config) -> nn.Module:
    """A seeded fresh model, or the weights of `train.resume_from` (warm start, same architecture)."""
    seed_everything(cfg.train.seed)
    model = build_model(kind, cfg)
    if cfg.train.resume_from:
        previous = read_meta(cfg.train.resume_from, cfg.storage)
        if previous.model_kind != kind:
            raise ValueError(f"train.resume_from holds a {previous.model_kind!r} model, not {kind!r}")
        meta = load_weights(cfg.train.resume_from, model, cfg.storage)
        log.info("warm start from %s (epoch %d)", cfg.train.resume_from, meta.epoch)
    return model


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], labels: Tensor,
               params: list[nn.Parameter], grad_clip: float, dtype: torch.dtype | None) -> Tensor:
    """One optimisation step on a batch already on the model's device; the loss stays there (no sync)."""
    with autocast(labels.device, dtype):
        logits = model(batch)
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach()
