"""Batch assembly shared by training, evaluation and the Serve scorer: sample rows -> model inputs.

Sample rows carry ids only (see `bahe_ray.samples`); vectors and texts are looked up here,
where they are used. Two steps:

1. `sample_arrays(table, fields, N)`: the id arrays of a batch of sample rows (histories padded
   to N, most recent kept), independent of the model;
2. `bahe_batch` / `hybrid_batch` / `token_batch` / `id_batch` (or `make_batch(kind, ...)`): one model's
   `ModelBatch`, its tensors (formats in `bahe_ray.models.ctr`) and whether they hold padding.

BAHE reads vectors through any `VectorSource` (the embedding store, or the scorer's store plus
freshly encoded unseen atoms), or ships rows of a table already on the device (`VectorRows`,
`bahe_row_batch`). The token baseline reads texts through a `TokenCache`, which
tokenises each atom once and joins cached token lists exactly as `model.tokenize_histories`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from bahe_ray.config import MODEL_KINDS, ModelKind
from bahe_ray.models.tokens import BEHAVIOR_SEPARATOR, join_behaviour_tokens, pad_token_ids, special_tokens
from bahe_ray.runtime import to_device
from bahe_ray.samples import hist_column, pad_histories

VECTOR_KINDS: tuple[ModelKind, ...] = ("bahe", "bahe_hybrid")  # the kinds that read stored vectors
ID_KINDS: tuple[ModelKind, ...] = ("id", "din")  # the kinds that read atom ids only


class MissingVectorsError(KeyError):
    """Some behaviours or items of a batch have no stored vector (encode them first)."""


class VectorSource(Protocol):
    """Atom id -> vector. `EmbeddingStore` is one; the Serve scorer passes store + fresh encodings."""

    def lookup_with_mask(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float32 shaped ids.shape + (d,), found mask shaped like ids)."""
        ...


@dataclass(frozen=True)
class SampleArrays:
    """The ids of a batch of samples, B rows, F fields, N most recent behaviours per field."""

    hist_ids: np.ndarray  # (B, F, N) int64, oldest first, 0 where masked
    hist_mask: np.ndarray  # (B, F, N) bool, True at real behaviours
    item_ids: np.ndarray  # (B,) int64 item atom ids
    labels: np.ndarray | None  # (B,) float32, None when the rows carry no label (serving)
    user_ids: list[str]

    def __len__(self) -> int:
        return len(self.item_ids)


def sample_arrays(table: pa.Table, fields: Sequence[str], max_behaviors: int) -> SampleArrays:
    """SampleArrays of sample rows (columns user_id, item_atom_id, hist_<field>, optional label)."""
    padded = [pad_histories(table.column(hist_column(f)), max_behaviors) for f in fields]
    labels = table.column("label").to_numpy().astype(np.float32) if "label" in table.column_names else None
    return SampleArrays(
        hist_ids=np.stack([ids for ids, _ in padded], axis=1),
        hist_mask=np.stack([mask for _, mask in padded], axis=1),
        item_ids=table.column("item_atom_id").to_numpy().astype(np.int64),
        labels=labels,
        user_ids=[str(u) for u in table.column("user_id").to_pylist()],
    )


def used_width(mask: np.ndarray) -> int:
    """Positions up to the last one any row uses (>= 1): trailing all-padding columns cost compute, change nothing."""
    used = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))
    return int(used[-1]) + 1 if used.size else 1


@dataclass(frozen=True)
class ModelBatch:
    """One model's batch: its tensors (formats in `bahe_ray.models.ctr`), and whether a mask holds padding.

    The padding is known on the host where the batch is built, so the model is told
    (`forward(tensors, padded=...)`) instead of reading the mask back from the device, which
    waits for the GPU and cannot be captured in a CUDA graph.
    """

    tensors: dict[str, Tensor]
    padded: bool


