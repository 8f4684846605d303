"""Cutting a stream of chunks into upload parts, shared by the object-store sinks.

S3 multipart (:mod:`.multipart`) and GCS resumable (:mod:`.resumable`) uploads both hand
fixed-size parts to their upload machinery. :class:`PartFiller` copies the caller's
chunks into part buffers (one memcpy: the caller may reuse its memory as soon as
``write`` returns). :class:`PartGatherer` copies nothing: a part is the list of views of
the caller's chunks that make it up, for a caller whose memory stays valid and unchanged
until the upload ends (``stable_source``: the node writer's arena, a synchronous save's
tensors). :class:`PartBody` is a part, either kind, as the seekable file botocore sends.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["PartBody", "PartFiller", "PartGatherer"]


def _flat(data: memoryview | bytes | bytearray) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class PartFiller:
    """Fills part buffers from a stream of chunks.

    1. ``write`` (the sink's caller thread) copies bytes into the current buffer. A full
       buffer is handed to ``on_full(buffer, nbytes)`` only once more bytes follow (so a
       file that exactly fills one part can still go as a single request), and the next
       buffer comes from ``take()`` (which may block: that is the sink's back-pressure).
    2. ``take_last`` (``close``) returns the current, partly filled buffer and its fill.
    """

    def __init__(
        self, *, take: Callable[[], bytearray], on_full: Callable[[bytearray, int], None]
    ) -> None:
        self._take = take
        self._on_full = on_full
        self._buf: bytearray | None = None
        self._fill = 0

    def write(self, data: memoryview | bytes) -> None:
        view = _flat(data)
        while view.nbytes:
            if self._buf is not None and self._fill == len(self._buf):
                full, self._buf = self._buf, None
                self._on_full(full, self._fill)
            if self._buf is None:
                self._buf = self._take()
                self._fill = 0
            n = min(view.nbytes, len(self._buf) - self._fill)
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]

    def take_last(self) -> tuple[bytearray | None, int]:
        """The buffer being filled (``None`` if no byte was written since the last part)."""
        buf, fill = self._buf, self._fill
        self._buf, self._fill = None, 0
        return buf, (fill if buf is not None else 0)


class PartGatherer:
    """Cuts a stream of chunks into parts of ``part_nbytes`` without copying a byte.

    1. ``write`` (the sink's caller thread) appends views of the chunk to the current
       part, split at part boundaries. A full part is handed to ``on_full(views, nbytes)``
       only once more bytes follow (as :class:`PartFiller`: a file of exactly one part
       can still go as a single request); ``on_full`` may block (back-pressure).
    2. ``take_last`` (``close``) returns the current part's views and byte count.

    The views keep the chunks' buffers alive; their bytes must not change until the part
    is uploaded (a retried part reads them again).
    """

    def __init__(
        self, *, part_nbytes: int, on_full: Callable[[tuple[memoryview, ...], int], None]
    ) -> None:
        self._part_nbytes = max(1, part_nbytes)
        self._on_full = on_full
        self._views: list[memoryview] = []
        self._fill = 0

    def write(self, data: memoryview | bytes) -> None:
        view = _flat(data)
        while view.nbytes:
            if self._fill == self._part_nbytes:
                full, self._views, nbytes, self._fill = tuple(self._views), [], self._fill, 0
                self._on_full(full, nbytes)
            n = min(view.nbytes, self._part_nbytes - self._fill)
            self._views.append(view[:n])
            self._fill += n
            view = view[n:]

    def take_last(self) -> tuple[tuple[memoryview, ...], int]:
        """The part being gathered (empty if no byte was written since the last part)."""
        views, fill = tuple(self._views), self._fill
        self._views, self._fill = [], 0
        return views, fill


class PartBody(io.RawIOBase):
    """A part (one buffer, or the views a :class:`PartGatherer` collected) as a seekable
    file, so that botocore and aiohttp stream it in small reads instead of copying it
    whole (aiohttp slices a ``bytearray`` body, and before Python 3.12.9 joins any body
    with the headers: transient copies per part in flight)."""

    def __init__(self, data: memoryview | Sequence[memoryview]) -> None:
        super().__init__()
        views = [data] if isinstance(data, memoryview) else list(data)
        self._views = [_flat(v) for v in views if v.nbytes]
        self._starts: list[int] = []
        total = 0
        for v in self._views:
            self._starts.append(total)
            total += v.nbytes
        self._nbytes = total
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _take(self, size: int) -> list[memoryview]:
        """Slices of the views covering the next ``size`` bytes (fewer at the end), from
        the current position, which moves past them."""
        end = min(self._pos + max(0, size), self._nbytes)
        pieces = []
        i = bisect.bisect_right(self._starts, self._pos) - 1  # the view holding _pos
        while self._pos < end:
            v, start = self._views[i], self._starts[i]
            pieces.append(v[self._pos - start : min(end - start, v.nbytes)])
            self._pos = min(end, start + v.nbytes)
            i += 1
        return pieces

    def read(self, size: int | None = -1) -> bytes:
        want = self._nbytes - self._pos if size is None or size < 0 else size
        pieces = self._take(want)  # joined: one copy
        return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        done = 0
        for piece in self._take(out.nbytes):
            out[done : done + piece.nbytes] = piece
            done += piece.nbytes
        return done

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._nbytes}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos
