"""``SaveOutcomes``: the one place a save's :class:`~ckptsvc.stage.save_handle.SaveHandle`
is completed.

Call order (threads named; none of it runs on the training thread after ``save`` returns):

1. the writer reports the job (client reader thread): :meth:`SaveOutcomes.written` releases
   the arena (or discards it when the writer died: it may still be reading it), then either
   completes the handle (one process: the job committed) or hands this rank's report to the
   :class:`~ckptsvc.commit.coordinator.Coordinator` (distributed);
2. an overlapped save fails before its job was sent (snapshot thread):
   :meth:`SaveOutcomes.snapshot_failed`; a distributed save that began but never sent its
   job (training thread): :meth:`SaveOutcomes.abandoned` - both report the failure, so rank 0
   commits nothing and later commits do not wait for this save;
3. the verdict (any thread; the coordinator's for a distributed save):
   :meth:`SaveOutcomes.committed` logs it, records a failure, completes the handle, emits
   the metrics event, and tells the checkpointer (``on_durable``: the incremental base).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from ckptsvc import metrics
from ckptsvc.commit.coordinator import Coordinator, PendingCommit
from ckptsvc.errors import SaveFailedError, WriterDiedError
from ckptsvc.stage.arena import ArenaPool, StagingArena
from ckptsvc.stage.save_handle import SaveBook, SaveHandle
from ckptsvc.workers.protocol import JobDone, JobFailed

__all__ = ["Outcome", "SaveOutcomes"]

logger = logging.getLogger(__name__)

Outcome = JobDone | JobFailed | WriterDiedError


class SaveOutcomes:
    """Completes the handles of one checkpointer's saves (see the module docstring)."""

    def __init__(
        self,
        *,
        pool: ArenaPool,
        book: SaveBook,
        coordinator: Coordinator | None,
        on_durable: Callable[[SaveHandle], None],
    ) -> None:
        self._pool = pool
        self._book = book
        self._coordinator = coordinator
        self._on_durable = on_durable

    def callback(
        self, handle: SaveHandle, arena: StagingArena | None, pending: PendingCommit | None
    ) -> Callable[[Outcome], None]:
        """The function the writer client calls with the job's outcome."""

        def on_outcome(outcome: Outcome) -> None:
            self.written(handle, arena, outcome, pending)

        return on_outcome

    def written(
        self,
        handle: SaveHandle,
        arena: StagingArena | None,
        outcome: object,
        pending: PendingCommit | None,
    ) -> None:
        """Step 1 (client reader thread)."""
        error: BaseException | None = None
        if isinstance(outcome, JobDone):
            if arena is not None:
                self._pool.release(arena)
        elif isinstance(outcome, JobFailed):
            if arena is not None:
                self._pool.release(arena)  # the writer stopped reading it before reporting
            cause = outcome.error.to_exception()
            error = SaveFailedError(f"save of step {handle.step} to {handle.path} failed: {cause}")
            error.__cause__ = cause
        else:
            if arena is not None:
                self._pool.discard(arena)  # a writer that lost us may still be reading it
            error = outcome if isinstance(outcome, BaseException) else WriterDiedError(str(outcome))
        if pending is not None and self._coordinator is not None:
            if isinstance(outcome, JobDone):
                handle._set_written(outcome)
                report = replace(pending.report, files=outcome.files)
            else:
                report = replace(pending.report, error=str(error), error_type=type(error).__name__)
            self._coordinator.data_done(pending, report, on_done=self.committed, local_error=error)
            return
        if isinstance(outcome, JobDone):
            handle._finish(outcome)
            self.committed(handle, None)
        else:
            self.committed(handle, error)

    def snapshot_failed(
        self,
        handle: SaveHandle,
        arena: StagingArena | None,
        pending: PendingCommit | None,
        error: BaseException,
    ) -> None:
        """Step 2 (snapshot thread): a torn snapshot, a failed copy or send."""
        if arena is not None:
            self._pool.release(arena)
        if pending is not None and self._coordinator is not None:
            report = replace(pending.report, error=str(error), error_type=type(error).__name__)
            self._coordinator.data_done(pending, report, on_done=self.committed, local_error=error)
            return
        self.committed(handle, error)

    def abandoned(self, pending: PendingCommit, error: BaseException) -> None:
        """Step 2 (training thread): a distributed save began, its job was never sent, and
        ``save`` raises ``error``. Its failed report still goes out."""
        if self._coordinator is None:
            return
        pending.handle._observed = True  # raised to the caller: wait_all need not repeat it
        report = replace(pending.report, error=str(error), error_type=type(error).__name__)
        self._coordinator.data_done(pending, report, on_done=self._book.finish, local_error=error)

    def committed(self, handle: SaveHandle, error: BaseException | None) -> None:
        """Step 3 (any thread): record a failure, complete the handle, and only then forget
        it (``wait_all`` sees every failure of the saves it waited for)."""
        if error is None:
            logger.info(
                "checkpoint step %s durable at %s: %s", handle.step, handle.path, handle.timings
            )
            self._on_durable(handle)
        else:
            logger.error("checkpoint step %s at %s failed: %s", handle.step, handle.path, error)
        self._book.finish(handle, error)
        metrics.emit(metrics.event_from_handle(handle))  # listeners, Prometheus, log line
