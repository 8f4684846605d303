"""``AsyncCheckpointer``: a save costs the training loop one memory copy.

Usage::

    with AsyncCheckpointer("s3://bucket/run1", storage_options=opts) as ckpt:
        for step in ...:
            ...
            if step % 1000 == 0:
                ckpt.save(step, {"model": model, "optimizer": opt, "step": step})
    state = load_state(find_latest_checkpoint("s3://bucket/run1", storage_options=opts))

Each save produces a normal complete checkpoint at ``next_checkpoint_path(root, step)``:
HF safetensors shards + ``model.safetensors.index.json`` + ``ckptsvc_state.json`` (the
non-tensor state, see :mod:`ckptsvc.flatten`) + ``checkpoint_manifest.json`` written last.

Call order of one ``save`` (process / thread that runs each step; DESIGN.md section 1):

1. flatten the state (training thread);
2. look up the layout plan cached for the state's signature (names, dtypes, shapes);
3. take a free staging arena - back-pressure: waits while every arena is still being
   written (``timings.arena_wait_s``);
4. copy every tensor into the arena (CPU threads, or D2H on a side stream), synchronised;
5. send the job to the node writer (started or reconnected here if needed); return the
   :class:`SaveHandle`. Steps 1-5 are ``timings.blocking_s``.
6. the node writer streams the shards, publishes the index and skeleton, writes the
   manifest last (writer process), then reports; the client reader thread releases the
   arena and completes the handle (``wait`` / ``done`` / ``exception``).

``save_components(step, components)`` is the same pipeline for :class:`StateComponent`
lists (every rank of a distributed job calls it; see :mod:`ckptsvc.component_plan` for
who writes what and the file names): step 1-2 become ``plan_components`` (each
``stateful.state_dict()``), step 4 also computes the checksums ``validate_replication``
needs. In one process step 6 is unchanged. With several ranks the writer only reports
this rank's files; the client reader thread releases the arena and hands the report to
the :class:`~ckptsvc.distributed.Coordinator`, whose background thread publishes it in the
job's store; rank 0's commit thread merges every rank's report and has its writer write
the index, the documents and the manifest last; every rank's handle completes with rank
0's verdict. No collective runs, and nothing runs on the training thread after step 5.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import knobs, metrics
from .component_load import load_components
from .component_plan import StagedFile, plan_components
from .component_save import commit_job, data_job, stage_components
from .components import StateComponent
from .discovery import next_checkpoint_path
from .distributed import Coordinator, PendingCommit, RankInfo
from .errors import (
    CheckpointError,
    CommitConflictError,
    InvalidStateError,
    SaveFailedError,
    StorageError,
    WriterDiedError,
)
from .flatten import SKELETON_NAME, FlatState, flatten_state, load_state
from .layout import SAFE_WEIGHTS_INDEX_NAME, TensorSpec, make_index, plan_files, weight_map_of
from .manifest import ComponentRecord
from .reports import Merged, RankReport
from .safetensors_stream import dtype_to_torch
from .save_handle import SaveHandle, SaveTimings
from .staging import ArenaPlan, ArenaPool, StagingArena, copy_into, plan_arena
from .storage import Location
from .workers.client import WriterClient
from .workers.protocol import (
    CommitInfo,
    FileJob,
    JobDone,
    JobFailed,
    SaveJob,
    SmallFile,
    check_wire_safe,
)

__all__ = ["AsyncCheckpointer", "SaveHandle", "SaveTimings", "load_components", "load_state"]

logger = logging.getLogger(__name__)

_PLAN_CACHE_SIZE = 4
_SINGLE_THREAD_COPY_BYTES = 32 << 20


@dataclass(frozen=True)
class _SavePlan:
    """Everything about a save that depends only on the state's signature."""

    arena: ArenaPlan
    views: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]
    file_jobs: tuple[FileJob, ...]
    weight_map: dict[str, str]
    total_nbytes: int
    shard_nbytes: int
    file_names: tuple[str, ...] = field(default=())


