"""The writer's side of a streamed save: shards written from a ring arena, piece by piece.

A save larger than the trainer's memory budget (``ckptsvc.stage.piecewise``) is staged through a
ring arena of two slots. The layout is the one a full arena would have (``FileJob.
arena_offset`` are offsets in it); the trainer copies window ``seq`` of it into a slot and
sends ``PieceReady``. Call order (process / thread that runs each step):

1. ``PieceInbox.put`` (the connection's thread): a ``PieceReady`` frame for the job;
   ``abort`` on ``CancelJob``.
2. :func:`write_streamed` (the job thread): every shard in layout order, sequentially;
   a :class:`_Cursor` walks the layout, takes pieces in order from the inbox, and hands
   zero-copy slices of the ring to ``write_shard`` (CRC-32C while streaming, durable on
   return). A piece is acknowledged (``ack(seq)`` -> ``PieceDone``) as soon as its last
   byte was handed to the sink (a local ``os.write`` returned; S3/GCS sinks copy into
   their part buffers), so the trainer refills the slot while the file is still open.
3. After the last shard, the remaining pieces (padding, or files other ranks write) are
   taken and acknowledged, so the trainer never waits on a piece nobody reads.

Failures: a storage error propagates (the job reports ``JobFailed``); ``CancelJob`` raises
:class:`StreamAborted` (reported too); the trainer's EOF sets ``cancelled`` and raises
``JobCancelled`` (not reported: nobody listens).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

from ckptsvc.errors import CheckpointError, SaveFailedError
from ckptsvc.format.manifest import FileRecord
from ckptsvc.storage import Location

from .protocol import CancelJob, FileJob, PieceReady, StreamSpec
from .shard_writer import JobCancelled, write_shard

__all__ = ["PieceInbox", "StreamAborted", "write_streamed"]

_POLL_S = 0.2  # how often a waiting job thread looks at the connection's cancel flag


class StreamAborted(CheckpointError):
    """The trainer gave up a streamed save (it failed while staging); no manifest."""


def _cancelled(what: str) -> CheckpointError:
    return JobCancelled(f"{what}: save cancelled")


class PieceInbox:
    """Pieces of one streamed job, from the connection thread to the job thread."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self._cond = threading.Condition()
        self._pieces: dict[int, PieceReady] = {}
        self._aborted: str | None = None

    def put(self, message: PieceReady | CancelJob) -> None:
        """Connection thread: a piece arrived, or the trainer cancelled the job."""
        with self._cond:
            if isinstance(message, CancelJob):
                self._aborted = message.reason or "cancelled by the trainer"
            else:
                self._pieces[message.seq] = message
            self._cond.notify_all()

    def take(self, seq: int, cancelled: threading.Event, *, what: str) -> PieceReady:
        """Job thread: wait for piece ``seq``; raise if the job was cancelled or aborted."""
        with self._cond:
            while True:
                if self._aborted is not None:
                    raise StreamAborted(f"{what}: the trainer cancelled the save: {self._aborted}")
                if cancelled.is_set():
                    raise _cancelled(what)
                piece = self._pieces.pop(seq, None)
                if piece is not None:
                    return piece
                self._cond.wait(_POLL_S)


