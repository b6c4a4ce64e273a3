"""The scorer's state caches: what the CTR head reads of an item and of a user's field, kept on the model's device.

An item's state (its vector through the upper layers, `BaheCTR.item_states`) depends only on the
checkpoint and the item's vector; a user's field state (`BaheCTR.user_states`) only on the
checkpoint, the field and the atom ids of that history. With both cached, scoring a candidate is
the head alone. One `StateCaches` belongs to one loaded checkpoint (a rollout brings new, empty
ones) and is emptied whenever the store version it was filled under changes, so a score never
comes from another checkpoint's or another store version's state. A miss is computed by the same
model methods, so an uncached scorer is this one with every lookup a miss.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


class StateCache:
    """Key -> one state row (d floats) in a preallocated (capacity, d) tensor; the least recently used
    key gives its row up when full. Capacity 0 caches nothing. Not thread-safe."""

    def __init__(self, capacity: int, dim: int, device: str | torch.device) -> None:
        self.capacity, self.dim, self.device = capacity, dim, torch.device(device)
        self.rows = torch.empty((capacity, dim), dtype=torch.float32, device=self.device)
        self.slots: OrderedDict[Hashable, int] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.slots)

    def clear(self) -> None:
        self.slots.clear()

    def states(
        self, keys: Sequence[Hashable], compute: Callable[[list[Hashable]], Tensor]
    ) -> tuple[Tensor, np.ndarray]:
        """(states (len(keys), d) float32 of distinct `keys`, hit mask): cached rows, and `compute(missing
        keys)` for the rest, which are then cached."""
        hit = np.zeros(len(keys), bool)
        hit_slots = []
        for i, key in enumerate(keys):
            slot = self.slots.get(key)
            if slot is not None:
                self.slots.move_to_end(key)
                hit[i] = True
                hit_slots.append(slot)
        out = torch.empty((len(keys), self.dim), dtype=torch.float32, device=self.device)
        if hit_slots:  # copied out before any row is reused below
            out[self._index(np.flatnonzero(hit))] = self.rows[self._index(hit_slots)]
        missing = np.flatnonzero(~hit)
        if missing.size:
            fresh = compute([keys[i] for i in missing.tolist()]).float()
            out[self._index(missing)] = fresh
            self._put([keys[i] for i in missing.tolist()], fresh)
        self.hits += len(hit_slots)
        self.misses += int(missing.size)
        return out, hit

    def _put(self, keys: list[Hashable], states: Tensor) -> None:
        """Cache the last `capacity` of `keys` (new ones), evicting the least recently used."""
        start = max(len(keys) - self.capacity, 0)
        slots = []
        for key in keys[start:]:
            if len(self.slots) < self.capacity:
                slot = len(self.slots)
            else:
                _, slot = self.slots.popitem(last=False)
            self.slots[key] = slot
            slots.append(slot)
        if slots:
            self.rows[self._index(slots)] = states[start:]

    def _index(self, positions: Sequence[int] | np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(positions, np.int64)).to(self.device, non_blocking=True)

    def stats(self) -> dict[str, int]:
        return {"size": len(self), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}


class StateCaches:
    """The item and user state caches of one checkpoint, valid for one store version at a time."""

    def __init__(self, item_capacity: int, user_capacity: int, dim: int, device: str | torch.device) -> None:
        self.items = StateCache(item_capacity, dim, device)
        self.users = StateCache(user_capacity, dim, device)
        self.store_version: int | None = None
        self.invalidations = 0  # times a new store version emptied both

    def for_store(self, version: int) -> None:
        """Empty both caches if they were filled under another store version."""
        if version != self.store_version:
            if self.store_version is not None:
                self.invalidations += 1
            self.items.clear()
            self.users.clear()
            self.store_version = version

    def stats(self) -> dict[str, Any]:
        return {"store_version": self.store_version, "invalidations": self.invalidations,
                "items": self.items.stats(), "users": self.users.stats()}