class VectorRows(Protocol):
    """Atom id -> row of a vector table held where the model runs (`bahe_ray.train.DeviceTable`)."""

    zero_row: int  # a row of zeros, for padded positions

    def locate(self, atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found mask) of `atoms` (1-D)."""
        ...


@dataclass(frozen=True)
class _BaheLayout:
    """The ids of a BAHE batch as the model will see them: histories (cut or fixed width, maybe one row per
    distinct history) and every atom they and the items need, once each."""

    hist_ids: np.ndarray  # (U, F, W)
    hist_mask: np.ndarray  # (U, F, W)
    user_index: np.ndarray | None  # (B,): sample b's history row, when U < B
    atoms: np.ndarray  # distinct atoms of the real behaviours and the items
    slots: np.ndarray  # atoms index of each real behaviour (hist_mask order), then of each item
    n_real: int

    @classmethod
    def of(cls, arrays: SampleArrays, fixed: bool) -> _BaheLayout:
        width = arrays.hist_mask.shape[-1] if fixed else used_width(arrays.hist_mask)
        hist_ids, hist_mask = arrays.hist_ids[:, :, :width], arrays.hist_mask[:, :, :width]
        rows, user_index = len(arrays), None
        if not fixed:  # rows with the same history (a user's candidates when serving) run the deep layers once
            keys = np.concatenate([hist_ids.reshape(rows, -1), hist_mask.reshape(rows, -1)], axis=1)
            _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
            if len(first) < rows:
                hist_ids, hist_mask, user_index = hist_ids[first], hist_mask[first], inverse.reshape(-1)
        real = hist_ids[hist_mask]
        atoms, slots = np.unique(np.concatenate([real, arrays.item_ids]), return_inverse=True)
        return cls(hist_ids, hist_mask, user_index, atoms, slots, real.size)

    def check(self, found: np.ndarray) -> None:
        """MissingVectorsError unless every atom was `found`."""
        if not found.all():
            missing = ~found[self.slots]
            raise MissingVectorsError(
                f"{int(missing[: self.n_real].sum())} of {self.n_real} behaviours and {int(missing[self.n_real :].sum())} "
                f"of {missing.size - self.n_real} items have no stored vector (run `bahe encode` over these logs)"
            )

    def indices(self, rows: np.ndarray, zero_row: int) -> tuple[np.ndarray, np.ndarray]:
        """(history rows (U, F, W) with `zero_row` at padding, item rows (B,)) given each atom's row."""
        hist = np.full(self.hist_ids.shape, zero_row, dtype=np.int64)
        hist[self.hist_mask] = rows[self.slots[: self.n_real]]
        return hist, rows[self.slots[self.n_real :]].astype(np.int64)

    def batch(self, tensors: dict[str, Tensor], device: str | torch.device) -> ModelBatch:
        tensors["hist_mask"] = to_device(self.hist_mask, device)
        if self.user_index is not None:
            tensors["user_index"] = to_device(self.user_index.astype(np.int64), device)
        return ModelBatch(tensors, padded=not self.hist_mask.all())


def bahe_batch(arrays: SampleArrays, vectors: VectorSource, device: str | torch.device = "cpu",
               fixed: bool = False) -> ModelBatch:
    """BaheCTR's batch: stored vectors of the real behaviours (masked positions are zeros) and of the item.

    Each distinct atom's vector is looked up and shipped once; the padded (B, F, N, d) batch is
    gathered where the model runs (`gather_rows`). Histories are cut after the last used
    position, so the deep layers run over the batch's longest history rather than always N (as
    the token baseline pads to its longest sequence), and samples with the same history share
    one row (`user_index`). `fixed`: neither, so every batch of B rows has one shape (B, F, N)
    (a captured CUDA graph replays one shape).
    """
    layout = _BaheLayout.of(arrays, fixed)
    found_vectors, found = vectors.lookup_with_mask(layout.atoms)
    layout.check(found)
    table = np.concatenate([found_vectors, np.zeros((1, found_vectors.shape[-1]), np.float32)])
    hist_slots, item_slots = layout.indices(np.arange(len(layout.atoms)), len(layout.atoms))
    hist, item = gather_rows(table, [hist_slots, item_slots], device)
    return layout.batch({"hist": hist, "item": item}, device)


def bahe_row_batch(arrays: SampleArrays, table: VectorRows, device: str | torch.device = "cpu",
                   fixed: bool = False) -> ModelBatch:
    """`bahe_batch` for vectors resident on the device: rows of `table` (hist_rows (B, F, N), item_rows (B,))
    instead of vectors, gathered inside the step (`DeviceTable.expand`). Rows are found on the host, so
    a missing vector raises here as on the host path."""
    layout = _BaheLayout.of(arrays, fixed)
    rows, found = table.locate(layout.atoms)
    layout.check(found)
    hist_rows, item_rows = layout.indices(rows, table.zero_row)
    return layout.batch({"hist_rows": to_device(hist_rows, device), "item_rows": to_device(item_rows, device)}, device)


def gather_rows(table: np.ndarray, indices: Sequence[np.ndarray], device: str | torch.device) -> list[Tensor]:
    """table[index] for each index, as tensors on `device`.

    A GPU receives the (small) table and the indices and gathers there, instead of a dense
    padded batch many times the size; on CPU numpy gathers (about 3x faster than torch's
    indexing on two cores).
    """
    if torch.device(device).type == "cpu":
        return [torch.from_numpy(np.take(table, index, axis=0)) for index in indices]
    rows = to_device(table, device)
    return [rows[to_device(index, device)] for index in indices]


