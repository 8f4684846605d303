"""How ranks agree on a save without collectives (who they are: :mod:`ckptsvc.ranks`).

Coordination of one distributed save (:class:`Coordinator`, whose docstring gives the
keys): every rank's background thread publishes a :class:`~ckptsvc.commit.reports.RankReport`;
the last rank of each node to report forwards its node's reports as one batch; rank 0's
commit thread waits (one blocking wait) until every rank is in, fetches the node batches
(``multi_get``), commits, and publishes the outcome that every other rank's background
thread waits for (one blocking wait). Rank 0's store operations per save grow with the
nodes, not the ranks (design.md, "Scale").
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckptsvc import hooks, knobs
from ckptsvc.commit.channels import COORD_DIR, Channel, FileChannel, StoreChannel, StorePool
from ckptsvc.commit.gc_hold import gc_held
from ckptsvc.commit.node_reports import decode_batches, premerge_batch
from ckptsvc.commit.reports import Merged, RankReport, merge_node_reports
from ckptsvc.errors import (
    CheckpointError,
    CoordinationError,
    SaveFailedError,
)
from ckptsvc.ranks import RankInfo
from ckptsvc.storage import Location

__all__ = [
    "COORD_DIR",
    "CoordinationError",
    "Coordinator",
    "PendingCommit",
    "default_store",
]

logger = logging.getLogger(__name__)

#: how long interpreter exit waits for commit threads that no ``close`` joined
EXIT_JOIN_S = 10.0
#: every commit thread started in this process that may still run (pruned as they end)
_THREADS: set[threading.Thread] = set()
_THREADS_LOCK = threading.Lock()


def _forget_threads_in_child() -> None:
    """A forked child has none of its parent's threads (and the lock may have been held)."""
    global _THREADS_LOCK
    _THREADS_LOCK = threading.Lock()
    _THREADS.clear()


os.register_at_fork(after_in_child=_forget_threads_in_child)


@dataclass
class PendingCommit:
    """One save of this rank between its snapshot and its outcome (see :class:`Coordinator`).

    ``path`` is where the files go: the checkpoint, or with ``replace_url`` the hidden
    successor of the committed checkpoint there. ``claim_id``: rank 0's claim of ``path``.
    """

    step: int | None
    path: str
    handle: Any
    report: RankReport
    user_metadata: dict[str, Any]
    crc_names: dict[str, tuple[str, ...]]
    sharded_docs: dict[str, dict[str, Any]]
    claim_id: str = ""
    replace_url: str = ""
    seq: int = -1
    previous: PendingCommit | None = None
    settled: threading.Event = field(default_factory=threading.Event)


class _Phases:
    """Rank 0's commit, phase by phase, reported at the ``commit.phase`` hook point (wall
    and this thread's CPU time since the previous mark); nothing when no hook is installed."""

    def __init__(self, step: int | None) -> None:
        self._step = step
        self._on = hooks.installed("commit.phase")
        self._wall = time.perf_counter()
        self._cpu = time.thread_time()

    def mark(self, phase: str) -> None:
        if not self._on:
            return
        wall, cpu = time.perf_counter(), time.thread_time()
        hooks.point(
            "commit.phase",
            phase=phase,
            step=self._step,
            wall_s=wall - self._wall,
            cpu_s=cpu - self._cpu,
        )
        self._wall, self._cpu = wall, cpu


