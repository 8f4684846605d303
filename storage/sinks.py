"""Streaming writers of one file (``ShardSink``): which one a location gets, and the simple ones.

- local files: :class:`LocalSink` (``os.write`` per chunk, or ``O_DIRECT`` through
  :class:`~.direct_io.DirectFile` where :func:`~.direct_io.want_direct` says so; fsync on
  close);
- S3: :class:`~.multipart.S3MultipartSink` (parallel multipart upload);
- GCS: :class:`~.resumable.GcsResumableSink` (pipelined resumable upload);
- anything else fsspec knows (memory://, custom filesystems): :class:`FsspecSink`.

Every sink follows the same contract (``ShardSink``, in ``storage.fs``): ``write`` chunks
in order, then ``close`` (durable or visible on return) or ``abort`` (nothing is left
behind; never raises).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fsspec.spec import AbstractBufferedFile

from ckptsvc import knobs

from .direct_io import DirectFile, DirectIORefused, direct_io_mode, want_direct
from .errors import storage_errors
from .fs import GCS_PROTOCOLS, S3_PROTOCOLS, ShardSink, write_all
from .multipart import S3MultipartSink, part_size_for
from .resumable import GcsResumableSink, gcs_resumable_supported
from .retry import call_with_retries

if TYPE_CHECKING:
    from .location import Location

__all__ = ["FsspecSink", "LocalSink", "open_sink"]

logger = logging.getLogger(__name__)

# Object stores whose unfinished uploads are invisible and cancelled by ``discard()``.
_DISCARDING_PROTOCOLS = S3_PROTOCOLS | GCS_PROTOCOLS


def open_sink(
    loc: Location,
    *,
    fsync: bool | None = None,
    part_size_bytes: int | None = None,
    parts_in_flight: int | None = None,
    direct_io: str | bool | None = None,
    size_hint_bytes: int | None = None,
    stable_source: bool = False,
) -> ShardSink:
    """The right streaming writer for ``loc`` (see the module docstring).

    Each setting is the explicit argument, else ``loc.settings``'s
    (:class:`~.io_settings.IOSettings`), else its ``CKPTSVC_*`` knob. ``size_hint_bytes``
    is the expected file size. Local files: it and ``direct_io`` (``"auto"`` | ``"on"`` |
    ``"off"``) choose ``O_DIRECT`` (see :mod:`ckptsvc.storage.direct_io`). S3: it sizes the
    parts so that the file alone keeps ``parts_in_flight`` parts uploading
    (:func:`~.multipart.part_size_for`; ``part_size_bytes`` is the largest part).
    ``stable_source``: the memory of every chunk given to ``write`` stays valid and
    unchanged until ``close`` / ``abort`` returns (the node writer's arena), so an
    ``O_DIRECT`` file may keep writing from it after ``write`` returned (no barrier per
    chunk), and an S3 upload sends parts as views of it instead of copying them into part
    buffers (GCS and the other sinks copy either way).
    """
    s = loc.settings
    if loc.is_local:
        return LocalSink(
            loc,
            fsync=knobs.FSYNC.get(s.fsync if fsync is None and s is not None else fsync),
            direct_io=direct_io_mode(
                s.direct_io if direct_io is None and s is not None else direct_io
            ),
            size_hint_bytes=size_hint_bytes,
            stable_source=stable_source,
        )
    if s is not None:
        part_size_bytes = s.part_size_bytes if part_size_bytes is None else part_size_bytes
        parts_in_flight = s.upload_parts_in_flight if parts_in_flight is None else parts_in_flight
    part = knobs.PART_SIZE_BYTES.get(part_size_bytes)
    in_flight = max(1, knobs.UPLOAD_PARTS_IN_FLIGHT.get(parts_in_flight))
    if loc.protocol in S3_PROTOCOLS and hasattr(loc.fs, "_call_s3"):
        part = part_size_for(size_hint_bytes, part_size_bytes=part, parts_in_flight=in_flight)
        return S3MultipartSink(
            loc, part_size_bytes=part, parts_in_flight=in_flight, stable_source=stable_source
        )
    if loc.protocol in GCS_PROTOCOLS and gcs_resumable_supported(loc):
        return GcsResumableSink(loc, part_size_bytes=part)
    return FsspecSink(loc, part_size_bytes=part)


class LocalSink:
    """Local file: ``os.write`` per chunk (or ``O_DIRECT`` via a bounce buffer), fsync on
    ``close``; ``abort`` unlinks the file.

    ``direct_io`` is a mode of :func:`~.direct_io.want_direct`; a filesystem that refuses
    ``O_DIRECT`` gets the buffered path (``direct`` tells which one the file took).
    """

    def __init__(
        self,
        loc: Location,
        *,
        fsync: bool,
        direct_io: str = "off",
        size_hint_bytes: int | None = None,
        stable_source: bool = False,
    ) -> None:
        self._loc = loc
        self._fsync = fsync
        self._closed_ok = False
        self._fd: int | None = None
        self._direct: DirectFile | None = None
        directory = os.path.dirname(loc.path)
        with storage_errors(loc.url, "create"):
            os.makedirs(directory, exist_ok=True)
            # A new inode, never a truncated old one: the old file may be a hard link that
            # an incremental save shares with another checkpoint (or a symlink out).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(loc.path)
            mode = direct_io_mode(direct_io)
            s = loc.settings
            min_bytes = s.direct_io_min_bytes if s is not None else None
            if want_direct(
                directory, mode=mode, size_hint_bytes=size_hint_bytes, min_bytes=min_bytes
            ):
                with contextlib.suppress(DirectIORefused):
                    self._direct = DirectFile(
                        loc.path,
                        chunk_nbytes=knobs.DIRECT_IO_BUFFER_BYTES.get(
                            s.direct_io_buffer_bytes if s is not None else None
                        ),
                        size_hint_bytes=size_hint_bytes,
                        fsync=fsync,
                        stable_source=stable_source,
                        huge_slots=s is not None and s.huge_bounce_slots,
                    )
            if self._direct is None:
                self._fd = os.open(loc.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    @property
    def direct(self) -> bool:
        """Whether this file is written with ``O_DIRECT``."""
        return self._direct is not None

    def write(self, data: memoryview | bytes) -> None:
        if self._direct is not None:
            if self._direct.closed:
                raise ValueError(f"{self._loc.url}: write after close or abort")
            with storage_errors(self._loc.url, "write"):
                self._direct.write(data)
            return
        if self._fd is None:
            raise ValueError(f"{self._loc.url}: write after close or abort")
        with storage_errors(self._loc.url, "write"):
            write_all(self._fd, memoryview(data))

    def close(self) -> None:
        if self._direct is not None:
            if not self._closed_ok:
                with storage_errors(self._loc.url, "fsync"):
                    self._direct.close()
                self._closed_ok = True
            return
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with storage_errors(self._loc.url, "fsync"):
            try:
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        self._closed_ok = True

    def abort(self) -> None:
        """Discard the partial file; a no-op after a successful ``close``."""
        if self._closed_ok:
            return
        if self._direct is not None:
            self._direct.abort()
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._loc.path)


class FsspecSink:
    """Any other fsspec filesystem: its buffered file uploads ``part_size_bytes`` blocks and
    completes on ``close``; ``abort`` discards (object stores) or deletes the file.

    Filesystems such as memory:// may show the file while it is written.
    """

    def __init__(self, loc: Location, *, part_size_bytes: int) -> None:
        self._loc = loc
        self._state = "open"  # -> "closed" | "aborted"
        with storage_errors(loc.url, "create"):
            self._f: Any = loc.fs.open(loc.path, "wb", block_size=part_size_bytes)

    def write(self, data: memoryview | bytes) -> None:
        if self._state != "open":
            raise ValueError(f"{self._loc.url}: write after close or abort")
        with storage_errors(self._loc.url, "write"):
            self._f.write(data)

    def close(self) -> None:
        if self._state != "open":
            return
        with storage_errors(self._loc.url, "upload"):
            self._f.close()
        self._state = "closed"
        self._loc.fs.invalidate_cache(self._loc.path)

    def abort(self) -> None:
        """Cancel the upload (never raises: callers abort while handling another error)."""
        if self._state != "open":
            return
        self._state = "aborted"
        f, loc = self._f, self._loc
        try:
            if loc.protocol in _DISCARDING_PROTOCOLS:
                policy = replace(loc.retry_policy(), attempts=3)
                call_with_retries(f.discard, url=loc.url, action="abort upload of", policy=policy)
            else:
                f.close()
                loc.fs.rm_file(loc.path)
        except Exception as e:  # report, but let the caller's original error propagate
            logger.warning("could not abort the upload of %s: %s", loc.url, e)
        finally:
            if isinstance(f, AbstractBufferedFile):
                f.closed = True  # else close()/__del__ would still upload the buffer
            loc.fs.invalidate_cache(loc.path)
