"""What every storage module shares: resolving a URL, the protocol names, a directory
listing's entries, the streaming-sink contract and small local-file helpers.

The lowest module of ``ckptsvc.storage``: it imports none of the others but ``errors``,
so the helpers ``Location`` uses (``sinks``, ``multipart``, ``resumable``, ``reads``,
``copies``, ``deletes``, ``atomic``) take what they need from here, and ``location``
imports them all at its top.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from ckptsvc.errors import ConfigError

from .errors import storage_errors

__all__ = [
    "GCS_PROTOCOLS",
    "S3_PROTOCOLS",
    "ChildInfo",
    "ShardSink",
    "fsync_dir",
    "is_local_fs",
    "listing_time",
    "url_to_fs",
    "write_all",
]

S3_PROTOCOLS = frozenset({"s3", "s3a"})
GCS_PROTOCOLS = frozenset({"gs", "gcs"})


# ---- filesystems ----------------------------------------------------------------------


def _with_retry_defaults(text: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """ckptsvc retries S3 requests itself (``call_with_retries``: per request, bounded by
    count and time). Unless the caller configured botocore's retries, turn them off so
    that the bounds hold instead of multiplying; s3fs keeps its short retries of dropped
    connections and SlowDown."""
    if fsspec.core.split_protocol(text)[0] not in S3_PROTOCOLS:
        return storage_options
    config = dict(storage_options.get("config_kwargs") or {})
    if "retries" in config:
        return storage_options
    config["retries"] = {"total_max_attempts": 1}
    return {**storage_options, "config_kwargs": config}


def url_to_fs(
    url: str | os.PathLike[str], **storage_options: Any
) -> tuple[AbstractFileSystem, str]:
    """Resolve a local path or URL (``file://``, ``memory://``, ``s3://``, ``gs://``, ...)."""
    text = os.fspath(url)
    if not text:
        raise ConfigError("empty path or URL")
    with storage_errors(text, "open filesystem for"):
        fs, path = fsspec.core.url_to_fs(text, **_with_retry_defaults(text, storage_options))
    return fs, path


def is_local_fs(fs: AbstractFileSystem) -> bool:
    """``fs`` is the local filesystem (raw ``os`` calls, fsync, ``os.replace`` apply)."""
    return isinstance(fs, LocalFileSystem)


# ---- listings and sinks ----------------------------------------------------------


@dataclass(frozen=True)
class ChildInfo:
    """One entry of a directory listing."""

    name: str
    is_dir: bool
    nbytes: int
    mtime: float | None


def listing_time(value: object) -> float | None:
    """Seconds since the epoch from a listing's datetime, ISO string or number."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


class ShardSink(Protocol):
    """A streaming write of one file: ``write`` chunks, then ``close`` (durable) or ``abort``."""

    def write(self, data: memoryview | bytes) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


# ---- local files ----------------------------------------------------------------------


def write_all(fd: int, data: memoryview) -> None:
    """``os.write`` until every byte of ``data`` is written."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(directory: str) -> None:
    """fsync a local directory so that renames and creations in it are durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
