"""``AsyncCheckpointer``: a save costs the training loop one memory copy.

Usage::

    with AsyncCheckpointer("s3://bucket/run1", storage_options=opts) as ckpt:
        for step in ...:
            ...
            if step % 1000 == 0:
                ckpt.save(step, {"model": model, "optimizer": opt, "step": step})
    state = load_state(find_latest_checkpoint("s3://bucket/run1", storage_options=opts))

Each save is a complete checkpoint at ``next_checkpoint_path(root, step)`` in the layout of
docs/reference/formats.md (the model as plain HF shards + index, the manifest last).

``save(step, state)`` is :meth:`save_components` of the components
:func:`~ckptsvc.stage.state_components.components_of_state` derives (one GLOBAL component per key
of the state). Call order of one save (process / thread that runs each step):

1. plan every component (training thread; :func:`~ckptsvc.stage.component_plan.plan_components`
   calls each ``stateful.state_dict()`` and decides this rank's files, or rebinds the last
   plan when the state's signature is unchanged: :mod:`ckptsvc.stage.plan_reuse`); claim
   the checkpoint directory (rank 0 or the only process);
2. take a free staging arena - back-pressure: waits while every arena is still being
   written (``timings.arena_wait_s``); a state bigger than the memory budget streams
   through a ring in pieces instead (:mod:`ckptsvc.stage.piecewise`);
3. copy every staged tensor into the arena (CPU threads, or D2H on a side stream) and
   compute the CRCs ``validate_replication`` needs (:mod:`ckptsvc.engine.copier`); with
   ``overlap`` this runs on the snapshot thread after ``save`` returns;
4. send the job to the node writer (started or reconnected here if needed); return the
   :class:`SaveHandle`. Steps 1-4 are ``timings.blocking_s``.
5. the node writer streams the files (writer process). In one process the job carries the
   commit too: documents, index and the manifest last, then the report; the client reader
   thread releases the arena and completes the handle (``wait`` / ``done`` /
   ``exception``). With several ranks the writer reports this rank's files; the client
   reader thread hands the report to the :class:`~ckptsvc.commit.coordinator.Coordinator`, whose
   background thread publishes it in the job's store; rank 0's commit thread merges every
   rank's report and has its writer write the index, the documents and the manifest last;
   every rank's handle completes with rank 0's verdict. No collective runs, and nothing
   runs on the training thread after step 4.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from ckptsvc import knobs
from ckptsvc.commit.coordinator import Coordinator, PendingCommit
from ckptsvc.commit.reports import Merged, RankReport
from ckptsvc.commit.target import SaveTarget, check_step, claim_target
from ckptsvc.engine.copier import SnapshotCopier
from ckptsvc.engine.inflight import load_components, load_state, track
from ckptsvc.engine.jobs import commit_job, data_job, json_metadata, pending_commit
from ckptsvc.engine.outcomes import SaveOutcomes
from ckptsvc.engine.writer_link import WriterLink
from ckptsvc.errors import (
    ConfigError,
    LifecycleError,
    StorageError,
)
from ckptsvc.format.manifest import FileRecord
from ckptsvc.ranks import RankInfo
from ckptsvc.read.discovery import next_checkpoint_path
from ckptsvc.stage.arena import ArenaPlan, ArenaPool, StagingArena, plan_arena
from ckptsvc.stage.component_plan import plan_components
from ckptsvc.stage.components import StateComponent
from ckptsvc.stage.incremental import IncrementalBase, base_fields
from ckptsvc.stage.overlap import OverlappedSnapshots, PreparedSnapshot, component_sources
from ckptsvc.stage.parts import ComponentPlan, StagedFile
from ckptsvc.stage.piecewise import (
    ComponentSegments,
    MemoryBudget,
    PieceStreamer,
    component_segments,
)
from ckptsvc.stage.plan_cache import PlanCache
from ckptsvc.stage.plan_reuse import PlanReuse
from ckptsvc.stage.save_handle import SaveBook, SaveHandle, SaveTimings
from ckptsvc.stage.state_components import components_of_state
from ckptsvc.storage import Location
from ckptsvc.workers.client import WriterClient
from ckptsvc.workers.protocol import JobDone, SaveJob, WriterOptions, check_wire_safe

__all__ = ["AsyncCheckpointer", "SaveHandle", "SaveTimings", "load_components", "load_state"]

logger = logging.getLogger(__name__)


class AsyncCheckpointer:
    """Asynchronous saves of one training process (see the module docstring for the order).

    ``root`` is the model directory (path or URL); checkpoints go to
    ``<root>/checkpoints/checkpoint-<step>``. Options default to ``ckptsvc.knobs``.
    In a distributed job create it on every rank after ``init_process_group`` (rank,
    world and node come from :class:`~ckptsvc.ranks.RankInfo`; ``store`` defaults to
    the default process group's Store, and without a process group ranks coordinate
    through fragment files under the checkpoint; ``single_process=True``: save alone, as a
    plugin called on rank 0 only does, e.g. Lightning's). ``writer_options``
    (:class:`~ckptsvc.WriterOptions`: fsync, I/O threads, part size, retries, direct I/O)
    travel with every save to the node writer; default ``WriterOptions.resolve()`` here.
    ``close`` (also on ``with`` exit and at interpreter exit) waits for in-flight saves,
    then unlinks the arenas; it never raises a save's error - ``wait_all`` and the
    handles do.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_shard_size: int | None = None,
        storage_options: dict[str, Any] | None = None,
        arenas_per_rank: int | None = None,
        copy_threads: int | None = None,
        node: str | None = None,
        rank: int | None = None,
        metadata: dict[str, Any] | None = None,
        store: Any | None = None,
        incremental: bool | None = None,
        memory_budget_bytes: int | None = None,
        writer_options: WriterOptions | None = None,
        single_process: bool = False,
    ) -> None:
        self._writer_options = writer_options or WriterOptions.resolve()
        self._root = Location.parse(os.fspath(root), storage_options)
        if self._root.protocol == "memory":
            raise StorageError(
                f"{self._root.url}: memory:// files live in one process only, and async saves are "
                "written by the node writer process; use a local path or an object store",
                url=self._root.url,
            )
        self._root_text = self._root.url
        self._storage_options = dict(storage_options or {})
        check_wire_safe(self._storage_options, what="storage_options")
        self._max_shard_size = knobs.MAX_SHARD_SIZE.get(max_shard_size)
        info = RankInfo.current(rank=rank, node=node)
        self._info = info.alone() if single_process else info
        self._node = self._info.node_id
        self._rank = self._info.rank if rank is None else rank  # the writer's label for us
        self._metadata = dict(metadata or {})
        self._incremental = knobs.INCREMENTAL.get(incremental)
        self._base: IncrementalBase | None = None  # last committed checkpoint (incremental)
        self._budget = MemoryBudget.resolve(
            memory_budget_bytes=memory_budget_bytes, arenas_per_rank=arenas_per_rank
        )
        self._copier = SnapshotCopier(copy_threads=copy_threads, budget=self._budget)
        self._pool = ArenaPool(
            max_arenas=self._budget.max_arenas,
            node=self._node,
            on_discard=self._arena_discarded,
            budget_bytes=self._budget.budget_bytes,
        )
        self._job_ids = itertools.count(1)
        self._book = SaveBook()
        self._snapshots = OverlappedSnapshots()  # overlapped saves' copies (overlap=True)
        self._closed = False
        self._owner_pid = os.getpid()
        self._arena_plans: PlanCache[ArenaPlan] = PlanCache()
        self._plan_reuse = PlanReuse(incremental=self._incremental)
        self._coordinator = (
            Coordinator(
                self._info,
                root=self._root_text,
                store=store,
                commit=self._commit,
                storage_options=self._storage_options,
            )
            if self._info.distributed
            else None
        )
        self._outcomes = SaveOutcomes(
            pool=self._pool,
            book=self._book,
            coordinator=self._coordinator,
            on_durable=self._durable,
        )
        self._writer = WriterLink(node=self._node, rank=self._rank)
        self._atexit = _register_atexit(self)

    # ---- the public API ---------------------------------------------------------------------

    @property
    def root(self) -> str:
        return self._root_text

    @property
    def writer_pid(self) -> int | None:
        return self._writer.writer_pid

    @property
    def rank_info(self) -> RankInfo:
        return self._info

    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: dict[str, Any] | None = None,
        overlap: bool = False,
        overwrite: bool = False,
    ) -> SaveHandle:
        """Snapshot ``state`` and return; the writer makes it durable in the background.

        ``step`` (a non-negative int) names ``checkpoint-<step>``. The directory is claimed
        before anything is copied: a second save of the same step, from this process or
        any other, gets :class:`~ckptsvc.errors.CommitConflictError` at once, and so does
        a committed step unless ``overwrite`` - then the new checkpoint is written beside
        the old one, which is replaced only once the new one committed.

        Single-process only (one rank's whole state); a distributed job calls
        :meth:`save_components` with sharing patterns. With ``overlap`` the parameters and
        optimizer state are copied after ``save`` returns, while training goes on
        (:mod:`ckptsvc.stage.overlap`): the next ``step()`` of an optimizer in ``state`` waits for
        that copy, and code that changes saved tensors in place outside ``optimizer.step()``
        calls :meth:`fence` first.
        """
        self._check_usable("save")
        if self._info.distributed:
            raise ConfigError(
                f"save(step, state) writes one process's state, but this is rank "
                f"{self._info.rank} of {self._info.world_size}; call save_components(step, "
                "components) with sharing patterns (GLOBAL, PER_RANK, REPLICATED, ...)"
            )
        return self._save(
            step,
            components_of_state(state),
            owners=[state],
            metadata=metadata,
            overlap=overlap,
            overwrite=overwrite,
        )

    def save_components(
        self,
        step: int,
        components: Sequence[StateComponent],
        *,
        process_groups: Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        checkpoint_path: str | None = None,
        overlap: bool = False,
        overwrite: bool = False,
    ) -> SaveHandle:
        """Snapshot every component this rank saves (its sharing pattern decides) and return.

        Every rank of a distributed job calls this with the same components in the same
        order (no collective runs: each rank plans its part from what it knows). Files per
        component are described in :mod:`ckptsvc.stage.component_plan`; each component is listed
        in the manifest with its pattern, ranks and files. ``checkpoint_path`` overrides
        ``next_checkpoint_path(root, step)``. The handle completes when the checkpoint is
        committed (rank 0 wrote the manifest) or failed on any rank. ``overlap`` as in
        :meth:`save` (the optimizers are found among the components' statefuls); a torn
        snapshot fails this rank's part, so the checkpoint is not committed. ``overwrite``
        as in :meth:`save` (every rank passes the same value); rank 0 claims the directory,
        and no rank's writer ever writes into a committed one.
        """
        self._check_usable("save_components")
        return self._save(
            step,
            components,
            owners=[c.stateful for c in components],
            process_groups=process_groups,
            metadata=metadata,
            checkpoint_path=checkpoint_path,
            overlap=overlap,
            overwrite=overwrite,
        )

    def _save(
        self,
        step: int,
        components: Sequence[StateComponent],
        *,
        owners: Sequence[Any],
        process_groups: Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        checkpoint_path: str | None = None,
        overlap: bool = False,
        overwrite: bool = False,
    ) -> SaveHandle:
        """The one save pipeline (see the module docstring for the call order); ``owners``
        are the objects the caller handed over, searched for optimizers by ``overlap``."""
        started = time.perf_counter()
        path = self._free_path(step, checkpoint_path)
        user_meta = json_metadata({**self._metadata, **(metadata or {})})
        plans = self._plan(components, process_groups=process_groups, user_metadata=user_meta)
        staged = [f for p in plans for f in p.files]
        layout = self._arena_plan_for(staged)
        target = self._claim(path, overwrite=overwrite)
        arena: StagingArena | None = None
        arena_wait_s = 0.0
        streamer: PieceStreamer | None = None
        segs: ComponentSegments | None = None
        submitted = False
        try:
            streamed = bool(staged) and self._budget.streams(layout.nbytes)  # pieces
            if staged:
                ring_nbytes = self._budget.ring_nbytes if streamed else layout.nbytes
                arena, arena_wait_s = self._pool.acquire(ring_nbytes)
            copy_started = time.perf_counter()
            snapshot = (
                self._snapshots.prepare(step, owners, component_sources(plans))
                if overlap and arena is not None and not streamed
                else None
            )
            if snapshot is None and not streamed:
                parts = self._copier.stage(plans, staged, layout, arena)
            else:
                parts = tuple(p.part for p in plans)  # the CRCs come after the copy
            copy_s = time.perf_counter() - copy_started
            nbytes = sum(f.plan.layout.data_nbytes for f in staged if f.write)
            handle = SaveHandle(
                step=step,
                path=path,
                started=started,
                timings=SaveTimings(nbytes, 0.0, arena_wait_s, copy_s),
            )
            pending = pending_commit(
                handle,
                RankReport(self._info.rank, step, path, parts),
                target=target,
                plans=plans,
                user_metadata=user_meta,
            )
            job = data_job(
                job_id=next(self._job_ids),
                ckpt_url=Location.parse(target.write_path, self._storage_options).url,
                storage_options=self._storage_options,
                pending=pending,
                plans=plans,
                staged=staged,
                layout=layout,
                arena=arena,
                single_process=self._coordinator is None,
                writer_options=self._writer_options,
                **self._base_kwargs(
                    target.write_path, frozenset().union(*(p.frozen_files for p in plans))
                ),
            )
            on_outcome = self._outcomes.callback(handle, arena, pending)
            if streamed and arena is not None:
                segs = component_segments(plans, staged, layout)
                streamer, job = self._copier.streamer(
                    job, handle, arena, layout.nbytes, segs.segments, on_outcome, segs.crc_segments
                )
                on_outcome = streamer.deliver
            self._book.add(handle, on_done=target.release)
            began = False
            try:
                if self._coordinator is not None:
                    self._coordinator.begin(pending)
                    began = True
                if snapshot is None:
                    client = self._submit(job, on_outcome)
                else:
                    copy = partial(
                        self._copier.stage_late, snapshot, plans, staged, layout, arena, pending
                    )
                    self._start_snapshot(snapshot, handle, arena, pending, job, copy)
            except BaseException as e:
                self._book.discard(handle)
                if began:  # settle it: the next save's commit waits for it, other ranks too
                    self._outcomes.abandoned(pending, e)
                raise
            submitted = True
            track(handle, storage_options=self._storage_options)  # loaders here wait for it
        finally:
            if not submitted:
                target.abandon()
                if arena is not None:
                    self._pool.release(arena)
        if streamer is not None:
            self._copier.run_stream(streamer, client, job.job_id, handle, pending, segs)
        handle._set_blocking(time.perf_counter() - started)
        logger.debug("save step %s: snapshot in %.3f s", step, handle.timings.blocking_s)
        return handle

    def set_incremental_base(self, path: str, files: Sequence[FileRecord]) -> None:
        """Make the committed checkpoint at ``path`` (with its manifest's ``files``) the
        base of the next incremental save, e.g. the checkpoint a run resumed from. Saves
        then copy its unchanged frozen shards instead of writing them (no effect with
        ``incremental=False``); each later commit becomes the base in turn."""
        self._base = IncrementalBase(path, tuple(files))

    def fence(self, timeout_s: float | None = None) -> float:
        """Block until every overlapped snapshot in flight has been copied (not written);
        return the seconds waited (also added to the save's ``timings.fence_wait_s``).

        ``optimizer.step()`` calls it itself for every optimizer found in an overlapped
        save's state. Call it before changing saved tensors in place anywhere else (EMA
        updates, weight clipping, ``zero_()``, loading new weights); otherwise the save fails
        with :class:`~ckptsvc.errors.TornSnapshotError` - or, for writes that bypass
        version counters (``.data``, raw pointers), may hold the new values.
        """
        return self._snapshots.fence(timeout_s)

    def reserve(self, state: Any, *, wait: bool = False) -> None:
        """Plan ``state`` and create its arenas in the background unless ``wait`` (design.md 7)."""
        plans = self._plan(components_of_state(state), process_groups=None, user_metadata={})
        layout = self._arena_plan_for([f for p in plans for f in p.files])
        _ = layout.program  # the copy program: built now, not by the first save
        ring = self._budget.streams(layout.nbytes)  # bigger than the budget: the ring
        self._pool.reserve(self._budget.ring_nbytes if ring else layout.nbytes, wait=wait)

    def wait_all(self, timeout_s: float | None = None) -> None:
        """Wait for every in-flight save; raise the first failure nobody has looked at yet."""
        self._book.wait_all(timeout_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Wait for in-flight saves (up to ``timeout_s``, default ``CKPTSVC_CLOSE_TIMEOUT_S``;
        a wedged writer fails them after ``CKPTSVC_WRITER_TIMEOUT_S``), disconnect, unlink
        the arenas."""
        if self._closed:
            return
        timeout_s = knobs.CLOSE_TIMEOUT_S.get(timeout_s) or None
        self._closed = True
        if os.getpid() != self._owner_pid:  # a forked child: the arenas and socket are the parent's
            return
        self._snapshots.close(timeout_s)  # queued overlapped saves are copied and submitted
        self._book.drain(timeout_s)
        if self._coordinator is not None:
            self._coordinator.close()
        self._writer.close()
        self._pool.close()
        self._copier.close()
        atexit.unregister(self._atexit)

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- steps of save ----------------------------------------------------------------------

    def _check_usable(self, what: str) -> None:
        if self._closed:
            raise LifecycleError(f"{what}() on a closed AsyncCheckpointer")
        if os.getpid() != self._owner_pid:
            raise LifecycleError(f"{what}() in a forked child: create an AsyncCheckpointer there")

    def _free_path(self, step: int, checkpoint_path: str | None) -> str:
        check_step(step)
        path = checkpoint_path or next_checkpoint_path(self._root_text, step)
        self._book.check_free(path, step)
        return path

    def _claim(self, path: str, *, overwrite: bool) -> SaveTarget:
        """Training thread: claim the directory the save writes (the process that commits
        it does: rank 0, or the only one) before the save is registered."""
        return claim_target(
            path,
            storage_options=self._storage_options,
            overwrite=overwrite,
            claim=self._info.rank == 0 or self._coordinator is None,
        )

    def _plan(
        self,
        components: Sequence[StateComponent],
        *,
        process_groups: Mapping[str, Any] | None,
        user_metadata: dict[str, Any],
    ) -> list[ComponentPlan]:
        return plan_components(
            components,
            info=self._info,
            process_groups=process_groups,
            max_shard_size=self._max_shard_size,
            user_metadata=user_metadata,
            incremental=self._incremental,
            reuse=self._plan_reuse,
        )

    def _arena_plan_for(self, staged: Sequence[StagedFile]) -> ArenaPlan:
        key = tuple(f.arena_key for f in staged)
        return self._arena_plans.get(key, lambda: plan_arena([f.plan for f in staged]))

    def _commit(self, pending: PendingCommit, merged: Merged) -> JobDone:
        """Rank 0's commit thread: index, documents and manifest, written by our writer."""
        return self._writer.run(
            commit_job(
                job_id=next(self._job_ids),
                ckpt_url=Location.parse(pending.path, self._storage_options).url,
                storage_options=self._storage_options,
                pending=pending,
                merged=merged,
                world_size=self._info.world_size,
                writer_options=self._writer_options,
            )
        )

    def _base_kwargs(self, path: str, candidates: frozenset[str]) -> dict[str, Any]:
        """``SaveJob`` fields naming the base checkpoint and its records of ``candidates``."""
        base_url, base_files = base_fields(
            self._base if self._incremental else None,
            path=path,
            candidates=candidates,
            storage_options=self._storage_options,
        )
        return {"base_url": base_url, "base_files": base_files}

    def _submit(self, job: SaveJob, on_outcome: Any) -> WriterClient:
        return self._writer.submit(job, on_outcome)

    def _start_snapshot(
        self,
        snapshot: PreparedSnapshot,
        handle: SaveHandle,
        arena: StagingArena | None,
        pending: PendingCommit | None,
        job: SaveJob,
        copy: Callable[[], None],
    ) -> None:
        """Training thread: hand an overlapped save's copy, then its job, to the snapshot
        thread; from here on the arena is that thread's to release."""
        self._snapshots.start(
            snapshot,
            handle=handle,
            copy=copy,
            submit=lambda: self._submit(job, self._outcomes.callback(handle, arena, pending)),
            fail=lambda error: self._outcomes.snapshot_failed(handle, arena, pending, error),
        )

    def _durable(self, handle: SaveHandle) -> None:
        """A save committed (any thread): with ``incremental`` it becomes the next base."""
        if self._incremental:
            self._base = IncrementalBase(handle.path, handle.files)

    def _arena_discarded(self, name: str) -> None:
        self._writer.release_arena(name)


def _register_atexit(ckpt: AsyncCheckpointer) -> Any:
    ref = weakref.ref(ckpt)

    def _close() -> None:
        obj = ref()
        if obj is not None:
            obj.close()

    atexit.register(_close)
    return _close
