"""Tiered checkpoints: durable on fast local disk in seconds, then copied to S3/GCS.

A save lands as a complete, committed checkpoint under ``local_root`` (the normal layout,
``<root>/checkpoints/checkpoint-<id>``); :class:`TieredStore` then replicates it to the
same relative path under ``remote_root`` in the background, with the usual commit
protocol there (marker first, files, manifest last). Resume prefers an intact local copy
and falls back to the remote one; local copies beyond ``keep_local`` are pruned only once
their remote copy is committed.

Every byte copied is checked against the local manifest's size and CRC-32C while it
streams, before the remote upload is completed: a local file that rotted never becomes a
remote checkpoint. On GCS the store's own CRC-32C of each object is compared as well.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ckptsvc import knobs
from ckptsvc.commit.target import SaveTarget, write_claimed
from ckptsvc.engine.sync_save import save_checkpoint
from ckptsvc.errors import ConfigError, CorruptCheckpointError, IncompleteCheckpointError
from ckptsvc.format.manifest import Manifest
from ckptsvc.ops.retention import delete_checkpoint
from ckptsvc.ops.verified_copy import CopyProgress, copy_records
from ckptsvc.read.discovery import (
    CHECKPOINTS_DIR,
    CheckpointInfo,
    CheckpointStatus,
    checkpoint_info,
    list_checkpoints,
    refuse_unloadable,
)
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.storage import Location
from ckptsvc.workers.commit import commit_checkpoint

__all__ = ["ReplicationResult", "TieredStore", "replicate_checkpoint"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicationResult:
    """One checkpoint copied and committed on the remote side."""

    checkpoint_id: str
    local_url: str
    remote_url: str
    files: int
    nbytes: int
    seconds: float


def _check_remote(remote: Location, manifest: Manifest) -> None:
    """Sizes of the uploaded files (one listing) and, where the store keeps one (GCS), its
    own CRC-32C of each file."""
    sizes = dict(remote.walk_files())
    for rec in manifest.files:
        got = sizes.get(rec.path)
        if got != rec.nbytes:
            raise CorruptCheckpointError(
                f"{remote.join(rec.path).url}: {got} bytes after upload, expected {rec.nbytes}"
            )
        stored = remote.join(rec.path).stored_crc32c()
        if stored is not None and stored != rec.crc32c:
            raise CorruptCheckpointError(
                f"{remote.join(rec.path).url}: the store's CRC-32C is {stored}, "
                f"expected {rec.crc32c}"
            )


def replicate_checkpoint(local: Location | str, remote: Location | str) -> Manifest:
    """Copy one committed checkpoint to ``remote`` and commit it there; blocks.

    Order on the remote side: its claim (in-progress marker; a committed remote copy is
    replaced only once the new one committed beside it), every file of the local manifest
    (in parallel, each verified while it streams), a size check, then the manifest last
    (its ``checkpoint_path`` names the remote copy). Returns the remote manifest.
    """
    src = Location.parse(local)
    dst = Location.parse(remote)
    info = checkpoint_info(src)
    refuse_unloadable(info, hint="only committed checkpoints are replicated")
    manifest = info.manifest
    if manifest is None:  # refuse_unloadable raised; for the type checker
        raise IncompleteCheckpointError(f"{src.url} has no manifest")
    remote_manifest = dataclasses.replace(manifest, checkpoint_path=dst.url)
    threads = max(1, min(knobs.IO_THREADS.get(), len(manifest.files)))

    def write(directory: Location, target: SaveTarget) -> None:
        # the one verified copy (cp's too): size and CRC-32C checked before each upload ends
        copy_records(
            src,
            directory,
            manifest.files,
            jobs=threads,
            progress=CopyProgress(manifest.total_nbytes, None),
        )
        _check_remote(directory, manifest)
        commit_checkpoint(directory, remote_manifest, claim_id=target.claim_id)

    write_claimed(dst, overwrite=True, write=write)  # a committed remote copy is replaced
    return remote_manifest


def _same_files(a: Manifest, b: Manifest) -> bool:
    return sorted(dataclasses.astuple(f) for f in a.files) == sorted(
        dataclasses.astuple(f) for f in b.files
    )


class TieredStore:
    """A local root and a remote root holding the same checkpoints.

    1. The trainer saves to :meth:`local_path` (``save_checkpoint``, the async engine, ...)
       or through :meth:`save`; the local checkpoint is complete when that returns.
    2. :meth:`replicate` (or :meth:`on_local_commit`, for an engine that knows the path)
       queues the copy and returns a ``Future``; one background thread replicates
       checkpoints in the order they were queued, each file on a thread pool, then prunes
       local copies beyond ``keep_local`` whose remote copy is committed.
    3. On restart, :meth:`replicate_pending` queues local checkpoints the remote lacks, and
       :meth:`find_latest` picks where to resume: the newest checkpoint, its local copy if
       intact (sizes and CRC-32C), else its remote copy, else an older one.
    4. :meth:`close` waits for queued replications.
    """

    def __init__(
        self,
        local_root: str,
        remote_root: str,
        *,
        keep_local: int = 2,
        storage_options: dict[str, Any] | None = None,
        local_storage_options: dict[str, Any] | None = None,
        verify_remote_crc: bool = False,
    ) -> None:
        if keep_local < 1:
            raise ConfigError(f"keep_local must be at least 1, not {keep_local}")
        self.local_root = local_root
        self.remote_root = remote_root
        self.keep_local = keep_local
        self.storage_options = dict(storage_options or {})
        self.local_storage_options = dict(local_storage_options or {})
        self.verify_remote_crc = verify_remote_crc
        self._local = Location.parse(local_root, self.local_storage_options)
        self._remote = Location.parse(remote_root, self.storage_options)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptsvc-tiering")
        self._lock = threading.Lock()
        self._queued: dict[str, Future[ReplicationResult]] = {}

    # ---- naming ----------------------------------------------------------------------------
    def local_path(self, checkpoint_id: int | str) -> str:
        return self._local.join(CHECKPOINTS_DIR, f"checkpoint-{checkpoint_id}").url

    def remote_path(self, checkpoint_id: int | str) -> str:
        return self._remote.join(CHECKPOINTS_DIR, f"checkpoint-{checkpoint_id}").url

    # ---- step 1 ----------------------------------------------------------------------------
    def save(
        self, checkpoint_id: int | str, module: Any, **save_kwargs: Any
    ) -> Future[ReplicationResult]:
        """``save_checkpoint`` to the local copy (blocking), then :meth:`replicate`."""
        save_checkpoint(
            self.local_path(checkpoint_id),
            module,
            storage_options=self.local_storage_options,
            **save_kwargs,
        )
        return self.replicate(checkpoint_id)

    # ---- step 2 ----------------------------------------------------------------------------
    def replicate(self, checkpoint_id: int | str) -> Future[ReplicationResult]:
        """Queue the copy of a committed local checkpoint; the same id queued twice shares
        one future while it is pending."""
        cid = str(checkpoint_id)
        with self._lock:
            pending = self._queued.get(cid)
            if pending is not None and not pending.done():
                return pending
            future = self._executor.submit(self._replicate_now, cid)
            self._queued[cid] = future
        return future

    def on_local_commit(self, local_checkpoint: str) -> Future[ReplicationResult]:
        """For a save engine: call after committing ``local_checkpoint`` (a path under
        ``local_root/checkpoints``); returns the replication's future."""
        loc = Location.parse(local_checkpoint, self.local_storage_options)
        prefix = "checkpoint-"
        if loc.parent.path != self._local.join(CHECKPOINTS_DIR).path or not loc.name.startswith(
            prefix
        ):
            raise ConfigError(
                f"{loc.url} is not a checkpoint-<id> directory under "
                f"{self._local.join(CHECKPOINTS_DIR).url}"
            )
        return self.replicate(loc.name[len(prefix) :])

    def _replicate_now(self, cid: str) -> ReplicationResult:
        started = time.monotonic()
        local = Location.parse(self.local_path(cid), self.local_storage_options)
        remote = Location.parse(self.remote_path(cid), self.storage_options)
        manifest = replicate_checkpoint(local, remote)
        result = ReplicationResult(
            checkpoint_id=cid,
            local_url=local.url,
            remote_url=remote.url,
            files=len(manifest.files),
            nbytes=manifest.total_nbytes,
            seconds=time.monotonic() - started,
        )
        logger.info(
            "replicated %s to %s (%d bytes in %.1fs)",
            local.url,
            remote.url,
            result.nbytes,
            result.seconds,
        )
        try:
            self.prune_local()
        except Exception as e:  # a later prune retries; the replication itself succeeded
            logger.warning("pruning local checkpoints under %s failed: %s", self._local.url, e)
        return result

    def replicate_pending(self) -> list[Future[ReplicationResult]]:
        """Queue every committed local checkpoint whose remote copy is not committed."""
        remote_ids = self._committed_remote_ids()
        futures = []
        for info in list_checkpoints(self._local):
            if info.status is CheckpointStatus.COMPLETE and info.checkpoint_id not in remote_ids:
                futures.append(self.replicate(info.checkpoint_id))
        return futures

    def _committed_remote_ids(self) -> set[str]:
        return {
            i.checkpoint_id
            for i in list_checkpoints(self._remote)
            if i.status is CheckpointStatus.COMPLETE
        }

    # ---- pruning ---------------------------------------------------------------------------
    def prune_local(self) -> list[str]:
        """Delete local checkpoints beyond the newest ``keep_local``, but only those whose
        remote copy is committed with the same files (sizes and CRC-32C). Returns the
        URLs deleted."""
        local = [i for i in list_checkpoints(self._local) if i.status is CheckpointStatus.COMPLETE]
        excess = local[: max(0, len(local) - self.keep_local)]  # oldest first
        deleted = []
        for info in excess:
            remote = checkpoint_info(
                self.remote_path(info.checkpoint_id), storage_options=self.storage_options
            )
            if (
                remote.status is not CheckpointStatus.COMPLETE
                or remote.manifest is None
                or info.manifest is None
                or not _same_files(info.manifest, remote.manifest)
            ):
                logger.info("keeping %s: its remote copy is not committed yet", info.url)
                continue
            delete_checkpoint(info.location)
            deleted.append(info.url)
        return deleted

    # ---- step 3 ----------------------------------------------------------------------------
    def find_latest(self) -> str | None:
        """Where to resume: the newest checkpoint on either side, preferring its local
        copy when that verifies (sizes and CRC-32C), else its remote copy (sizes; CRC-32C
        too with ``verify_remote_crc``); a copy that fails is skipped with a warning."""
        candidates: dict[str, list[tuple[str, CheckpointInfo]]] = {}
        for side, root in (("local", self._local), ("remote", self._remote)):
            for info in list_checkpoints(root):
                if info.status is CheckpointStatus.COMPLETE:
                    candidates.setdefault(info.checkpoint_id, []).append((side, info))
        order = sorted(
            candidates.values(),
            key=lambda copies: max(i.sort_key() for _, i in copies),
            reverse=True,
        )
        for copies in order:
            for side, info in sorted(copies, key=lambda c: c[0] != "local"):  # local first
                deep = side == "local" or self.verify_remote_crc
                report = verify_checkpoint(info.location, deep=deep)
                if report.ok:
                    return info.url
                logger.warning(
                    "not resuming from %s: %s",
                    info.url,
                    "; ".join(p.detail for p in report.problems[:3]),
                )
        return None

    # ---- step 4 ----------------------------------------------------------------------------
    def wait(self, timeout_s: float | None = None) -> list[ReplicationResult]:
        """Wait for every queued replication; raises the first failure."""
        with self._lock:
            futures = list(self._queued.values())
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results = []
        for f in futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            results.append(f.result(timeout=left))
        return results

    def close(self) -> None:
        """Finish queued replications and stop the background thread."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
