"""``SnapshotCopier``: copying a save's tensors into its arena, on the training thread or
the snapshot thread, whole or streamed in pieces.

1. :meth:`SnapshotCopier.stage` (training thread): every staged tensor into the arena (CPU
   threads, or D2H on a side stream), and the per-tensor CRC-32C ``validate_replication``
   needs (:func:`~ckptsvc.engine.jobs.stage_components`);
2. :meth:`SnapshotCopier.stage_late` (snapshot thread): the same for an overlapped save,
   from the clones taken at save time where there are some;
3. a save bigger than the memory budget: :meth:`SnapshotCopier.streamer` builds its
   :class:`~ckptsvc.stage.piecewise.PieceStreamer` and marks the job streamed;
   :meth:`SnapshotCopier.run_stream` (training thread, after the job was sent) streams
   every piece through the ring.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

from ckptsvc import knobs
from ckptsvc.commit.coordinator import PendingCommit
from ckptsvc.engine.jobs import stage_components
from ckptsvc.stage.arena import ArenaPlan, StagingArena, copy_into
from ckptsvc.stage.overlap import PreparedSnapshot
from ckptsvc.stage.parts import ComponentPlan, PartReport, StagedFile
from ckptsvc.stage.piecewise import ComponentSegments, MemoryBudget, PieceStreamer, Segment
from ckptsvc.stage.save_handle import SaveHandle
from ckptsvc.workers.client import WriterClient
from ckptsvc.workers.protocol import SaveJob

__all__ = ["SnapshotCopier"]

logger = logging.getLogger(__name__)


class SnapshotCopier:
    """The copy threads and memory budget of one checkpointer (see the module docstring)."""

    def __init__(self, *, copy_threads: int | None, budget: MemoryBudget) -> None:
        threads = knobs.COPY_THREADS.get(copy_threads) or min(8, len(os.sched_getaffinity(0)))
        self.threads = max(1, threads)
        self._executor = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="ckptsvc-copy")
            if self.threads > 1
            else None
        )
        self._budget = budget
        self._streamed_once = False  # the INFO line about streamed saves is logged once

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def stage(
        self,
        plans: Sequence[ComponentPlan],
        staged: Sequence[StagedFile],
        layout: ArenaPlan,
        arena: StagingArena | None,
        sources: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    ) -> tuple[PartReport, ...]:
        """Copy ``save_components``' tensors (or what ``sources`` maps them to) into the
        arena; this rank's CRCs per part."""
        return stage_components(
            plans,
            staged,
            layout,
            arena,
            threads=self.threads,
            executor=self._executor,
            sources=sources,
        )

    def stage_late(
        self,
        snapshot: PreparedSnapshot,
        plans: Sequence[ComponentPlan],
        staged: Sequence[StagedFile],
        layout: ArenaPlan,
        arena: StagingArena | None,
        pending: PendingCommit,
    ) -> None:
        """Snapshot thread: an overlapped ``save_components``' copy (from the clones taken at
        save time where there are some) and the CRCs it yields for the rank's report."""
        pending.report = replace(
            pending.report, parts=self.stage(plans, staged, layout, arena, snapshot.sources)
        )

    def streamer(
        self,
        job: SaveJob,
        handle: SaveHandle,
        ring: StagingArena,
        layout_nbytes: int,
        segments: Sequence[Segment],
        on_outcome: Any,
        crc_segments: frozenset[int] = frozenset(),
    ) -> tuple[PieceStreamer, SaveJob]:
        """A save bigger than the memory budget: its streamer, and the job marked streamed."""
        streamer = PieceStreamer(
            ring=ring,
            piece_nbytes=self._budget.piece_nbytes,
            layout_nbytes=layout_nbytes,
            segments=segments,
            on_outcome=on_outcome,
            copy=copy_into,
            threads=self.threads,
            executor=self._executor,
            what=f"save of step {handle.step} to {handle.path}",
            crc_segments=crc_segments,
        )
        if not self._streamed_once:
            self._streamed_once = True
            logger.info(
                "the state (%.1f MiB staged) exceeds memory_budget_bytes=%d: saves stage and "
                "stream it in pieces of %.1f MiB; save() returns after the last piece",
                layout_nbytes / 2**20,
                self._budget.budget_bytes,
                self._budget.piece_nbytes / 2**20,
            )
        return streamer, replace(job, stream=streamer.spec)

    def run_stream(
        self,
        streamer: PieceStreamer,
        client: WriterClient,
        job_id: int,
        handle: SaveHandle,
        pending: PendingCommit | None = None,
        segs: ComponentSegments | None = None,
    ) -> None:
        """Training thread, after the job was sent: stream every piece. On failure the
        error is raised here (the handle fails too, marked seen so wait_all skips it)."""
        try:
            stats = streamer.run(client, job_id)
            if pending is not None and segs is not None and segs.crc_segments:
                pending.report = replace(pending.report, parts=segs.parts(stats.crcs))
            handle._set_streamed(stats.pieces, stats.copy_s, stats.piece_wait_s)
        except BaseException:
            handle._observed = True
            raise
        finally:
            streamer.release()
