"""One verified copy of a checkpoint's files: every file streamed from its source to its
destination in chunks on ``jobs`` copy threads, largest first, its size and CRC-32C checked
against the manifest's record *before* the destination file is completed (an object
store's upload is aborted instead), and on GCS the store's own CRC-32C of the new object
compared as well. The first failure stops the other threads (their partial uploads are
aborted) and is raised.

:mod:`ckptsvc.ops.transfer` (``ckptsvc cp``, :func:`~ckptsvc.ops.transfer.copy_files`)
builds on :func:`copy_records`; it writes no marker or manifest (the commit protocol is
the caller's).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ckptsvc import knobs
from ckptsvc.errors import CorruptCheckpointError
from ckptsvc.format.checksum import Crc32c
from ckptsvc.format.manifest import FileRecord
from ckptsvc.storage import Location

__all__ = ["CopyProgress", "ProgressFn", "copy_records"]

#: ``progress(bytes_done, bytes_total)``; called from copy threads, one call at a time
ProgressFn = Callable[[int, int], None]


class CopyProgress:
    """Thread-safe byte counter that reports to the caller's callback, one call at a time."""

    def __init__(self, total_nbytes: int, callback: ProgressFn | None) -> None:
        self.total_nbytes = total_nbytes
        self.done_nbytes = 0
        self._callback = callback
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done_nbytes += nbytes
            if self._callback is not None:
                self._callback(self.done_nbytes, self.total_nbytes)


class _Cancelled(Exception):
    """Another file of the same copy failed: stop streaming this one."""


def _copy_file(
    src: Location,
    dst: Location,
    rec: FileRecord,
    *,
    progress: CopyProgress,
    stop: threading.Event,
) -> None:
    """Stream ``src`` to ``dst`` in chunks, checking size and CRC-32C against ``rec`` before
    the destination file is completed (copy thread)."""
    chunk_nbytes = knobs.WRITE_CHUNK_BYTES.get()
    crc = Crc32c()
    sink = dst.open_sink()
    sent = 0
    try:
        while sent < rec.nbytes:
            if stop.is_set():
                raise _Cancelled
            data = src.read_range(sent, min(rec.nbytes, sent + chunk_nbytes))
            if not data:
                break
            crc.update(data)
            sink.write(data)
            sent += len(data)
            progress.add(len(data))
        if sent != rec.nbytes:  # the committed bytes are copied; a longer source is not read
            raise CorruptCheckpointError(
                f"{src.url} has {sent} bytes but the manifest says {rec.nbytes}; the source "
                "checkpoint is damaged (run `ckptsvc verify` on it)"
            )
        if crc.hexdigest() != rec.crc32c:
            raise CorruptCheckpointError(
                f"{src.url}: CRC-32C of the bytes read is {crc.hexdigest()} but the manifest says "
                f"{rec.crc32c}; the source checkpoint is damaged (run `ckptsvc verify` on it)"
            )
        sink.close()
    except BaseException:
        sink.abort()
        raise
    stored = dst.stored_crc32c()
    if stored is not None and stored != rec.crc32c:
        raise CorruptCheckpointError(
            f"{dst.url}: the store reports CRC-32C {stored} for the uploaded object but "
            f"{rec.crc32c} was sent; copy again"
        )


def copy_records(
    src_dir: Location,
    dst_dir: Location,
    records: Sequence[FileRecord],
    *,
    jobs: int,
    progress: CopyProgress,
) -> None:
    """Copy every record's file on ``jobs`` threads, largest first; the first error stops
    the others (their partial uploads are aborted) and is raised."""
    stop = threading.Event()

    def one(rec: FileRecord) -> None:
        try:
            _copy_file(
                src_dir.join(rec.path), dst_dir.join(rec.path), rec, progress=progress, stop=stop
            )
        except BaseException:
            stop.set()
            raise

    ordered = sorted(records, key=lambda r: (-r.nbytes, r.path))
    with ThreadPoolExecutor(max(1, min(jobs, len(ordered) or 1)), "ckptsvc-cp") as pool:
        futures = [pool.submit(one, rec) for rec in ordered]
    errors = [e for f in futures if (e := f.exception()) is not None]
    real = [e for e in errors if not isinstance(e, _Cancelled)]
    if real:
        raise real[0]
