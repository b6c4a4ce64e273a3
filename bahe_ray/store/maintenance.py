"""The store's upkeep beside its reads and writes: `verify` (every committed part checked against
its manifest entry) and `gc` (files no current version needs). `EmbeddingStore.verify` and
`EmbeddingStore.gc` call these with the store's head manifest.
"""

from __future__ import annotations

import time

import fsspec
import numpy as np

from bahe_ray.fs import join
from bahe_ray.store.manifest import MANIFEST_NAME, MANIFESTS_DIR, PARTS_DIR, Manifest, PartInfo, StoreCorruptError
from bahe_ray.store.parts import list_folder, load_part, modified_time, parallel, part_vectors


def verify_problems(fs: fsspec.AbstractFileSystem, root: str, m: Manifest, dim: int, dtype: str) -> list[str]:
    """What is wrong with `m`'s parts: missing, size or sha256 not as recorded, unreadable, row counts or id
    ranges not as recorded, ids repeated within or across parts, non-finite vectors (empty: all good)."""
    problems: list[str] = []
    if m.total_atoms != sum(p.rows for p in m.parts):
        problems.append(f"manifest v{m.version}: total_atoms {m.total_atoms} != sum of part rows")

    def check(part: PartInfo) -> tuple[list[str], np.ndarray]:
        try:
            table = load_part(fs, root, part, dim, dtype)
        except StoreCorruptError as e:
            return [str(e)], np.empty(0, np.int64)
        where = join(root, PARTS_DIR, part.name)
        found = []
        ids = table.column("atom_id").to_numpy()
        if int(ids.min()) != part.min_id or int(ids.max()) != part.max_id:
            found.append(f"{where}: id range differs from the manifest")
        if np.unique(ids).size != ids.size:
            found.append(f"{where}: repeated ids within the part")
        if not np.isfinite(part_vectors(table, dim)).all():
            found.append(f"{where}: non-finite vector values")
        return found, ids

    results = parallel(check, m.parts)
    for found, _ in results:
        problems += found
    all_ids = np.concatenate([ids for _, ids in results]) if results else np.empty(0, np.int64)
    owner = np.repeat(np.arange(len(results)), [ids.size for _, ids in results])
    order = np.argsort(all_ids, kind="stable")
    sorted_ids = all_ids[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size:
        names = sorted({m.parts[owner[order[i]]].name for i in np.concatenate([dup, dup + 1])[:20]})
        problems.append(f"{dup.size} ids stored in more than one part, e.g. {sorted_ids[dup[:5]].tolist()} in {names}")
    return problems


def collect_garbage(fs: fsspec.AbstractFileSystem, root: str, head: Manifest, min_age_s: float) -> list[str]:
    """Delete the files no current version references (see `EmbeddingStore.gc`); returns their paths."""
    referenced = {p.name for p in head.parts} | _recently_replaced_parts(fs, root, min_age_s)
    now = time.time()
    removed = []
    for folder, keep in (
        (PARTS_DIR, lambda name: name in referenced),
        (MANIFESTS_DIR, lambda name: MANIFEST_NAME.fullmatch(name) is not None),
        ("", lambda name: ".tmp-" not in name),
    ):
        for entry in list_folder(fs, join(root, folder) if folder else root):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] != "file" or keep(name) or now - modified_time(entry) < min_age_s:
                continue
            fs.rm_file(entry["name"])
            removed.append(entry["name"])
    return removed


def _recently_replaced_parts(fs: fsspec.AbstractFileSystem, root: str, min_age_s: float) -> set[str]:
    """Parts of versions superseded less than `min_age_s` ago: a reader may still open them."""
    if min_age_s <= 0:
        return set()
    folder = join(root, MANIFESTS_DIR)
    entries = {
        int(match.group(1)): entry
        for entry in list_folder(fs, folder)
        if (match := MANIFEST_NAME.fullmatch(entry["name"].rsplit("/", 1)[-1]))
    }
    names: set[str] = set()
    for version, entry in entries.items():
        successor = entries.get(version + 1)
        if successor is not None and time.time() - modified_time(successor) < min_age_s:
            names |= {p.name for p in Manifest.from_json(fs.cat_file(entry["name"]), entry["name"]).parts}
    return names
