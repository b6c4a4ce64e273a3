"""Batch assembly shared by training, evaluation and the Serve scorer: sample rows -> model inputs.

Sample rows carry ids only (see `bahe_ray.samples`); vectors and texts are looked up here,
where they are used. Two steps:

1. `sample_arrays(table, fields, N)`: the id arrays of a batch of sample rows (histories padded
   to N, most recent kept), independent of the model;
2. `bahe_batch` / `token_batch` / `id_batch` (or `make_batch(kind, ...)`): the tensors of one
   model's batch dict (formats in `bahe_ray.model`).

BAHE reads vectors through any `VectorSource` (the embedding store, or the scorer's store plus
freshly encoded unseen atoms). The token baseline reads texts through a `TokenCache`, which
tokenises each atom once and joins cached token lists exactly as `model.tokenize_histories`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from bahe_ray.models.tokens import BEHAVIOR_SEPARATOR, join_behaviour_tokens, pad_token_ids, special_tokens
from bahe_ray.runtime import to_device
from bahe_ray.samples import hist_column, pad_histories

ModelKind = Literal["bahe", "token", "id"]
MODEL_KINDS: tuple[ModelKind, ...] = ("bahe", "token", "id")


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


def bahe_batch(arrays: SampleArrays, vectors: VectorSource, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """BaheCTR's batch: stored vectors of the real behaviours (masked positions are zeros) and of the item.

    Each distinct atom's vector is looked up and shipped once; the padded (B, F, N, d) batch is
    gathered where the model runs (`gather_rows`). Histories are cut after the last used
    position, so the deep layers run over the batch's longest history rather than always N (as
    the token baseline pads to its longest sequence).
    """
    width = used_width(arrays.hist_mask)
    hist_ids, hist_mask = arrays.hist_ids[:, :, :width], arrays.hist_mask[:, :, :width]
    rows = len(arrays)
    # Rows with the same history (a user's candidates when serving) run the deep layers once.
    keys = np.concatenate([hist_ids.reshape(rows, -1), hist_mask.reshape(rows, -1)], axis=1)
    _, first, user_index = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    shared = len(first) < rows
    if shared:
        hist_ids, hist_mask = hist_ids[first], hist_mask[first]
    real = hist_ids[hist_mask]
    atoms, slots = np.unique(np.concatenate([real, arrays.item_ids]), return_inverse=True)
    found_vectors, found = vectors.lookup_with_mask(atoms)
    if not found.all():
        missing = ~found[slots]
        raise MissingVectorsError(
            f"{int(missing[: real.size].sum())} of {real.size} behaviours and {int(missing[real.size :].sum())} of "
            f"{rows} items have no stored vector (run `bahe encode` over these logs)"
        )
    table = np.concatenate([found_vectors, np.zeros((1, found_vectors.shape[-1]), np.float32)])
    hist_slots = np.full(hist_ids.shape, len(atoms), dtype=np.int64)
    hist_slots[hist_mask] = slots[: real.size]
    hist, item = gather_rows(table, [hist_slots, slots[real.size :]], device)
    batch = {"hist": hist, "hist_mask": to_device(hist_mask, device), "item": item}
    if shared:
        batch["user_index"] = to_device(user_index.reshape(-1).astype(np.int64), device)
    return batch


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


def token_batch(arrays: SampleArrays, tokens: TokenCache, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """TokenCTR's batch; equal to `model.tokenize_histories` over the same atoms' texts."""
    b, f, _ = arrays.hist_ids.shape
    cached = tokens.tokens(arrays.hist_ids[arrays.hist_mask])
    seqs, start = [], 0
    for count in arrays.hist_mask.sum(axis=2).reshape(-1).tolist():
        seqs.append(join_behaviour_tokens(cached[start : start + count], tokens.separator, tokens.specials,
                                          tokens.max_length))
        start += count
    hist_ids, hist_mask = pad_token_ids(seqs, device)
    item_ids, item_mask = pad_token_ids(tokens.item_tokens(arrays.item_ids), device)
    return {
        "hist_input_ids": hist_ids.view(b, f, -1),
        "hist_attention_mask": hist_mask.view(b, f, -1),
        "item_input_ids": item_ids,
        "item_attention_mask": item_mask,
    }


def id_batch(arrays: SampleArrays, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """IdCTR's batch: the atom ids themselves (cut after the last used position, like `bahe_batch`)."""
    width = used_width(arrays.hist_mask)
    return {
        "hist_ids": to_device(arrays.hist_ids[:, :, :width], device),
        "hist_mask": to_device(arrays.hist_mask[:, :, :width], device),
        "item_ids": to_device(arrays.item_ids, device),
    }


def make_batch(
    kind: ModelKind,
    arrays: SampleArrays,
    device: str | torch.device = "cpu",
    vectors: VectorSource | None = None,
    tokens: TokenCache | None = None,
) -> dict[str, Tensor]:
    """The batch dict of model `kind`: BAHE needs `vectors`, the token baseline `tokens`."""
    if kind == "bahe":
        if vectors is None:
            raise ValueError("a BAHE batch needs a vector source")
        return bahe_batch(arrays, vectors, device)
    if kind == "token":
        if tokens is None:
            raise ValueError("a token-level batch needs a token cache")
        return token_batch(arrays, tokens, device)
    if kind == "id":
        return id_batch(arrays, device)
    raise ValueError(f"unknown model kind {kind!r} (known: {MODEL_KINDS})")
