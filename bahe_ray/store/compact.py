"""Compaction's plan and its merged parts: many small committed parts (a year of daily updates,
retried batches) become few, holding the same rows bit for bit.

`EmbeddingStore.compact` publishes the result as a new version; this module only decides which
parts merge and writes the merged part files (uncommitted, like any `PartWriter` output).
"""

from __future__ import annotations

from collections.abc import Sequence

import fsspec
import pyarrow as pa

from bahe_ray.store.manifest import PartInfo
from bahe_ray.store.parts import PartWriter, load_part, parallel


def plan_compaction(parts: Sequence[PartInfo], target_part_rows: int) -> list[list[PartInfo]]:
    """Groups of parts to merge, each of at most `target_part_rows` rows (or one part more than it
    would hold), in manifest order. Parts of `target_part_rows` or more stay as they are, and so
    does a small part left alone in its group."""
    if target_part_rows < 1:
        raise ValueError(f"target_part_rows must be >= 1, got {target_part_rows}")
    groups: list[list[PartInfo]] = []
    current: list[PartInfo] = []
    rows = 0
    for part in parts:
        if part.rows >= target_part_rows:
            continue
        if current and rows + part.rows > target_part_rows:
            groups.append(current)
            current, rows = [], 0
        current.append(part)
        rows += part.rows
    groups.append(current)
    return [group for group in groups if len(group) > 1]


def merge_parts(
    fs: fsspec.AbstractFileSystem, root: str, writer: PartWriter, group: Sequence[PartInfo], dim: int, dtype: str
) -> PartInfo:
    """Write one part holding every row of `group` (each read back checked against its sha256)."""
    tables = parallel(lambda p: load_part(fs, root, p, dim, dtype), group)
    merged = pa.concat_tables([t.replace_schema_metadata(None) for t in tables]).combine_chunks()
    return writer.write_table(merged)
