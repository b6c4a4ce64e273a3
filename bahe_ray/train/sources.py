"""Where an epoch's sample rows come from: an in-memory table, a Ray Train dataset shard, or one rank's
share of either; and the input side of the loop: batches built ahead in a thread, and the time the
loop waited for them."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa

T = TypeVar("T")


class BatchSource(Protocol):
    """Batches of sample rows (pyarrow tables, columns of `bahe_ray.samples`) for one epoch."""

    def batches(self, epoch: int) -> Iterable[pa.Table]: ...


@dataclass
class TableSource:
    """In-memory sample rows in batches, in table order or shuffled with `seed + epoch`."""

    table: pa.Table
    batch_size: int
    seed: int | None = None

    def __post_init__(self) -> None:
        # A table read from many files has many chunks; a take over them costs ~20x more per batch.
        self.table = self.table.combine_chunks()

    def batches(self, epoch: int) -> Iterator[pa.Table]:
        n = self.table.num_rows
        order = None if self.seed is None else np.random.default_rng(self.seed + epoch).permutation(n)
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self.table.slice(start, self.batch_size)
            else:
                yield self.table.take(pa.array(order[start : start + self.batch_size]))


@dataclass
class ShardSource:
    """A Ray Train dataset shard, locally shuffled per epoch when `shuffle_buffer` is set."""

    shard: Any  # ray.data.DataIterator
    batch_size: int
    seed: int | None = None
    shuffle_buffer: int | None = None

    def batches(self, epoch: int) -> Iterable[pa.Table]:
        return self.shard.iter_batches(
            batch_size=self.batch_size,
            batch_format="pyarrow",
            local_shuffle_buffer_size=self.shuffle_buffer,
            local_shuffle_seed=None if self.seed is None else self.seed + epoch,
        )


@dataclass
class RankRows:
    """The rows of `source` that belong to one rank, chosen by a row key so any read order splits them the same."""

    source: BatchSource
    rank: int
    world_size: int

    def batches(self, epoch: int) -> Iterator[pa.Table]:
        for table in self.source.batches(epoch):
            key = table.column("item_atom_id").to_numpy() ^ table.column("ts").to_numpy()
            mine = table.filter(pa.array(key % self.world_size == self.rank))
            if mine.num_rows:
                yield mine


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """`items`, produced by a background thread up to `depth` ahead (depth 0: inline).

    Batch assembly (row takes, id padding, vector lookups, host-to-device copies) then overlaps
    the training step, as Ray Data's `prefetch_batches` does for its batches. The producer's
    errors are raised here; closing the iterator stops the producer.
    """
    if depth == 0:
        yield from items
        return
    ready: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ready.put((True, item))
            ready.put((False, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            ready.put((False, error))

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            more, item = ready.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with suppress(queue.Empty):
                ready.get(timeout=0.05)
        thread.join()


class Stopwatch:
    """Wall time spent inside `next()` of the iterables it wraps: how long a loop waited for its input."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        iterator = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            yield item
