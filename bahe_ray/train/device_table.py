"""BAHE's embedding store resident on the training device, and the choice between it and the host path."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

from bahe_ray.runtime import GB
from bahe_ray.store import EmbeddingStore
from bahe_ray.store.sorted_ids import IdIndex

log = logging.getLogger(__name__)

CHUNK_ROWS = 65_536  # vectors copied to the device per chunk: the host never holds a second full copy


class DeviceTable:
    """A store's committed vectors resident on one device (one row per atom, sorted ids, then a zero row).

    The batch builder finds each atom's row on the host (`locate`, where a missing vector still
    raises `MissingVectorsError`, and no device value is read) and ships int64 rows; the step gathers
    the vectors on the device (`expand`). So a batch carries 8 bytes per behaviour instead of a
    vector, and the gather is part of the step, captured with it in a CUDA graph.
    """

    def __init__(self, store: EmbeddingStore, device: str | torch.device, dtype: torch.dtype) -> None:
        self.index = IdIndex.build(store.ids())
        self.zero_row = len(self.index.ids)
        self.vectors = torch.zeros(self.zero_row + 1, store.dim, dtype=dtype, device=device)
        for start in range(0, self.zero_row, CHUNK_ROWS):
            chunk = store.lookup(self.index.ids[start : start + CHUNK_ROWS])
            self.vectors[start : start + len(chunk)] = torch.from_numpy(chunk).to(device, dtype)

    @staticmethod
    def nbytes(store: EmbeddingStore, dtype: torch.dtype) -> int:
        """Device memory the table of `store` takes in `dtype`."""
        return (store.num_atoms + 1) * store.dim * dtype.itemsize

    def locate(self, atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found mask) of `atoms` (1-D), on the host."""
        return self.index.find(atoms)

    def expand(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """BaheCTR's tensors from a row batch (`features.bahe_row_batch`): hist_rows, item_rows -> hist, item."""
        out = {key: value for key, value in tensors.items() if key not in ("hist_rows", "item_rows")}
        out["hist"] = self.vectors[tensors["hist_rows"]]
        out["item"] = self.vectors[tensors["item_rows"]]
        return out


def device_table(store: EmbeddingStore, device: str | torch.device, dtype: torch.dtype,
                 budget_gb: float) -> DeviceTable | None:
    """The store's table on `device` when it takes at most `budget_gb` (train.device_table_gb); else None, the
    host path (each batch's distinct vectors looked up in the store and shipped once). Logs which."""
    size = DeviceTable.nbytes(store, dtype)
    where = f"{store.num_atoms:,} vectors of {store.dim} ({size / GB:.2f} GB as {str(dtype).removeprefix('torch.')})"
    if budget_gb <= 0 or size > budget_gb * GB:
        log.info("BAHE vectors: %s looked up on the host per batch (train.device_table_gb: %g)", where, budget_gb)
        return None
    log.info("BAHE vectors: %s resident on %s (train.device_table_gb: %g)", where, device, budget_gb)
    return DeviceTable(store, device, dtype)
