"""The offline embedding store: atom id (int64) -> one shallow-encoder vector of `dim` floats.

Layout under the store path (a local folder or an s3:// URI, reached through `bahe_ray.fs`):

  STORE.json                  written once, at creation: format version, encoder fingerprint
                              (EncoderFingerprint JSON) and its id, dim, vector dtype
                              (float32 | float16).
  parts/part-<uuid>.parquet   immutable data files with columns atom_id int64, text string
                              (the normalised atom text, for audit and re-encoding; may be
                              null), vector fixed_size_list<dtype>[dim].
  manifests/v<8 digits>.json  one per committed version: version, parent version, fingerprint
                              id, the committed parts (name, rows, bytes, sha256, min_id,
                              max_id), total atoms. The highest version is the committed
                              state; no manifest means version 0, the empty store.

Why this shape. Parts are written in parallel by many workers (Ray tasks or actors, through
the picklable `PartWriter`) and never change. A commit publishes them all at once by creating
one new manifest key that must not exist yet (local: hard link of a synced temporary file;
S3: conditional PUT), so readers see the old table or the new one, never half, and two writers
can never both publish version n: the loser re-reads the newer state and deduplicates against
it. A manifest lists every part of its parent plus the new ones (except after `compact`, whose
version swaps many small parts for few merged ones holding the same rows; gc keeps the old parts
for `min_age_s`, so readers of the old version keep finding them). Commit drops ids that are
already committed or repeated within the commit, so retried batches and reruns store every atom
exactly once. A
killed writer leaves at most orphan part files (or temporary files), invisible to readers;
`gc()` deletes them.

Readers look vectors up in a node-shared, memory-mapped layout of the committed version, built
once per node from the parts (`node_cache`).

Modules: `manifest` (formats, records, errors), `parts` (part files and I/O primitives),
`node_cache` (the node-shared lookup layout), `compact` (merging small parts), `store`
(`EmbeddingStore`).
"""

from bahe_ray.encoders.base import FingerprintMismatchError
from bahe_ray.store.manifest import (
    FORMAT_VERSION,
    CommitConflictError,
    CommitResult,
    CompactResult,
    Manifest,
    PartInfo,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    StoreSummary,
    VectorDtype,
    VerifyReport,
)
from bahe_ray.store.parts import PartWriter
from bahe_ray.store.store import EmbeddingStore

__all__ = [
    "FORMAT_VERSION",
    "CommitConflictError",
    "CommitResult",
    "CompactResult",
    "EmbeddingStore",
    "FingerprintMismatchError",
    "Manifest",
    "PartInfo",
    "PartWriter",
    "StoreCorruptError",
    "StoreError",
    "StoreMismatchError",
    "StoreSummary",
    "VectorDtype",
    "VerifyReport",
]