def _make_plan(flat: FlatState, *, max_shard_size: int) -> _SavePlan:
    specs = [
        TensorSpec(n, d, tuple(t.shape))
        for (n, t), d in zip(flat.tensors, flat.dtypes, strict=True)
    ]
    files = plan_files(specs, max_shard_size=max_shard_size)
    arena = plan_arena(files)
    views = tuple((s.name, dtype_to_torch(s.dtype), s.shape) for s in specs)
    jobs = tuple(
        FileJob(p.file_name, p.layout, off)
        for p, off in zip(files, arena.file_offsets, strict=True)
    )
    return _SavePlan(
        arena=arena,
        views=views,
        file_jobs=jobs,
        weight_map=weight_map_of(files),
        total_nbytes=sum(s.nbytes for s in specs),
        shard_nbytes=sum(p.layout.file_nbytes for p in files),
        file_names=tuple(p.file_name for p in files),
    )


class AsyncCheckpointer:
    """Asynchronous saves of one training process (see the module docstring for the order).

    ``root`` is the model directory (path or URL); checkpoints go to
    ``<root>/checkpoints/checkpoint-<step>``. Options default to ``ckptsvc.knobs``.
    In a distributed job create it on every rank after ``init_process_group`` (rank,
    world and node come from :class:`~ckptsvc.distributed.RankInfo`; ``store`` defaults to
    the default process group's Store, and without a process group ranks coordinate
    through fragment files under the checkpoint).
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
    ) -> None:
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
        self._info = RankInfo.current(rank=rank, node=node)
        self._node = self._info.node_id
        self._rank = self._info.rank if rank is None else rank  # the writer's label for us
        self._metadata = dict(metadata or {})
        threads = knobs.COPY_THREADS.get(copy_threads) or min(8, len(os.sched_getaffinity(0)))
        self._copy_threads = max(1, threads)
        self._copy_pool = (
            ThreadPoolExecutor(self._copy_threads, thread_name_prefix="ckptsvc-copy")
            if self._copy_threads > 1
            else None
        )
        self._pool = ArenaPool(
            max_arenas=knobs.ARENAS_PER_RANK.get(arenas_per_rank),
            node=self._node,
            on_discard=self._arena_discarded,
        )
        self._plans: OrderedDict[Any, _SavePlan] = OrderedDict()
        self._job_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._client_lock = threading.Lock()
        self._inflight: set[SaveHandle] = set()
        self._failed: list[SaveHandle] = []
        self._closed = False
        self._owner_pid = os.getpid()
        self._arena_plans: OrderedDict[Any, ArenaPlan] = OrderedDict()
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
        self._client: WriterClient | None = WriterClient.connect_or_start(
            node=self._node, rank=self._rank
        )
        self._atexit = _register_atexit(self)

    # ---- the public API ---------------------------------------------------------------------

    @property
    def root(self) -> str:
        return self._root_text

    @property
    def writer_pid(self) -> int | None:
        return self._client.writer_pid if self._client is not None else None

    @property
    def rank_info(self) -> RankInfo:
        return self._info

    def save(self, step: int, state: Any, *, metadata: dict[str, Any] | None = None) -> SaveHandle:
        """Snapshot ``state`` and return; the writer makes it durable in the background.

        Single-process only (one rank's whole state); a distributed job calls
        :meth:`save_components` with sharing patterns.
        """
        self._check_usable("save")
        if self._info.distributed:
            raise CheckpointError(
                f"save(step, state) writes one process's state, but this is rank "
                f"{self._info.rank} of {self._info.world_size}; call save_components(step, "
                "components) with sharing patterns (GLOBAL, PER_RANK, REPLICATED, ...)"
            )
        started = time.perf_counter()
        path = self._free_path(step, None)
        flat = flatten_state(state)
        plan = self._plan_for(flat)
        arena, arena_wait_s = self._pool.acquire(plan.arena.nbytes)
        submitted = False
        try:
            copy_started = time.perf_counter()
            self._copy(flat, plan, arena)
            copy_s = time.perf_counter() - copy_started
            handle = SaveHandle(
                step=step,
                path=path,
                started=started,
                timings=SaveTimings(plan.total_nbytes, 0.0, arena_wait_s, copy_s),
            )
            job = self._job(step, path, flat, plan, arena, metadata)
            with self._lock:
                self._inflight.add(handle)
            try:
                self._submit(job, self._outcome_callback(handle, arena, None))
            except BaseException:
                with self._lock:
                    self._inflight.discard(handle)
                raise
            submitted = True
        finally:
            if not submitted:
                self._pool.release(arena)
        handle._set_blocking(time.perf_counter() - started)
        logger.debug("save step %s: snapshot in %.3f s", step, handle.timings.blocking_s)
        return handle

    def save_components(
        self,
        step: int,
        components: Sequence[StateComponent],
        *,
        process_groups: Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        checkpoint_path: str | None = None,
    ) -> SaveHandle:
        """Snapshot every component this rank saves (its sharing pattern decides) and return.

        Every rank of a distributed job calls this with the same components in the same
        order (no collective runs: each rank plans its part from what it knows). Files per
        component are described in :mod:`ckptsvc.component_plan`; each component is listed
        in the manifest with its pattern, ranks and files. ``checkpoint_path`` overrides
        ``next_checkpoint_path(root, step)``. The handle completes when the checkpoint is
        committed (rank 0 wrote the manifest) or failed on any rank.
        """
        self._check_usable("save_components")
        started = time.perf_counter()
        path = self._free_path(step, checkpoint_path)
        user_meta = _json_metadata({**self._metadata, **(metadata or {})})
        plans = plan_components(
            components,
            info=self._info,
            process_groups=process_groups,
            max_shard_size=self._max_shard_size,
            user_metadata=user_meta,
        )
        staged = [f for p in plans for f in p.files]
        layout = self._arena_plan_for(staged)
        arena: StagingArena | None = None
        arena_wait_s = 0.0
        if staged:
            arena, arena_wait_s = self._pool.acquire(layout.nbytes)
        submitted = False
        try:
            copy_started = time.perf_counter()
            parts = stage_components(
                plans,
                staged,
                layout,
                arena,
                threads=self._copy_threads,
                executor=self._copy_pool,
                copy=copy_into,  # looked up now: fault-injection hooks replace it
            )
            copy_s = time.perf_counter() - copy_started
            nbytes = sum(e.nbytes for f in staged if f.write for e in f.plan.layout.entries)
            handle = SaveHandle(
                step=step,
                path=path,
                started=started,
                timings=SaveTimings(nbytes, 0.0, arena_wait_s, copy_s),
            )
            report = RankReport(self._info.rank, step, path, parts)
            pending = PendingCommit(
                step=step,
                path=path,
                handle=handle,
                report=report,
                user_metadata=user_meta,
                crc_names={p.component.key: p.crc_names for p in plans if p.crc_names},
                sharded_docs={
                    p.component.key: p.sharded_doc for p in plans if p.sharded_doc is not None
                },
            )
            job = data_job(
                job_id=next(self._job_ids),
                ckpt_url=Location.parse(path, self._storage_options).url,
                storage_options=self._storage_options,
                pending=pending,
                plans=plans,
                staged=staged,
                layout=layout,
                arena=arena,
                single_process=self._coordinator is None,
            )
            with self._lock:
                self._inflight.add(handle)
            try:
                if self._coordinator is not None:
                    self._coordinator.begin(pending)
                self._submit(job, self._outcome_callback(handle, arena, pending))
            except BaseException:
                with self._lock:
                    self._inflight.discard(handle)
                raise
            submitted = True
        finally:
            if not submitted and arena is not None:
                self._pool.release(arena)
        handle._set_blocking(time.perf_counter() - started)
        logger.debug("save step %s: snapshot in %.3f s", step, handle.timings.blocking_s)
        return handle

    def reserve(self, state: Any) -> None:
        """Optional warm-up: plan ``state``'s layout and create every arena now (allocating
        and pre-faulting costs ~0.4 s per GiB), so the first saves pay only the copy."""
        self._pool.reserve(self._plan_for(flatten_state(state)).arena.nbytes)

    def wait_all(self, timeout_s: float | None = None) -> None:
        """Wait for every in-flight save; raise the first failure nobody has looked at yet."""
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

    def close(self, timeout_s: float | None = None) -> None:
        """Wait for in-flight saves (up to ``timeout_s``), disconnect, unlink the arenas."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._owner_pid:  # a forked child: the arenas and socket are the parent's
            return
        with self._lock:
            handles = list(self._inflight)
        if handles:
            logger.info("close: waiting for %d in-flight save(s) to become durable", len(handles))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for h in handles:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not h._event.wait(remaining):
                logger.warning("closing with the save of step %s still in flight", h.step)
        if self._coordinator is not None:
            self._coordinator.close()
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        self._pool.close()
        if self._copy_pool is not None:
            self._copy_pool.shutdown(wait=True)
        atexit.unregister(self._atexit)

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- steps of save ----------------------------------------------------------------------

    def _check_usable(self, what: str) -> None:
        if self._closed:
            raise CheckpointError(f"{what}() on a closed AsyncCheckpointer")
        if os.getpid() != self._owner_pid:
            raise CheckpointError(f"{what}() in a forked child: create an AsyncCheckpointer there")

    def _free_path(self, step: int, checkpoint_path: str | None) -> str:
        path = checkpoint_path or next_checkpoint_path(self._root_text, step)
        with self._lock:
            if any(h.path == path and not h.done() for h in self._inflight):
                raise CommitConflictError(
                    f"a save to {path} is still in flight; wait for its handle before saving "
                    f"step {step} again"
                )
        return path

    def _arena_plan_for(self, staged: Sequence[StagedFile]) -> ArenaPlan:
        key = tuple((f.plan.file_name, f.plan.layout.header) for f in staged)
        layout = self._arena_plans.get(key)
        if layout is None:
            layout = self._arena_plans[key] = plan_arena([f.plan for f in staged])
            while len(self._arena_plans) > _PLAN_CACHE_SIZE:
                self._arena_plans.popitem(last=False)
        else:
            self._arena_plans.move_to_end(key)
        return layout

    def _commit(self, pending: PendingCommit, merged: Merged) -> JobDone:
        """Rank 0's commit thread: index, documents and manifest, written by our writer."""
        job = commit_job(
            job_id=next(self._job_ids),
            ckpt_url=Location.parse(pending.path, self._storage_options).url,
            storage_options=self._storage_options,
            pending=pending,
            merged=merged,
            world_size=self._info.world_size,
        )
        box: list[object] = []
        done = threading.Event()

        def on_outcome(outcome: object) -> None:
            box.append(outcome)
            done.set()

        self._submit(job, on_outcome)
        done.wait()
        outcome = box[0]
        if isinstance(outcome, JobDone):
            return outcome
        if isinstance(outcome, JobFailed):
            raise outcome.error.to_exception()
        raise outcome if isinstance(outcome, BaseException) else WriterDiedError(str(outcome))

    def _plan_for(self, flat: FlatState) -> _SavePlan:
        key = flat.signature()
        plan = self._plans.get(key)
        if plan is None:
            plan = _make_plan(flat, max_shard_size=self._max_shard_size)
            self._plans[key] = plan
            while len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def _copy(self, flat: FlatState, plan: _SavePlan, arena: StagingArena) -> None:
        srcs = [t for _, t in flat.tensors]
        if any(t.device.type == "cuda" for t in srcs):
            arena.pin()
        dsts = arena.views(plan.arena, plan.views)
        threads = 1 if plan.total_nbytes < _SINGLE_THREAD_COPY_BYTES else self._copy_threads
        with torch.no_grad():
            copy_into(dsts, srcs, threads=threads, executor=self._copy_pool)

    def _job(
        self,
        step: int,
        path: str,
        flat: FlatState,
        plan: _SavePlan,
        arena: StagingArena,
        metadata: dict[str, Any] | None,
    ) -> SaveJob:
        user_meta = _json_metadata({**self._metadata, **(metadata or {})})
        index = make_index(
            plan.weight_map,
            total_size=plan.total_nbytes,
            metadata=user_meta,
            param_sharing=[list(g) for g in flat.param_sharing] or None,
        )
        small = (
            SmallFile(
                SAFE_WEIGHTS_INDEX_NAME, json.dumps(index, indent=4, ensure_ascii=True).encode()
            ),
            SmallFile(SKELETON_NAME, flat.skeleton_json()),
        )
        files = sorted([*plan.file_names, *(f.rel_path for f in small)])
        component = ComponentRecord(
            key="state",
            sharing_pattern="global",
            ranks=(0,),
            size_bytes=plan.shard_nbytes + sum(len(f.data) for f in small),
            metadata={"files": files, "index": SAFE_WEIGHTS_INDEX_NAME, "skeleton": SKELETON_NAME},
        )
        from . import __version__

        commit = CommitInfo(
            step=step,
            world_size=1,
            components=(component,),
            pytorch_version=str(torch.__version__),
            library_version=__version__,
            user_metadata=user_meta,
        )
        return SaveJob(
            job_id=next(self._job_ids),
            ckpt_url=Location.parse(path, self._storage_options).url,
            storage_options=self._storage_options,
            arena_name=arena.name,
            files=plan.file_jobs,
            small_files=small,
            commit=commit,
        )

    def _outcome_callback(
        self, handle: SaveHandle, arena: StagingArena | None, pending: PendingCommit | None
    ) -> Any:
        def on_outcome(outcome: JobDone | JobFailed | WriterDiedError) -> None:
            self._completed(handle, arena, outcome, pending)

        return on_outcome

    def _submit(self, job: SaveJob, on_outcome: Any) -> None:
        """Send the job, (re)starting the writer if it died; one retry on a failed send.

        Called by the training thread and by rank 0's commit thread (one at a time)."""
        with self._client_lock:
            for attempt in (1, 2):
                client = self._client
                if client is None or not client.alive:
                    if client is not None:
                        logger.warning(
                            "node writer (pid %d) is gone; starting a new one", client.writer_pid
                        )
                        client.close()
                    self._client = client = WriterClient.connect_or_start(
                        node=self._node, rank=self._rank
                    )
                try:
                    client.submit(job, on_outcome)
                    return
                except WriterDiedError:
                    if attempt == 2:
                        raise

    def _completed(
        self,
        handle: SaveHandle,
        arena: StagingArena | None,
        outcome: object,
        pending: PendingCommit | None,
    ) -> None:
        """Client reader thread: release the arena; then either complete the handle (single
        process) or hand this rank's report to the coordinator (distributed)."""
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
            self._coordinator.data_done(pending, report, on_done=self._committed, local_error=error)
            return
        if isinstance(outcome, JobDone):
            handle._finish(outcome)
            self._committed(handle, None)
        else:
            self._committed(handle, error)

    def _committed(self, handle: SaveHandle, error: BaseException | None) -> None:
        """Any thread: record a failure, complete the handle, and only then forget it
        (``wait_all`` sees every failure of the saves it waited for)."""
        if error is None:
            logger.info(
                "checkpoint step %s durable at %s: %s", handle.step, handle.path, handle.timings
            )
        else:
            handle._error = error  # set before it is listed: wait_all reads it
            with self._lock:
                self._failed.append(handle)
            handle._fail(error)
            logger.error("checkpoint step %s at %s failed: %s", handle.step, handle.path, error)
        with self._lock:
            self._inflight.discard(handle)
        metrics.emit(metrics.event_from_handle(handle))  # listeners, Prometheus, log line

    def _arena_discarded(self, name: str) -> None:
        client = self._client
        if client is not None:
            client.release_arena(name)


def _json_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    try:
        return dict(json.loads(json.dumps(metadata, allow_nan=False)))
    except (TypeError, ValueError) as e:
        raise InvalidStateError(f"checkpoint metadata must be JSON-serialisable: {e}") from e


def _register_atexit(ckpt: AsyncCheckpointer) -> Any:
    ref = weakref.ref(ckpt)

    def _close() -> None:
        obj = ref()
        if obj is not None:
            obj.close()

    atexit.register(_close)
    return _close