class _Cursor:
    """Walks the layout byte stream forward, piece by piece (job thread)."""

    def __init__(
        self,
        *,
        spec: StreamSpec,
        ring: memoryview,
        inbox: PieceInbox,
        cancelled: threading.Event,
        ack: Callable[[int], None],
        what: str,
        chunk_nbytes: int,
    ) -> None:
        self._spec = spec
        self._ring = ring
        self._inbox = inbox
        self._cancelled = cancelled
        self._ack = ack
        self._what = what
        self._piece: PieceReady | None = None
        self._next_seq = 0
        self._chunk_nbytes = chunk_nbytes

    def _take(self) -> PieceReady:
        seq = self._next_seq
        if seq >= self._spec.npieces:
            raise SaveFailedError(f"{self._what}: the layout reads past its last piece ({seq})")
        piece = self._inbox.take(seq, self._cancelled, what=self._what)
        expected = seq * self._spec.piece_nbytes
        if (
            piece.offset != expected
            or piece.nbytes != min(self._spec.piece_nbytes, self._spec.nbytes - expected)
            or piece.arena_offset < 0
            or piece.arena_offset + piece.nbytes > self._ring.nbytes
        ):
            raise SaveFailedError(
                f"{self._what}: piece {seq} ({piece.offset}+{piece.nbytes} at ring offset "
                f"{piece.arena_offset}) does not fit the stream or the {self._ring.nbytes}-byte ring"
            )
        self._next_seq += 1
        return piece

    def _done_with_piece(self) -> None:
        if self._piece is not None:
            self._ack(self._piece.seq)
            self._piece = None

    def read(self, begin: int, end: int, *, next_begin: int) -> Iterator[memoryview]:
        """Slices of the ring holding layout bytes ``[begin, end)`` (``begin`` never before
        an earlier ``end``); a piece is acknowledged once its last byte was consumed, or
        once the rest of it lies before ``next_begin`` (padding, bytes nobody reads here)."""
        pos = begin
        while pos < end:
            while self._piece is None or pos >= self._piece.offset + self._piece.nbytes:
                self._done_with_piece()  # passed over (padding, bytes others write)
                self._piece = self._take()
            piece = self._piece
            if pos < piece.offset:
                raise SaveFailedError(f"{self._what}: layout offset {pos} read out of order")
            stop = min(end, piece.offset + piece.nbytes)
            for lo in range(pos, stop, self._chunk_nbytes):
                if self._cancelled.is_set():
                    raise _cancelled(self._what)
                hi = min(stop, lo + self._chunk_nbytes)
                at = piece.arena_offset + lo - piece.offset
                yield self._ring[at : at + hi - lo]
            pos = stop
            if pos == piece.offset + piece.nbytes:
                self._done_with_piece()  # resumed after the sink took the last slice
        if self._piece is not None and self._piece.offset + self._piece.nbytes <= next_begin:
            self._done_with_piece()  # before the file is closed (fsync, upload completion)

    def finish(self) -> None:
        """Take and acknowledge every piece not read yet (the trainer sends them all)."""
        self._done_with_piece()
        while self._next_seq < self._spec.npieces:
            self._ack(self._take().seq)


def write_streamed(
    ckpt: Location,
    files: Sequence[FileJob],
    *,
    spec: StreamSpec,
    ring: memoryview,
    inbox: PieceInbox,
    cancelled: threading.Event,
    ack: Callable[[int], None],
    chunk_nbytes: int,
) -> list[FileRecord]:
    """Write ``files`` (in layout order) from the pieces of a streamed job, handing
    storage slices of at most ``chunk_nbytes``; every file is durable on return.
    ``ack(seq)`` is called when piece ``seq``'s slot may be refilled."""
    cursor = _Cursor(
        spec=spec,
        ring=ring,
        inbox=inbox,
        cancelled=cancelled,
        ack=ack,
        what=ckpt.url,
        chunk_nbytes=chunk_nbytes,
    )
    records = []
    ordered = sorted(files, key=lambda f: f.arena_offset)
    for i, fj in enumerate(ordered):
        end = fj.arena_offset + fj.layout.data_nbytes
        next_begin = ordered[i + 1].arena_offset if i + 1 < len(ordered) else spec.nbytes
        if end > spec.nbytes:
            raise SaveFailedError(
                f"{ckpt.join(fj.rel_path).url}: data ends at {end}, past the streamed "
                f"{spec.nbytes} bytes"
            )
        chunks = cursor.read(fj.arena_offset, end, next_begin=next_begin)
        records.append(write_shard(ckpt.join(fj.rel_path), fj.layout, chunks, rel_path=fj.rel_path))
    cursor.finish()
    return records
