"""The future of one asynchronous save (``SaveHandle``) and where its time went (``SaveTimings``).

Completed by the node writer's report (single process: the client reader thread) or by
the distributed commit's verdict (:class:`ckptsvc.distributed.Coordinator`'s thread).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .manifest import FileRecord
from .workers.protocol import JobDone

__all__ = ["SaveHandle", "SaveTimings"]


@dataclass(frozen=True)
class SaveTimings:
    """Where one save's time went. Writer-side fields are ``None`` until it is done.

    ``blocking_s`` is the whole ``save`` call (it includes ``arena_wait_s``, the
    back-pressure wait, and ``copy_s``); ``queue_wait_s`` is from the writer receiving the
    job to its first shard starting; ``write_s`` streaming until every shard was durable;
    ``commit_s`` the manifest; ``durable_s`` from the start of ``save`` to the report.
    """

    nbytes: int
    blocking_s: float
    arena_wait_s: float
    copy_s: float
    queue_wait_s: float | None = None
    write_s: float | None = None
    commit_s: float | None = None
    durable_s: float | None = None


class SaveHandle:
    """The future of one save. Completed by the writer's report (client reader thread)."""

    def __init__(self, *, step: int, path: str, timings: SaveTimings, started: float) -> None:
        self.step = step
        self.path = path
        self._timings = timings
        self._started = started
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._files: tuple[FileRecord, ...] = ()
        self._observed = False

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._error else "durable")
        return f"SaveHandle(step={self.step}, path={self.path!r}, {state})"

    @property
    def timings(self) -> SaveTimings:
        return self._timings

    @property
    def files(self) -> tuple[FileRecord, ...]:
        """The committed files with sizes and CRC-32C (empty until done). In a distributed
        save rank 0's handle lists every file of the checkpoint, other ranks' their own."""
        return self._files

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until durable; raise the save's error (``SaveFailedError``, ``WriterDiedError``)."""
        error = self.exception(timeout_s)
        if error is not None:
            raise error

    def exception(self, timeout_s: float | None = None) -> BaseException | None:
        """The save's error once done (``None`` on success); ``TimeoutError`` if not done in time."""
        if not self._event.wait(timeout_s):
            raise TimeoutError(
                f"save of step {self.step} to {self.path} not durable after {timeout_s} s"
            )
        self._observed = True
        return self._error

    @property
    def failure(self) -> BaseException | None:
        """The error of a finished, failed save, for monitoring: unlike :meth:`exception` it
        does not count as observed, so ``wait_all`` still raises it."""
        return self._error if self._event.is_set() else None

    def _set_blocking(self, blocking_s: float) -> None:  # training thread, maybe after _finish
        with self._lock:
            self._timings = replace(self._timings, blocking_s=blocking_s)

    def _finish(self, done: JobDone) -> None:
        self._files = done.files
        with self._lock:
            self._timings = replace(
                self._timings,
                queue_wait_s=done.queue_wait_s,
                write_s=done.write_s,
                commit_s=done.commit_s,
                durable_s=time.perf_counter() - self._started,
            )
        self._event.set()

    def _finish_committed(
        self, files: Sequence[FileRecord], *, write_s: float | None, commit_s: float | None
    ) -> None:
        """A distributed save: the checkpoint was committed (by rank 0)."""
        self._files = tuple(files)
        with self._lock:
            self._timings = replace(
                self._timings,
                write_s=write_s,
                commit_s=commit_s,
                durable_s=time.perf_counter() - self._started,
            )
        self._event.set()

    def _set_written(self, done: JobDone) -> None:
        """This rank's data is durable (the commit is still to come)."""
        with self._lock:
            self._timings = replace(
                self._timings, queue_wait_s=done.queue_wait_s, write_s=done.write_s
            )

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()
