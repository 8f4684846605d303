"""How ranks agree on a save without collectives (who they are: :mod:`ckptsvc.ranks`).

Coordination of one distributed save (:class:`Coordinator`, whose docstring gives the
keys): every rank's background thread publishes a :class:`~ckptsvc.commit.reports.RankReport`;
rank 0's commit thread waits for all of them, commits, and publishes the outcome that
every other rank's background thread waits for.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptsvc import knobs
from ckptsvc.commit.reports import Merged, RankReport, merge_reports
from ckptsvc.errors import (
    CheckpointError,
    CoordinationError,
    SaveFailedError,
    StorageNotFoundError,
)
from ckptsvc.ranks import RankInfo
from ckptsvc.storage import Location

__all__ = [
    "CoordinationError",
    "Coordinator",
    "PendingCommit",
    "default_store",
]


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


class _Channel:
    """Keys and values (bytes) shared by the ranks of one save."""

    def put(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def present(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` exist (a cheap all-present check first)."""
        raise NotImplementedError

    def delete(self, keys: Sequence[str]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Every key of this save was read by everyone: release what is left."""


class _StoreChannel(_Channel):
    """A ``torch.distributed`` Store under a per-save prefix (``PrefixStore``)."""

    def __init__(self, store: Any, prefix: str) -> None:
        from torch.distributed import PrefixStore

        self._store = PrefixStore(prefix, store)
        self._prefix = prefix

    def _call(self, what: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as e:
            raise CoordinationError(
                f"the job's torch.distributed store failed during {what} under {self._prefix!r} "
                f"({type(e).__name__}: {e}); rank 0 (which hosts it) or the network is gone"
            ) from e

    def put(self, key: str, value: bytes) -> None:
        # Store.set takes bytes too (its stub says str): no decode/encode round trip
        self._call(f"set {key}", lambda: self._store.set(key, value))  # type: ignore[arg-type]

    def get(self, key: str) -> bytes:
        return bytes(self._call(f"get {key}", lambda: self._store.get(key)))

    def present(self, keys: Sequence[str]) -> set[str]:
        if not keys:
            return set()
        if self._call("check", lambda: self._store.check(list(keys))):
            return set(keys)
        return {k for k in keys if self._call(f"check {k}", lambda k=k: self._store.check([k]))}

    def delete(self, keys: Sequence[str]) -> None:
        for k in keys:
            with contextlib.suppress(Exception):
                self._store.delete_key(k)


class _FileChannel(_Channel):
    """Fragment files under ``<checkpoint>/.ckptsvc-coord/<seq>/`` (no store in the job)."""

    def __init__(self, loc: Location) -> None:
        self._loc = loc

    def put(self, key: str, value: bytes) -> None:
        self._loc.join(key.replace("/", "-")).publish(value)

    def get(self, key: str) -> bytes:
        return self._loc.join(key.replace("/", "-")).read_bytes()

    def present(self, keys: Sequence[str]) -> set[str]:
        try:
            names = {c.name for c in self._loc.list_children()}
        except StorageNotFoundError:
            return set()
        return {k for k in keys if k.replace("/", "-") in names}

    def delete(self, keys: Sequence[str]) -> None:
        for k in keys:
            with contextlib.suppress(Exception):
                self._loc.join(k.replace("/", "-")).remove(missing_ok=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loc.remove(recursive=True, missing_ok=True)
        if self._loc.is_local:
            with contextlib.suppress(OSError):
                os.rmdir(self._loc.parent.path)  # only if no other save's keys are left


COORD_DIR = ".ckptsvc-coord"
_POLL_MIN_S = 0.005
_POLL_MAX_S = 0.2


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

    - ``report/<rank>``: the rank's :class:`RankReport` (files + parts, or its error);
    - ``failed``: a copy of the first failing rank's report (rank 0 fails fast on it);
    - ``outcome``: rank 0's verdict, ``{"ok": true}`` or ``{"ok": false, "error": ...}``.

    1. ``begin`` (training thread, in ``save_components``): number the save.
    2. ``data_done`` (client reader thread, when this rank's writer reported): start the
       save's background thread, which publishes ``report/<rank>`` (and ``failed``), then
    3. rank 0: waits up to ``COMMIT_TIMEOUT_S`` for every report (a rank that never
       reports is named in the error), merges and validates them, waits for the previous
       save's commit (manifests appear in save order), has its writer write index,
       documents and manifest last, publishes ``outcome`` and deletes the reports;
       other ranks: wait up to twice that for ``outcome``.
    4. ``on_done(handle, error)`` completes the handle on every rank with the same verdict.

    Without a store (ranks from the environment but no process group) the keys are
    fragment files under ``<checkpoint>/.ckptsvc-coord/<seq>/`` instead.
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
        self._commit = commit
        self._timeout_s = timeout_s
        self._seq = itertools.count()
        self._last: PendingCommit | None = None
        self._lock = threading.Lock()
        # rank 0: outcomes not yet read by every rank, with the ranks expected to read them
        self._unacked: list[tuple[_Channel, tuple[int, ...]]] = []
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
        exiting, which takes the store down with it, cannot fail another rank's handle."""
        limit_s = min(30.0, knobs.COMMIT_TIMEOUT_S.get(self._timeout_s))
        deadline = time.monotonic() + (limit_s if timeout_s is None else timeout_s)
        while self._sweep() and time.monotonic() < deadline:
            time.sleep(_POLL_MAX_S)

    def _sweep(self) -> int:
        """Delete the keys of outcomes every rank acknowledged; return how many remain."""
        with self._lock:
            pending = list(self._unacked)
        done = []
        for entry in pending:
            channel, ranks = entry
            acks = [f"ack/{r}" for r in ranks]
            try:
                finished = len(channel.present(acks)) == len(acks)
            except CheckpointError:
                finished = True  # the store is gone: nobody can read it anyway
            if finished:
                channel.delete(["outcome", "failed", *acks])
                channel.close()
                done.append(entry)
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
        threading.Thread(
            target=self._run,
            args=(pending, report, on_done, local_error),
            name=f"ckptsvc-commit-{pending.step}",
            daemon=True,
        ).start()

    # ---- the background thread of one save --------------------------------------------------

    def _channel(self, pending: PendingCommit) -> _Channel:
        if self._store is not None:
            return _StoreChannel(self._store, f"{self._prefix}/{pending.seq}/")
        loc = Location.parse(pending.path, self._storage_options)
        return _FileChannel(loc.join(COORD_DIR, str(pending.seq)))

    def _run(
        self,
        pending: PendingCommit,
        report: RankReport,
        on_done: Callable[[Any, BaseException | None], None],
        local_error: BaseException | None,
    ) -> None:
        error: BaseException | None = local_error
        try:
            channel = self._channel(pending)
            raw = report.to_json()
            channel.put(f"report/{self._info.rank}", raw)
            if report.error is not None:
                channel.put("failed", raw)
            if self._info.rank == 0:
                self._sweep()
                error = self._commit_round(pending, report, channel)
                gone = set(getattr(error, "missing", ()))
                readers = tuple(r for r in range(1, self._info.world_size) if r not in gone)
                with self._lock:
                    self._unacked.append((channel, readers))
            else:
                if local_error is None:
                    error = self._await_outcome(pending, channel)
                with contextlib.suppress(
                    CheckpointError
                ):  # best effort; before the handle completes
                    channel.put(f"ack/{self._info.rank}", b"1")
                if error is None:
                    pending.handle._finish_committed(
                        report.files, write_s=pending.handle.timings.write_s, commit_s=None
                    )
        except BaseException as e:
            error = error or e
        finally:
            previous, pending.previous = pending.previous, None
            if previous is not None:
                previous.settled.wait()
            pending.settled.set()
        on_done(pending.handle, error)

    def _deadline(self, factor: float) -> float:
        return time.monotonic() + knobs.COMMIT_TIMEOUT_S.get(self._timeout_s) * factor

    def _commit_round(
        self, pending: PendingCommit, own: RankReport, channel: _Channel
    ) -> BaseException | None:
        keys = [f"report/{r}" for r in range(self._info.world_size)]
        try:
            if own.error is not None:
                raise SaveFailedError(f"rank 0 failed to write its part: {own.error}")
            reports = self._collect(pending, channel, keys)
            merged = merge_reports(
                reports,
                world_size=self._info.world_size,
                crc_names=pending.crc_names,
                sharded_docs=pending.sharded_docs,
            )
            if pending.previous is not None:
                pending.previous.settled.wait()  # manifests appear in save order
            done = self._commit(pending, merged)
        except BaseException as e:
            error = (
                e if isinstance(e, CheckpointError) else SaveFailedError(f"{type(e).__name__}: {e}")
            )
            if error is not e:
                error.__cause__ = e
            with contextlib.suppress(CheckpointError):
                channel.put("outcome", _outcome(error))
            channel.delete(keys)
            return error
        channel.put("outcome", _outcome(None))
        channel.delete(keys)
        pending.handle._finish_committed(
            merged.files, write_s=pending.handle.timings.write_s, commit_s=done.commit_s
        )
        return None

    def _collect(
        self, pending: PendingCommit, channel: _Channel, keys: list[str]
    ) -> list[RankReport]:
        deadline = self._deadline(1.0)
        delay = _POLL_MIN_S
        while True:
            if channel.present(["failed"]):
                failed = RankReport.from_json(channel.get("failed"), where="failed report")
                raise SaveFailedError(
                    f"rank {failed.rank} failed to write its part of step {pending.step}: "
                    f"{failed.error_type}: {failed.error}"
                )
            got = channel.present(keys)
            if len(got) == len(keys):
                return [RankReport.from_json(channel.get(k), where=k) for k in keys]
            if time.monotonic() > deadline:
                missing = [int(k.rsplit("/", 1)[1]) for k in keys if k not in got]
                raise CoordinationError(
                    f"save of step {pending.step} to {pending.path}: ranks {missing} did not "
                    f"report within {knobs.COMMIT_TIMEOUT_S.get(self._timeout_s)} s "
                    "(CKPTSVC_COMMIT_TIMEOUT_S); they died or never called save for this step. "
                    "No manifest was written",
                    missing=missing,
                )
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)

    def _await_outcome(self, pending: PendingCommit, channel: _Channel) -> BaseException | None:
        deadline = self._deadline(2.0)
        delay = _POLL_MIN_S
        while not channel.present(["outcome"]):
            if time.monotonic() > deadline:
                return CoordinationError(
                    f"save of step {pending.step} to {pending.path}: rank 0 published no outcome "
                    f"within {2 * knobs.COMMIT_TIMEOUT_S.get(self._timeout_s)} s; the checkpoint "
                    "is not committed"
                )
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)
        doc = json.loads(channel.get("outcome"))
        if doc.get("ok"):
            return None
        return SaveFailedError(
            f"save of step {pending.step} to {pending.path} failed (rank 0's verdict): "
            f"{doc.get('error_type')}: {doc.get('error')}"
        )


def _outcome(error: BaseException | None) -> bytes:
    if error is None:
        return json.dumps({"ok": True}).encode()
    return json.dumps(
        {"ok": False, "error": str(error), "error_type": type(error).__name__}
    ).encode()
