"""``PartFiller``: the part-buffering ``write`` shared by the object-store sinks.

S3 multipart (:mod:`.multipart`) and GCS resumable (:mod:`.resumable`) uploads both copy
the caller's chunks into fixed-size part buffers (one memcpy: the caller may reuse its
memory as soon as ``write`` returns) and hand each full part to their upload machinery.
Where the buffers come from and where full parts go is theirs; the filling is here.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["PartFiller"]


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
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
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
