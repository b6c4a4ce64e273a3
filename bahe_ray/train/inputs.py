"""What turns sample rows into one model kind's batches: the embedding store (BAHE: vectors; the token
baseline: texts) and the tokenizer. The sample table carries ids only; vectors and texts are looked up
where the batch is built (`bahe_ray.features`), or, for training with `train.device_table_gb`, BAHE's
vectors are resident on the device and batches carry their rows (`training_inputs`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pyarrow as pa
import torch
from torch import nn

from bahe_ray.checkpoint import unwrap
from bahe_ray.config import Config, StorageConfig, TrainConfig
from bahe_ray.features import (
    ID_KINDS,
    VECTOR_KINDS,
    ModelBatch,
    ModelKind,
    SampleArrays,
    TokenCache,
    make_batch,
    sample_arrays,
)
from bahe_ray.models.registry import resolve_model_path
from bahe_ray.store import EmbeddingStore
from bahe_ray.store.sharded import ShardedStore, open_sharded
from bahe_ray.train.device_table import DeviceTable, device_table


@dataclass
class BatchInputs:
    """What turns sample rows into one model kind's batches: the store (vectors, texts) and tokenizer."""

    kind: ModelKind
    fields: list[str]
    max_behaviors: int
    dim: int
    store: EmbeddingStore | None = None
    tokens: TokenCache | None = None
    table: DeviceTable | None = None  # BAHE: the store's vectors on the device; batches then carry rows
    sharded: ShardedStore | None = None  # vectors looked up from shard actors (`shard_count` > 0)
    fixed_shape: bool = False  # every batch of B rows has one shape (a captured step replays one)

    def arrays(self, table: pa.Table) -> SampleArrays:
        return sample_arrays(table, self.fields, self.max_behaviors)

    def batch(self, arrays: SampleArrays, device: str | torch.device) -> ModelBatch:
        vectors = self.sharded or self.store
        return make_batch(self.kind, arrays, device, vectors=vectors, tokens=self.tokens, rows=self.table,
                          fixed=self.fixed_shape)


def training_inputs(inputs: BatchInputs, tc: TrainConfig, device: str | torch.device) -> BatchInputs:
    """`inputs` as the training step takes them: BAHE's vectors on `device` when they fit
    `train.device_table_gb` (in the weights' dtype, which the model casts them to anyway), and fixed-shape
    batches under `train.cuda_graph`. Evaluation may use the same table with `fixed_shape=False`."""
    table = None
    if inputs.kind in VECTOR_KINDS and inputs.store is not None and inputs.sharded is None:
        table = device_table(inputs.store, device, getattr(torch, tc.weights_dtype), tc.device_table_gb)
    return replace(inputs, table=table, fixed_shape=tc.cuda_graph)


def batch_inputs(
    kind: ModelKind, cfg: Config, model: nn.Module, store_path: str | None = None, storage: StorageConfig | None = None
) -> BatchInputs:
    """The batch inputs of `model`: opens the embedding store (bahe: vectors; token: texts) and the tokenizer."""
    fields, n = list(cfg.samples.fields), cfg.samples.max_behaviors
    if kind in ID_KINDS:
        return BatchInputs(kind, fields, n, dim=cfg.model.id_embedding_dim)
    store = EmbeddingStore.read(store_path or cfg.store.path, storage or cfg.storage, cfg.store.reader)
    hidden = unwrap(model).backbone.hidden_size
    if kind in VECTOR_KINDS:
        if store.dim != hidden:
            raise ValueError(f"store {store.path} holds {store.dim}-d vectors; the model's layers are {hidden}-d")
        return BatchInputs(kind, fields, n, dim=store.dim, store=store, sharded=open_sharded(store, cfg.store.reader))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(cfg.encoder.model)))
    tokens = TokenCache(tokenizer, unwrap(model).max_length, store.texts)
    return BatchInputs(kind, fields, n, dim=hidden, store=store, tokens=tokens)
