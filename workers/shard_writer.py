"""Stream one file (a safetensors shard, or a legacy torch file) to storage, checksumming.

Runs on the node writer's I/O threads (``workers.job_runner``, ``workers.piece_stream``) and
in the trainer for synchronous saves. :class:`JobCancelled` is how a writer job stops when
its trainer went away (raised between chunks; no manifest, nothing reported).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from ckptsvc import knobs
from ckptsvc.errors import CheckpointError, InvalidStateError
from ckptsvc.format.checksum import Crc32c
from ckptsvc.format.manifest import FileRecord
from ckptsvc.format.safetensors_stream import ShardLayout
from ckptsvc.storage import Location

__all__ = ["PROGRESS", "ChecksummedWriter", "JobCancelled", "write_shard", "write_stream"]

logger = logging.getLogger(__name__)


class JobCancelled(CheckpointError):
    """The trainer that sent the job went away; the job stops without a manifest."""


#: pieces at least this big are checksummed on a helper thread while the sink writes them
_OVERLAP_CRC_BYTES = 2**20
_crc_pool: ThreadPoolExecutor | None = None
_crc_pool_lock = threading.Lock()


def _checksummer() -> ThreadPoolExecutor:
    """Threads that run CRC-32C beside the sinks' writes (``crc32c`` releases the GIL)."""
    global _crc_pool
    with _crc_pool_lock:
        if _crc_pool is None:
            _crc_pool = ThreadPoolExecutor(8, thread_name_prefix="ckptsvc-crc")
        return _crc_pool


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's threads: a pool inherited from it would
    take work and never run it. The child starts its own."""
    global _crc_pool, _crc_pool_lock
    _crc_pool, _crc_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


class Progress:
    """A count of work done in this process (a write handed to storage, a file made
    durable, a job finished); it only grows. The node writer reports it in ``Pong``: a
    trainer whose saves are in flight sees a writer that is slow but working."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def tick(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def value(self) -> int:
        with self._lock:
            return self._count


PROGRESS = Progress()


class ChecksummedWriter:
    """A write-only file object that streams to ``loc`` and computes CRC-32C on the way.

    1. ``write`` (any thread, one at a time) slices big buffers and forwards them; a big
       piece is checksummed on a helper thread while the sink writes it (both only read
       it, and both are done when ``write`` returns: the caller may reuse its memory);
    2. ``finish`` makes the file durable and returns its :class:`FileRecord`;
       or ``abort`` deletes the partial file / aborts the multipart upload.
    Usable as ``torch.save``'s target. ``stable_source``: every buffer given to ``write``
    stays valid and unchanged until ``finish`` / ``abort`` (the node writer's arena), so the
    sink may go on writing from it after ``write`` returned (``open_sink``).
    """

    def __init__(
        self,
        loc: Location,
        *,
        rel_path: str,
        size_hint_bytes: int | None = None,
        stable_source: bool = False,
    ) -> None:
        self._loc = loc
        self._rel_path = rel_path
        self._crc = Crc32c()
        s = loc.settings  # the job's settings in the node writer; else the knob
        self._step = s.write_chunk_bytes if s is not None else knobs.WRITE_CHUNK_BYTES.get()
        self.nbytes = 0
        # the expected size lets direct_io=auto pick O_DIRECT for big local files
        self._sink = loc.open_sink(size_hint_bytes=size_hint_bytes, stable_source=stable_source)

    def write(self, data: memoryview | bytes | bytearray) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, self._step):
            piece = view[start : start + self._step]
            if piece.nbytes < _OVERLAP_CRC_BYTES:
                self._crc.update(piece)
                self._sink.write(piece)
                PROGRESS.tick()
                continue
            checksummed = _checksummer().submit(self._crc.update, piece)
            try:
                self._sink.write(piece)
            finally:
                checksummed.result()
            PROGRESS.tick()
        self.nbytes += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        """Nothing to do: durability comes with :meth:`finish`."""

    def finish(self) -> FileRecord:
        self._sink.close()
        PROGRESS.tick()
        logger.debug(
            "wrote %s (%d bytes, crc32c %s)", self._loc.url, self.nbytes, self._crc.hexdigest()
        )
        return FileRecord(self._rel_path, self.nbytes, self._crc.hexdigest())

    def abort(self) -> None:
        self._sink.abort()


def write_stream(
    loc: Location,
    chunks: Iterable[memoryview | bytes],
    *,
    rel_path: str,
    expect_nbytes: int | None = None,
    stable_source: bool = False,
) -> FileRecord:
    """Write ``chunks`` in order to ``loc``; durable (fsync / upload completed) on return.

    On any failure the partial file or multipart upload is aborted and the error
    propagates. ``expect_nbytes`` guards against a layout/bytes mismatch;
    ``stable_source`` as for :class:`ChecksummedWriter`.
    """
    out = ChecksummedWriter(
        loc, rel_path=rel_path, size_hint_bytes=expect_nbytes, stable_source=stable_source
    )
    try:
        for chunk in chunks:
            out.write(chunk)
        if expect_nbytes is not None and out.nbytes != expect_nbytes:
            raise InvalidStateError(
                f"{loc.url}: streamed {out.nbytes} bytes but the layout needs {expect_nbytes}"
            )
        return out.finish()
    except BaseException:
        out.abort()
        raise


def write_shard(
    loc: Location,
    layout: ShardLayout,
    chunks: Iterable[memoryview | bytes],
    *,
    rel_path: str,
    stable_source: bool = False,
) -> FileRecord:
    """Write a safetensors shard: ``layout.header`` then ``chunks``, which must hold each
    entry's bytes in ``layout.entries`` order (one chunk per tensor, or any re-slicing of
    the contiguous data section). The total size is checked against the layout.
    ``stable_source`` as for :class:`ChecksummedWriter`."""

    def _all() -> Iterable[memoryview | bytes]:
        yield layout.header
        yield from chunks

    return write_stream(
        loc,
        _all(),
        rel_path=rel_path,
        expect_nbytes=layout.file_nbytes,
        stable_source=stable_source,
    )
