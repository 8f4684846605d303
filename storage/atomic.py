"""Atomic writes of a whole small file: :func:`publish` (replace) and
:func:`create_exclusive` (create only if absent), for ``Location.publish`` and
``Location.create_exclusive``, which run the hook points around them.

- Local: a temp file in the same directory, fsync, ``os.replace``, fsync of the directory
  (publish); ``O_CREAT | O_EXCL``, fsync, directory fsync (create).
- S3 and GCS: one PUT, visible atomically (publish); a conditional PUT
  (``If-None-Match: *`` / ``ifGenerationMatch=0``), so of two writers exactly one wins
  (create).
- Other filesystems: one ``pipe_file`` (publish); an existence check, then a write
  (create: two writers racing within one round trip could both win; logged once).

Runs in whichever process writes: the trainer (markers, synchronous saves, retention) or
the node writer (index, manifest).
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import TYPE_CHECKING

from ckptsvc import hooks
from ckptsvc.errors import StorageError

from .errors import storage_errors
from .fs import GCS_PROTOCOLS, S3_PROTOCOLS, fsync_dir, write_all
from .retry import call_with_retries

if TYPE_CHECKING:
    from .location import Location

__all__ = ["create_exclusive", "precondition_failed", "publish"]

logger = logging.getLogger(__name__)

_warned_unconditional = False


def publish(loc: Location, data: bytes) -> None:
    """``Location.publish`` without its hook points: temp file, fsync, ``os.replace``,
    directory fsync (local); one PUT (object stores)."""
    if loc.is_local:
        directory = os.path.dirname(loc.path)
        tmp = os.path.join(directory, f".{loc.name}.{uuid.uuid4().hex[:12]}.tmp")
        with storage_errors(loc.url, "publish"):
            os.makedirs(directory, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                write_all(fd, memoryview(data))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                hooks.point("rename.before", path=loc.path)
                os.replace(tmp, loc.path)
            except BaseException:
                os.unlink(tmp)
                raise
            fsync_dir(directory)
        return
    call_with_retries(
        lambda: loc.fs.pipe_file(loc.path, data),
        url=loc.url,
        policy=loc.retry_policy(),
        action="publish",
    )


def create_exclusive(loc: Location, data: bytes) -> bool:
    """``Location.create_exclusive`` without its hook points: ``O_CREAT | O_EXCL`` (local);
    a conditional PUT (S3, GCS); else check, then write (logged once: not atomic)."""
    if loc.is_local:
        directory = os.path.dirname(loc.path)
        with storage_errors(loc.url, "create"):
            os.makedirs(directory, exist_ok=True)
            try:
                fd = os.open(loc.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                write_all(fd, memoryview(data))
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(directory)
        return True
    if loc.protocol in S3_PROTOCOLS or loc.protocol in GCS_PROTOCOLS:
        try:
            call_with_retries(
                lambda: loc.fs.pipe_file(loc.path, data, mode="create"),
                url=loc.url,
                policy=loc.retry_policy(),
                action="create",
            )
        except FileExistsError:  # 412 Precondition Failed, as fsspec maps it
            return False
        except StorageError as e:
            if precondition_failed(e):
                return False
            raise
        return True
    global _warned_unconditional
    if not _warned_unconditional:
        _warned_unconditional = True
        logger.warning(
            "%s: this filesystem has no conditional write; claims of a checkpoint "
            "directory are checked, then written (not atomic)",
            loc.url,
        )
    if loc.exists():
        return False
    loc.publish(data)  # through the Location: its hook points run
    return True


def precondition_failed(error: BaseException) -> bool:
    """True if ``error`` (or a cause) is an HTTP 412 / PreconditionFailed answer."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, FileExistsError):
            return True
        text = f"{type(seen).__name__} {seen}"
        if "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
