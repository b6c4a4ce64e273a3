"""DIN (Deep Interest Network, Zhou et al., KDD 2018) as the classical CTR baseline: target attention of the
candidate item over each behaviour field's history of ID embeddings.

Same inputs as `IdCTR` (hashed atom ids: hist_ids (B, F, N), hist_mask (B, F, N), item_ids (B,)) and the
paper's defaults: an activation unit MLP 80-40 over [key, query, key - query, key * query] giving one
unnormalised weight per behaviour (no softmax, as published), a weighted sum per field, then an MLP 200-80
over concat(F pooled fields, item), with Dice activations throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bahe_ray.config import ModelConfig
from bahe_ray.models.ctr import IdFeatures


class Dice(nn.Module):
    """Dice: p(x) * x + (1 - p(x)) * alpha * x with p = sigmoid(batch-normalised x) (DIN's data-adaptive PReLU)."""

    def __init__(self, width: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(width, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:
        p = torch.sigmoid(self.norm(x))
        return p * x + (1 - p) * self.alpha * x


def dice_mlp(in_dim: int, hidden: list[int]) -> nn.Sequential:
    """Linear + Dice per hidden width, then a linear layer to one output."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), Dice(width)]
        in_dim = width
    layers.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*layers)


class DinCTR(nn.Module):
    """DIN over hashed atom ids; `forward(batch, padded=None)` takes IdCTR's batch (`features.id_batch`)."""

    def __init__(self, n_fields: int, cfg: ModelConfig, num_buckets: int) -> None:
        super().__init__()
        e = cfg.id_embedding_dim
        self.ids = IdFeatures(num_buckets, e)
        self.attention = dice_mlp(4 * e, cfg.din_attention_hidden)
        self.mlp = dice_mlp((n_fields + 1) * e, cfg.din_hidden)

    def forward(self, batch: dict[str, Tensor], padded: bool | None = None) -> Tensor:
        keys, item = self.ids.embed(batch["hist_ids"], batch["item_ids"])  # (B, F, N, e), (B, e)
        mask = batch["hist_mask"].bool()
        b, f, n, e = keys.shape
        query = item[:, None, None, :].expand(b, f, n, e)
        unit = torch.cat([keys, query, keys - query, keys * query], dim=-1).reshape(b * f * n, 4 * e)
        weights = self.attention(unit).view(b, f, n) * mask  # padding weighs nothing
        users = (weights[..., None] * keys).sum(dim=2)  # (B, F, e)
        return self.mlp(torch.cat([users.flatten(1), item], dim=1)).squeeze(-1)