class TokenCache:
    """Token ids of atom texts (no special tokens), tokenised once per atom id.

    `texts(ids)` supplies the texts of atoms not seen yet (e.g. `EmbeddingStore.texts`, which
    holds every atom's normalised text). Not thread-safe.
    """

    def __init__(self, tokenizer, max_length: int, texts: Callable[[np.ndarray], list[str | None]]) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.texts = texts
        self.separator: list[int] = tokenizer(BEHAVIOR_SEPARATOR, add_special_tokens=False)["input_ids"]
        self.specials = special_tokens(tokenizer)
        self._tokens: dict[int, list[int]] = {}

    def tokens(self, ids: np.ndarray) -> list[list[int]]:
        """Token lists of `ids` (1-D), tokenising the atoms not cached yet in one call."""
        new = np.unique(ids)
        new = new[np.array([atom not in self._tokens for atom in new.tolist()], dtype=bool)]
        if len(new):
            texts = self.texts(new)
            if any(t is None for t in texts):
                raise MissingVectorsError(f"{sum(t is None for t in texts)} atoms have no stored text")
            for atom, seq in zip(new.tolist(), self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
                self._tokens[atom] = seq
        return [self._tokens[int(i)] for i in ids]

    def item_tokens(self, ids: np.ndarray) -> list[list[int]]:
        """Item sequences: the first tokens within max_length, wrapped in the special tokens."""
        prefix, suffix = self.specials
        keep = max(self.max_length - len(prefix) - len(suffix), 0)
        return [prefix + seq[:keep] + suffix for seq in self.tokens(ids)]


def token_batch(arrays: SampleArrays, tokens: TokenCache, device: str | torch.device = "cpu",
                fixed: bool = False) -> ModelBatch:
    """TokenCTR's batch; equal to `model.tokenize_histories` over the same atoms' texts. Sequences are
    padded to the batch's longest, or with `fixed` to the model's max length (one shape for every batch)."""
    b, f, _ = arrays.hist_ids.shape
    cached = tokens.tokens(arrays.hist_ids[arrays.hist_mask])
    seqs, start = [], 0
    for count in arrays.hist_mask.sum(axis=2).reshape(-1).tolist():
        seqs.append(join_behaviour_tokens(cached[start : start + count], tokens.separator, tokens.specials,
                                          tokens.max_length))
        start += count
    items = tokens.item_tokens(arrays.item_ids)
    width = tokens.max_length if fixed else None
    hist_ids, hist_mask = pad_token_ids(seqs, device, width)
    item_ids, item_mask = pad_token_ids(items, device, width)
    padded = min(map(len, seqs)) < hist_ids.shape[1] or min(map(len, items)) < item_ids.shape[1]
    return ModelBatch({
        "hist_input_ids": hist_ids.view(b, f, -1),
        "hist_attention_mask": hist_mask.view(b, f, -1),
        "item_input_ids": item_ids,
        "item_attention_mask": item_mask,
    }, padded)


def id_batch(arrays: SampleArrays, device: str | torch.device = "cpu", fixed: bool = False) -> ModelBatch:
    """IdCTR's batch: the atom ids themselves (cut after the last used position unless `fixed`, like `bahe_batch`)."""
    width = arrays.hist_mask.shape[-1] if fixed else used_width(arrays.hist_mask)
    mask = arrays.hist_mask[:, :, :width]
    return ModelBatch({
        "hist_ids": to_device(arrays.hist_ids[:, :, :width], device),
        "hist_mask": to_device(mask, device),
        "item_ids": to_device(arrays.item_ids, device),
    }, padded=not mask.all())


def hybrid_batch(bahe: ModelBatch, arrays: SampleArrays, device: str | torch.device = "cpu",
                 fixed: bool = False) -> ModelBatch:
    """BaheHybridCTR's batch: a BAHE batch plus `id_batch`'s tensors under an `id_` prefix."""
    ids = id_batch(arrays, device, fixed)
    return ModelBatch({**bahe.tensors, **{f"id_{k}": v for k, v in ids.tensors.items()}}, bahe.padded)


def make_batch(
    kind: ModelKind,
    arrays: SampleArrays,
    device: str | torch.device = "cpu",
    vectors: VectorSource | None = None,
    tokens: TokenCache | None = None,
    rows: VectorRows | None = None,
    fixed: bool = False,
) -> ModelBatch:
    """The batch of model `kind`: BAHE needs `vectors` (or `rows`, vectors on the device), the token baseline
    `tokens`. `fixed`: every batch of B rows has one shape (see `bahe_batch`)."""
    if kind in VECTOR_KINDS:
        if rows is not None:
            batch = bahe_row_batch(arrays, rows, device, fixed)
        elif vectors is None:
            raise ValueError("a BAHE batch needs a vector source")
        else:
            batch = bahe_batch(arrays, vectors, device, fixed)
        return hybrid_batch(batch, arrays, device, fixed) if kind == "bahe_hybrid" else batch
    if kind == "token":
        if tokens is None:
            raise ValueError("a token-level batch needs a token cache")
        return token_batch(arrays, tokens, device, fixed)
    if kind in ID_KINDS:
        return id_batch(arrays, device, fixed)
    raise ValueError(f"unknown model kind {kind!r} (known: {MODEL_KINDS})")