def default_store() -> Any | None:
    """The default process group's Store, or ``None`` when there is no process group."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except (ImportError, RuntimeError, ValueError):
        pass
    return None


class Coordinator:
    """Agreement on distributed saves, with no collective and nothing on the training thread
    after the snapshot. One per ``AsyncCheckpointer`` of a multi-rank job.

    Keys live under ``ckptsvc/<root hash>/<instance>/<seq>/`` in the job's store (``seq``
    counts this checkpointer's saves, identical on every rank because every rank calls
    save in the same order; ``instance`` counts this rank's checkpointers on the same root,
    so a restarted job that keeps the store never reads stale keys):

    - ``n<node>/l<local rank>``: a rank's :class:`RankReport` (files + parts, or its error);
      ``n<node>/count``: how many ranks of the node reported;
    - ``batch/<slot>``: one node's reports merged by its leader into one node report
      (:mod:`ckptsvc.commit.node_reports`; the reports as they are, newline-separated,
      when one failed or they disagree), ``slots`` their count, ``in`` how many ranks the
      batches hold;
    - ``failed``: a copy of a failing rank's report; ``wake``: set once every rank is in,
      or by a failing rank (rank 0 waits on this one key and fails fast on ``failed``);
    - ``outcome``: rank 0's verdict, ``{"ok": true}`` or ``{"ok": false, "error": ...}``;
      ``acks``: how many ranks read it.

    1. ``begin`` (training thread, in ``save_components``): number the save.
    2. ``data_done`` (client reader thread, when this rank's writer reported): start the
       save's background thread, which publishes the rank's report and counts it on its
       node; the node's last rank (the counter reaches ``local_world_size``) fetches the
       node's reports in one ``multi_get``, merges them into one node report, publishes it
       as the node's batch and adds the node's ranks to ``in``; the batch that completes
       ``in`` sets ``wake``. Then
    3. rank 0: waits up to ``COMMIT_TIMEOUT_S`` for ``wake`` (a rank that never reports
       is named in the error), fetches the batches (``multi_get``, 256 keys a round trip),
       decodes and merges the n node reports, waits for the previous save's commit
       (manifests appear in save order), has its writer write the sharded documents and
       the manifest last, publishes ``outcome`` as soon as the manifest is durable (the
       writer deletes the marker and moves the ``latest`` pointer after that: design.md
       section 4); other ranks: one blocking wait, up to twice that, for ``outcome``;
       every rank then deletes the keys it wrote (after a success only: after a failure a
       node may still be gathering, and those few keys stay) and counts itself in ``acks``.
    4. ``on_done(handle, error)`` completes the handle on every rank with the same verdict.

    Rank 0's store operations per save: about 10 plus one ``multi_get`` per 256 nodes, plus
    its own node's gathering when it is that node's last rank. Nodes are ``node_index``
    and ``local_world_size`` of :class:`~ckptsvc.ranks.RankInfo` (``GROUP_RANK``,
    ``LOCAL_WORLD_SIZE``); without them the whole job is one node (still no polling).

    Without a store (ranks from the environment but no process group) the keys are
    fragment files under ``<checkpoint>/.ckptsvc-coord/<seq>/`` instead
    (:class:`~ckptsvc.commit.channels.FileChannel`).
    """

    def __init__(
        self,
        info: RankInfo,
        *,
        root: str,
        store: Any | None,
        commit: Callable[[PendingCommit, Merged], Any],
        storage_options: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self._info = info
        self._root = root
        self._storage_options = dict(storage_options or {})
        self._store = store if store is not None else default_store()
        # each save's thread talks through a connection of its own, reused by later saves
        self._pool = StorePool(self._store) if self._store is not None else None
        self._commit = commit
        self._timeout_s = timeout_s
        self._seq = itertools.count()
        self._last: PendingCommit | None = None
        self._lock = threading.Lock()
        # rank 0: outcomes not yet read by every rank, with how many ranks must read them
        # and the keys rank 0 wrote, deleted with them (after a success only)
        self._unacked: list[tuple[Channel, int, tuple[str, ...]]] = []
        self._threads: list[threading.Thread] = []  # this coordinator's commit threads
        digest = hashlib.sha256(root.encode()).hexdigest()[:12]
        self._prefix = f"ckptsvc/{digest}"
        if self._store is not None:
            counter = f"{self._prefix}/instances/{info.rank}"
            try:
                self._prefix += f"/{int(self._store.add(counter, 1))}"
            except Exception as e:
                raise CoordinationError(
                    f"cannot use the job's torch.distributed store ({type(e).__name__}: {e})"
                ) from e

    def close(self, timeout_s: float | None = None) -> None:
        """Rank 0: wait (bounded) until every live rank has read the outcomes, so that
        exiting, which takes the store down with it, cannot fail another rank's handle.
        Every rank: join the commit threads (bounded the same way): a handle completes
        before its thread has finished (metrics listeners, the store connection's
        teardown), and a thread still inside a torch call when the interpreter finalizes
        aborts the process (see :func:`join_commit_threads`)."""
        limit_s = min(30.0, knobs.COMMIT_TIMEOUT_S.get(self._timeout_s))
        deadline = time.monotonic() + (limit_s if timeout_s is None else timeout_s)
        delay = 0.005
        while self._sweep() and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(2 * delay, 0.2)
        with self._lock:
            threads, self._threads = self._threads, []
        join_commit_threads(threads, max(0.0, deadline - time.monotonic()))

    def _sweep(self) -> int:
        """Delete the keys of outcomes every rank acknowledged; return how many remain."""
        with self._lock:
            pending = list(self._unacked)
        done = []
        for entry in pending:
            channel, readers, own = entry
            try:
                finished = channel.add("acks", 0) >= readers
            except CheckpointError:
                finished = True  # the store is gone: nobody can read it anyway
            if finished:
                channel.delete(["outcome", "failed", "wake", "slots", "in", "acks", *own])
                channel.close()
                done.append(entry)
            else:
                channel.release()
        with self._lock:
            self._unacked = [e for e in self._unacked if e not in done]
            return len(self._unacked)

    def begin(self, pending: PendingCommit) -> None:
        pending.seq = next(self._seq)
        pending.previous, self._last = self._last, pending

    def data_done(
        self,
        pending: PendingCommit,
        report: RankReport,
        *,
        on_done: Callable[[Any, BaseException | None], None],
        local_error: BaseException | None,
    ) -> None:
        thread = threading.Thread(
            target=self._run,
            args=(pending, report, on_done, local_error),
            name=f"ckptsvc-commit-{pending.step}",
            daemon=True,  # a rank whose peer died waits up to the commit timeout
        )
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        with _THREADS_LOCK:
            for t in [t for t in _THREADS if not t.is_alive()]:
                _THREADS.discard(t)
            _THREADS.add(thread)
        thread.start()

    # ---- the background thread of one save --------------------------------------------------

    def _channel(self, pending: PendingCommit) -> Channel:
        if self._store is not None:
            return StoreChannel(self._store, f"{self._prefix}/{pending.seq}/", pool=self._pool)
        loc = Location.parse(pending.path, self._storage_options)
        return FileChannel(loc.join(COORD_DIR, str(pending.seq)))

    def _report_key(self, rank: int) -> str:
        """Where ``rank`` puts its report (ranks are laid out node by node, as launchers do;
        only the error path maps a rank number to its key)."""
        local = self._info.local_world_size
        if rank == self._info.rank:
            return f"n{self._info.node_index}/l{self._info.local_rank}"
        return f"n{rank // local}/l{rank % local}"

    def _publish(self, channel: Channel, report: RankReport) -> list[str]:
        """Step 2: this rank's report, its node's batch if it is the node's last rank;
        returns the keys this rank wrote (deleted once the outcome is out)."""
        info = self._info
        raw = report.to_json()
        if report.error is not None:
            channel.put("failed", raw)
            channel.put("wake", b"failed")
        node = f"n{info.node_index}"
        own = self._report_key(info.rank)
        channel.put(own, raw)
        written = [own]
        if channel.add(f"{node}/count", 1) == info.local_world_size:
            keys = [f"{node}/l{i}" for i in range(info.local_world_size)]
            batch = premerge_batch(channel.get_many(keys))  # one node report
            slot = f"batch/{channel.add('slots', 1)}"
            channel.put(slot, batch)
            written += [slot, f"{node}/count"]
            if channel.add("in", info.local_world_size) >= info.world_size:
                channel.put("wake", b"in")
        return written

    def _run(
        self,
        pending: PendingCommit,
        report: RankReport,
        on_done: Callable[[Any, BaseException | None], None],
        local_error: BaseException | None,
    ) -> None:
        error: BaseException | None = local_error
        written: list[str] = []
        channel: Channel | None = None
        try:
            channel = self._channel(pending)
            written = self._publish(channel, report)
            if self._info.rank == 0:
                self._sweep()
                error = self._commit_round(pending, report, channel, written)
                channel = None  # released and handed to the sweep (``_published``)
            else:
                if local_error is None:
                    error = self._await_outcome(pending, channel)
                # best effort, before the handle completes; the keys go only after a
                # success (after a failure a node may still be gathering them)
                with contextlib.suppress(CheckpointError):
                    if error is None:
                        channel.delete(written)
                    channel.add("acks", 1)
                if error is None:
                    pending.handle._finish_committed(
                        report.files, write_s=pending.handle.timings.write_s, commit_s=None
                    )
        except BaseException as e:
            error = error or e
        finally:
            if channel is not None:
                channel.release()
            previous, pending.previous = pending.previous, None
            if previous is not None:
                previous.settled.wait()
            pending.settled.set()
        on_done(pending.handle, error)

    def _timeout(self, factor: float) -> float:
        return knobs.COMMIT_TIMEOUT_S.get(self._timeout_s) * factor

    def _commit_round(
        self, pending: PendingCommit, own: RankReport, channel: Channel, written: list[str]
    ) -> BaseException | None:
        try:
            if own.error is not None:
                raise SaveFailedError(f"rank 0 failed to write its part: {own.error}")
            phases = _Phases(pending.step)
            woke = self._wake(pending, channel, phases)
            # decoding and merging allocate: no collection's pause in the middle of them
            # (a few ms of CPU; never held across a wait or a storage request)
            with gc_held():
                nodes = self._collect(pending, channel, phases, woke)
                merged = merge_node_reports(
                    nodes,
                    world_size=self._info.world_size,
                    crc_names=pending.crc_names,
                    sharded_docs=pending.sharded_docs,
                )
            phases.mark("merge")
            if pending.previous is not None:
                pending.previous.settled.wait()  # manifests appear in save order
            phases.mark("previous")
            done = self._commit(pending, merged)
            phases.mark("storage")
        except BaseException as e:
            error = (
                e if isinstance(e, CheckpointError) else SaveFailedError(f"{type(e).__name__}: {e}")
            )
            if error is not e:
                error.__cause__ = e
            with contextlib.suppress(CheckpointError):
                channel.put("outcome", _outcome(error))
            self._published(channel, written, error)
            return error
        channel.put("outcome", _outcome(None))
        phases.mark("outcome")
        self._published(channel, written, None)
        pending.handle._finish_committed(
            merged.files, write_s=pending.handle.timings.write_s, commit_s=done.commit_s
        )
        return None

    def _published(self, channel: Channel, written: list[str], error: BaseException | None) -> None:
        """Rank 0, the outcome out: wait for the other ranks' acks (registered before the
        handle completes, so ``close`` sees it); its own keys go with the outcome's, in a
        later sweep (no round trip between the outcome and the handle's completion)."""
        gone = set(getattr(error, "missing", ()))
        readers = sum(1 for r in range(1, self._info.world_size) if r not in gone)
        # after a failure a node may still be gathering: the keys stay
        own = tuple(written) if error is None else ()
        channel.release()  # a sweep takes a connection when it needs one
        with self._lock:
            self._unacked.append((channel, readers, own))

    def _wake(self, pending: PendingCommit, channel: Channel, phases: _Phases) -> bool:
        """Rank 0's one blocking wait: every rank is in, or one failed (``False``: timeout)."""
        woke = channel.wait(["wake"], self._timeout(1.0))
        phases.mark("wake")
        return woke

    def _collect(
        self, pending: PendingCommit, channel: Channel, phases: _Phases, woke: bool
    ) -> list[dict[str, Any]]:
        world = self._info.world_size
        if not woke:
            keys = [self._report_key(r) for r in range(world)]
            got = channel.present(keys)
            missing = [r for r, k in enumerate(keys) if k not in got]
            raise CoordinationError(
                f"save of step {pending.step} to {pending.path}: ranks {missing} did not "
                f"report within {self._timeout(1.0)} s (CKPTSVC_COMMIT_TIMEOUT_S); they died or "
                "never called save for this step. No manifest was written",
                missing=missing,
            )
        # "in": every node's batch is there (a failed rank's report among them: the merge
        # names it); "failed": a rank failed before everyone was in (it sets "wake" before
        # it counts itself, so a later "in" overwrites it only once all batches exist)
        (why,) = channel.get_many(["wake"])
        if why != b"in":
            (raw,) = channel.get_many(["failed"])
            failed = RankReport.from_json(raw, where="failed report")
            raise SaveFailedError(
                f"rank {failed.rank} failed to write its part of step {pending.step}: "
                f"{failed.error_type}: {failed.error}"
            )
        nodes = -(-world // self._info.local_world_size)  # one batch per node
        batches = channel.get_many([f"batch/{i}" for i in range(1, nodes + 1)])
        phases.mark("fetch")
        reports = decode_batches(batches)
        phases.mark("decode")
        ranks = [r for node in reports for r in node["ranks"]]
        if ranks != list(range(world)):
            raise CoordinationError(
                f"save of step {pending.step} to {pending.path}: the node batches hold ranks "
                f"{ranks[:20]}..., not 0..{world - 1}; LOCAL_WORLD_SIZE / "
                "GROUP_RANK must describe the job's nodes (every node the same size)"
            )
        return reports

    def _await_outcome(self, pending: PendingCommit, channel: Channel) -> BaseException | None:
        if not channel.wait(["outcome"], self._timeout(2.0)):
            return CoordinationError(
                f"save of step {pending.step} to {pending.path}: rank 0 published no outcome "
                f"within {self._timeout(2.0)} s; the checkpoint is not committed"
            )
        (raw,) = channel.get_many(["outcome"])
        doc = json.loads(raw)
        if doc.get("ok"):
            return None
        return SaveFailedError(
            f"save of step {pending.step} to {pending.path} failed (rank 0's verdict): "
            f"{doc.get('error_type')}: {doc.get('error')}"
        )


def join_commit_threads(threads: list[threading.Thread], timeout_s: float) -> list[str]:
    """Join ``threads`` within ``timeout_s`` in all; return the names of those still running.

    A commit thread spends its time in torch's store calls, which release the GIL. One
    that comes back from such a call while the interpreter finalizes cannot take the GIL
    back: CPython before 3.14 ends the thread with ``pthread_exit``, whose unwinding reaches
    a ``noexcept`` C++ destructor (pybind11's GIL guard), and ``std::terminate`` aborts
    the process ("terminate called without an active exception", exit status -6) after
    its work was done. So every commit thread is finished before the interpreter is: by
    ``close`` and, for a checkpointer never closed, at exit (``EXIT_JOIN_S``)."""
    deadline = time.monotonic() + timeout_s
    for t in threads:
        if t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive() and t is not threading.current_thread()]
    if alive:
        logger.warning(
            "commit threads %s still running after %.1f s (a save whose outcome is still "
            "awaited); if the interpreter exits while one is inside a store call, the "
            "process aborts at exit",
            alive,
            timeout_s,
        )
    return alive


@atexit.register
def _join_at_exit() -> None:
    """The last ``atexit`` callback of ckptsvc (registered first): commit threads of
    checkpointers never closed, joined while the interpreter is whole."""
    with _THREADS_LOCK:
        threads = [t for t in _THREADS if t.is_alive()]
    if threads:
        join_commit_threads(threads, EXIT_JOIN_S)


def _outcome(error: BaseException | None) -> bytes:
    if error is None:
        return json.dumps({"ok": True}).encode()
    return json.dumps(
        {"ok": False, "error": str(error), "error_type": type(error).__name__}
    ).encode()
