"""What turns sample rows into one model kind's batches: the embedding store (BAHE: vectors; the token
baseline: texts) and the tokenizer. The sample table carries ids only; vectors and texts are looked up
where the batch is built (`bahe_ray.features`)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import Tensor, nn

from bahe_ray.checkpoint import unwrap
from bahe_ray.config import Config, StorageConfig
from bahe_ray.features import ModelKind, SampleArrays, TokenCache, make_batch, sample_arrays
from bahe_ray.models.registry import resolve_model_path
from bahe_ray.store import EmbeddingStore


@dataclass
class BatchInputs:
    """What turns sample rows into one model kind's batches: the store (vectors, texts) and tokenizer."""

    kind: ModelKind
    fields: list[str]
    max_behaviors: int
    dim: int
    store: EmbeddingStore | None = None
    tokens: TokenCache | None = None

    def arrays(self, table: pa.Table) -> SampleArrays:
        return sample_arrays(table, self.fields, self.max_behaviors)

    def batch(self, arrays: SampleArrays, device: str | torch.device) -> dict[str, Tensor]:
        return make_batch(self.kind, arrays, device, vectors=self.store, tokens=self.tokens)


def batch_inputs(
    kind: ModelKind, cfg: Config, model: nn.Module, store_path: str | None = None, storage: StorageConfig | None = None
) -> BatchInputs:
    """The batch inputs of `model`: opens the embedding store (bahe: vectors; token: texts) and the tokenizer."""
    fields, n = list(cfg.samples.fields), cfg.samples.max_behaviors
    if kind == "id":
        return BatchInputs(kind, fields, n, dim=cfg.model.id_embedding_dim)
    store = EmbeddingStore.read(store_path or cfg.store.path, storage or cfg.storage)
    hidden = unwrap(model).backbone.hidden_size
    if kind == "bahe":
        if store.dim != hidden:
            raise ValueError(f"store {store.path} holds {store.dim}-d vectors; the model's layers are {hidden}-d")
        return BatchInputs(kind, fields, n, dim=store.dim, store=store)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(cfg.encoder.model)))
    tokens = TokenCache(tokenizer, unwrap(model).max_length, store.texts)
    return BatchInputs(kind, fields, n, dim=hidden, store=store, tokens=tokens)
