"""Local folders and `s3://` URIs behind one fsspec interface.

Every stage reads and writes through `filesystem(path, storage)`, so a profile switches a
store, a sample table or a checkpoint folder from a local path to S3 by changing its path.
"""

from __future__ import annotations

import os
import uuid

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from bahe_ray.config import StorageConfig


def is_remote(path: str) -> bool:
    """True for URIs with a scheme other than file://."""
    return "://" in path and not path.startswith("file://")


def filesystem(path: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `path` and the path as that filesystem names it."""
    storage = storage or StorageConfig()
    if path.startswith("s3://"):
        import s3fs

        client_kwargs = {"endpoint_url": storage.endpoint_url} if storage.endpoint_url else {}
        if storage.region:
            os.environ.setdefault("AWS_DEFAULT_REGION", storage.region)
        fs = s3fs.S3FileSystem(anon=storage.anon, client_kwargs=client_kwargs, skip_instance_cache=True)
        return fs, path[len("s3://") :].rstrip("/")
    if path.startswith("file://"):
        path = path[len("file://") :]
    return fsspec.filesystem("file"), os.path.abspath(path)


def arrow_filesystem(path: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem (for Ray Data and pyarrow.parquet) and the path within it."""
    fs, inner = filesystem(path, storage)
    if path.startswith("s3://"):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner
    return pafs.LocalFileSystem(), inner


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', keeping a URI scheme intact."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole file so readers see the old content or the new, never a part.

    Local: write a temporary sibling, fsync, then rename over the target (atomic on POSIX).
    S3: a single PUT is atomic per object.
    """
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)
