"""The future of one asynchronous save (``SaveHandle``), where its time went
(``SaveTimings``), and a checkpointer's book of the saves it has in flight (``SaveBook``).

Completed by the node writer's report (single process: the client reader thread) or by
the distributed commit's verdict (:class:`ckptsvc.commit.coordinator.Coordinator`'s thread).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ckptsvc.errors import CommitConflictError, SaveFailedError
from ckptsvc.format.manifest import FileRecord
from ckptsvc.workers.protocol import JobDone

__all__ = ["SaveBook", "SaveHandle", "SaveTimings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveTimings:
    """Where one save's time went. Writer-side fields are ``None`` until it is done.

    ``blocking_s`` is the whole ``save`` call (it includes ``arena_wait_s``, the
    back-pressure wait, and ``copy_s``); ``queue_wait_s`` is from the writer receiving the
    job to its first shard starting; ``write_s`` streaming until every shard was durable;
    ``commit_s`` the manifest; ``durable_s`` from the start of ``save`` to the report.
    ``nbytes_written`` / ``nbytes_reused``: bytes of this rank's files the writer wrote,
    and bytes it materialised from the previous checkpoint instead (incremental saves).
    Overlapped saves (``overlap=True``): ``copy_s`` is the part copied (cloned) before
    ``save`` returned, ``snapshot_s`` the background copy, and ``fence_wait_s`` how long
    the training thread waited for it in ``fence`` (the optimizer pre-step hook).
    """

    nbytes: int
    blocking_s: float
    arena_wait_s: float
    copy_s: float
    queue_wait_s: float | None = None
    write_s: float | None = None
    commit_s: float | None = None
    durable_s: float | None = None
    nbytes_written: int | None = None
    nbytes_reused: int | None = None
    snapshot_s: float | None = None
    fence_wait_s: float = 0.0
    pieces: int = 0
    piece_wait_s: float = 0.0

    @property
    def streamed(self) -> bool:
        """The state exceeded ``memory_budget_bytes`` and was staged in ``pieces``
        (``ckptsvc.stage.piecewise``): ``blocking_s`` then includes ``piece_wait_s``, the time
        spent waiting for the writer to free a slot."""
        return self.pieces > 0


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

    def settled(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` (``None``: no limit) until the save is done, durable or
        failed; ``True`` if it is. Unlike :meth:`exception` the outcome stays unobserved, so
        its owner's ``wait`` still raises a failure (what a loader waiting for it uses)."""
        return self._event.wait(timeout_s)

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

    def _set_streamed(self, pieces: int, copy_s: float, piece_wait_s: float) -> None:
        """Training thread, after a streamed save's last piece (before any outcome)."""
        with self._lock:
            self._timings = replace(
                self._timings, pieces=pieces, copy_s=copy_s, piece_wait_s=piece_wait_s
            )

    def _set_snapshot(self, snapshot_s: float) -> None:  # the snapshot thread
        with self._lock:
            self._timings = replace(self._timings, snapshot_s=snapshot_s)

    def _add_fence_wait(self, waited_s: float) -> None:  # the thread that called fence
        with self._lock:
            self._timings = replace(
                self._timings, fence_wait_s=self._timings.fence_wait_s + waited_s
            )

    def _finish(self, done: JobDone) -> None:
        self._files = done.files
        with self._lock:
            self._timings = replace(
                self._timings,
                queue_wait_s=done.queue_wait_s,
                write_s=done.write_s,
                commit_s=done.commit_s,
                durable_s=time.perf_counter() - self._started,
                nbytes_written=done.nbytes_written,
                nbytes_reused=done.nbytes_reused,
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
                self._timings,
                queue_wait_s=done.queue_wait_s,
                write_s=done.write_s,
                nbytes_written=done.nbytes_written,
                nbytes_reused=done.nbytes_reused,
            )

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()


class SaveBook:
    """The saves of one checkpointer still in flight, and the failures nobody has seen.

    1. ``check_free`` (training thread): refuse a second save to a path still in flight;
    2. ``add`` (training thread) before the job goes out; ``discard`` if it never went;
    3. ``finish`` (any thread: client reader, snapshot or commit thread) completes a
       handle - a failure is recorded *before* the handle is forgotten, so ``wait_all``
       sees every failure of the saves it waited for;
    4. ``wait_all`` / ``drain`` (the owner; ``drain`` at close never raises).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight: set[SaveHandle] = set()
        self._on_done: dict[SaveHandle, Callable[[], None]] = {}
        self._failed: list[SaveHandle] = []

    def check_free(self, path: str, step: int) -> None:
        with self._lock:
            if any(h.path == path and not h.done() for h in self._inflight):
                raise CommitConflictError(
                    f"a save to {path} is still in flight; wait for its handle before saving "
                    f"step {step} again"
                )

    def add(self, handle: SaveHandle, *, on_done: Callable[[], None] | None = None) -> None:
        """Track ``handle``; ``on_done`` runs once when it is forgotten (claims released)."""
        with self._lock:
            self._inflight.add(handle)
            if on_done is not None:
                self._on_done[handle] = on_done

    def discard(self, handle: SaveHandle) -> None:
        with self._lock:
            self._inflight.discard(handle)
            on_done = self._on_done.pop(handle, None)
        if on_done is not None:
            on_done()

    def finish(self, handle: SaveHandle, error: BaseException | None) -> None:
        """Fail the handle with ``error`` (recorded first), or just forget a durable one."""
        if error is not None:
            handle._error = error  # set before it is listed: wait_all reads it
            with self._lock:
                self._failed.append(handle)
            handle._fail(error)
        self.discard(handle)

    def wait_all(self, timeout_s: float | None) -> None:
        """Wait for every save in flight; raise the first failure nobody has looked at."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            handles = sorted(self._inflight, key=lambda h: h.step)
        for h in handles:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not h._event.wait(remaining):
                raise TimeoutError(
                    f"save of step {h.step} to {h.path} not durable after {timeout_s} s"
                )
        with self._lock:
            failed = [h for h in self._failed if not h._observed]
            self._failed = []
        if failed:
            first = failed[0]
            first._observed = True
            error = first._error
            more = f" (and {len(failed) - 1} more failed saves)" if len(failed) > 1 else ""
            raise SaveFailedError(
                f"save of step {first.step} to {first.path} failed{more}: {error}"
            ) from error

    def drain(self, timeout_s: float | None) -> None:
        """Wait (up to ``timeout_s``) for the saves in flight; log those still going."""
        with self._lock:
            handles = list(self._inflight)
        if handles:
            logger.info("close: waiting for %d in-flight save(s) to become durable", len(handles))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for h in handles:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not h._event.wait(remaining):
                logger.warning("closing with the save of step %s still in flight", h.step)
