"""Copy checkpoints between any two locations (local, S3, GCS, any fsspec URL), verified;
prune a model directory down to its newest checkpoints.

- :func:`copy_checkpoint` copies one complete checkpoint;
- :func:`copy_tree` copies every complete checkpoint under a model directory (into
  ``<dst>/checkpoints/<same name>``); incomplete and manifest-less ones are skipped and
  reported;
- :func:`copy` picks one of the two by what ``src`` is (``ckptsvc cp``);
- :func:`copy_files` copies some files of a checkpoint into a plain directory (no commit
  protocol: the destination is not a checkpoint), each verified;
- :func:`prune` keeps the newest ``keep`` checkpoints (``ckptsvc prune``).

Call order of one checkpoint copy (the calling thread unless noted):

1. read the source manifest; a checkpoint without one is refused (nothing to verify
   against), an incomplete one too;
2. look at the destination: a manifest of the same commit (timestamp, step and files) means
   "up to date" and the checkpoint is skipped; a different one needs ``overwrite=True``;
3. claim ``dst`` (:func:`~ckptsvc.commit.target.write_claimed`): its in-progress marker,
   created exclusively; with ``overwrite`` a committed ``dst`` is kept while the copy goes
   to its hidden successor, swapped in after step 5;
4. every file the manifest lists, largest first, on ``jobs`` copy threads: stream source
   chunks into the destination's sink (multipart / resumable upload on object stores)
   with CRC-32C on the way; a size or CRC mismatch aborts the upload *before* it is
   completed, so the destination never holds a wrong file. On GCS the store's own
   CRC-32C of the new object is compared as well;
5. ``commit_checkpoint(dst, manifest)``: the source manifest (same timestamp, step and
   file records; ``checkpoint_path`` names the destination) last, then the marker goes.

A failure in 3-4 leaves the destination incomplete (marker, no manifest): invisible to
discovery, collected by ``gc``, and repaired by running the copy again. The manifest keeps
its commit timestamp, so ``find_latest_checkpoint`` orders copies as it ordered originals.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from ckptsvc import knobs
from ckptsvc.commit.target import SaveTarget, write_claimed
from ckptsvc.errors import (
    CheckpointNotFoundError,
    CommitConflictError,
    ConfigError,
    CorruptCheckpointError,
)
from ckptsvc.format.checksum import Crc32c
from ckptsvc.format.manifest import FileRecord, Manifest
from ckptsvc.ops.retention import delete_checkpoint, select_for_deletion
from ckptsvc.read.discovery import (
    CHECKPOINTS_DIR,
    CheckpointInfo,
    CheckpointStatus,
    checkpoint_info,
    list_checkpoints,
    refuse_unloadable,
)
from ckptsvc.storage import Location
from ckptsvc.workers.commit import commit_checkpoint

__all__ = [
    "CopiedCheckpoint",
    "CopyReport",
    "ProgressFn",
    "PruneReport",
    "copy",
    "copy_checkpoint",
    "copy_files",
    "copy_tree",
    "prune",
]

logger = logging.getLogger(__name__)

#: ``progress(bytes_done, bytes_total)``; called from copy threads, one call at a time
ProgressFn = Callable[[int, int], None]

#: ``ckptsvc.manager.META_KEY``, spelled out: the manager imports torch, prune does not
_MANAGER_META_KEY = "ckptsvc_manager"


@dataclass(frozen=True)
class CopiedCheckpoint:
    """One checkpoint of a copy: ``status`` is ``"copied"`` or ``"up-to-date"``."""

    src: str
    dst: str
    status: str
    files: int
    nbytes: int


@dataclass(frozen=True)
class CopyReport:
    """What :func:`copy`, :func:`copy_checkpoint` or :func:`copy_tree` did.

    ``skipped`` lists ``(source URL, why)`` of checkpoints that were not copied
    (incomplete, or without a manifest).
    """

    src: str
    dst: str
    checkpoints: tuple[CopiedCheckpoint, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    elapsed_s: float = 0.0

    @property
    def nbytes_copied(self) -> int:
        return sum(c.nbytes for c in self.checkpoints if c.status == "copied")

    @property
    def files_copied(self) -> int:
        return sum(c.files for c in self.checkpoints if c.status == "copied")

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "checkpoints": [c.__dict__ for c in self.checkpoints],
            "skipped": [{"src": s, "reason": why} for s, why in self.skipped],
            "files_copied": self.files_copied,
            "nbytes_copied": self.nbytes_copied,
            "elapsed_s": round(self.elapsed_s, 3),
        }


# ---- one file ----------------------------------------------------------------------------------


class _Progress:
    """Thread-safe byte counter that reports to the caller's callback, one call at a time."""

    def __init__(self, total_nbytes: int, callback: ProgressFn | None) -> None:
        self.total_nbytes = total_nbytes
        self.done_nbytes = 0
        self._callback = callback
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done_nbytes += nbytes
            if self._callback is not None:
                self._callback(self.done_nbytes, self.total_nbytes)


class _Cancelled(Exception):
    """Another file of the same copy failed: stop streaming this one."""


def _copy_file(
    src: Location,
    dst: Location,
    rec: FileRecord,
    *,
    progress: _Progress,
    stop: threading.Event,
) -> None:
    """Stream ``src`` to ``dst`` in chunks, checking size and CRC-32C against ``rec`` before
    the destination file is completed (copy thread)."""
    chunk_nbytes = knobs.WRITE_CHUNK_BYTES.get()
    crc = Crc32c()
    sink = dst.open_sink()
    sent = 0
    try:
        while sent < rec.nbytes:
            if stop.is_set():
                raise _Cancelled
            data = src.read_range(sent, min(rec.nbytes, sent + chunk_nbytes))
            if not data:
                break
            crc.update(data)
            sink.write(data)
            sent += len(data)
            progress.add(len(data))
        if sent != rec.nbytes:  # the committed bytes are copied; a longer source is not read
            raise CorruptCheckpointError(
                f"{src.url} has {sent} bytes but the manifest says {rec.nbytes}; the source "
                "checkpoint is damaged (run `ckptsvc verify` on it)"
            )
        if crc.hexdigest() != rec.crc32c:
            raise CorruptCheckpointError(
                f"{src.url}: CRC-32C of the bytes read is {crc.hexdigest()} but the manifest says "
                f"{rec.crc32c}; the source checkpoint is damaged (run `ckptsvc verify` on it)"
            )
        sink.close()
    except BaseException:
        sink.abort()
        raise
    stored = dst.stored_crc32c()
    if stored is not None and stored != rec.crc32c:
        raise CorruptCheckpointError(
            f"{dst.url}: the store reports CRC-32C {stored} for the uploaded object but "
            f"{rec.crc32c} was sent; copy again"
        )


def _copy_records(
    src_dir: Location,
    dst_dir: Location,
    records: Sequence[FileRecord],
    *,
    jobs: int,
    progress: _Progress,
) -> None:
    """Copy every record's file on ``jobs`` threads, largest first; the first error stops
    the others (their partial uploads are aborted) and is raised."""
    stop = threading.Event()

    def one(rec: FileRecord) -> None:
        try:
            _copy_file(
                src_dir.join(rec.path), dst_dir.join(rec.path), rec, progress=progress, stop=stop
            )
        except BaseException:
            stop.set()
            raise

    ordered = sorted(records, key=lambda r: (-r.nbytes, r.path))
    with ThreadPoolExecutor(max(1, min(jobs, len(ordered) or 1)), "ckptsvc-cp") as pool:
        futures = [pool.submit(one, rec) for rec in ordered]
    errors = [e for f in futures if (e := f.exception()) is not None]
    real = [e for e in errors if not isinstance(e, _Cancelled)]
    if real:
        raise real[0]


# ---- checkpoints -------------------------------------------------------------------------------


def _source_manifest(info: CheckpointInfo) -> Manifest:
    if info.status is CheckpointStatus.COMPLETE and info.manifest is not None:
        return info.manifest
    refuse_unloadable(
        info, legacy_ok=True, hint="copy a complete one (`ckptsvc ls` shows which are)"
    )
    if info.status is CheckpointStatus.LEGACY:
        raise ConfigError(
            f"{info.url} has no checkpoint manifest (a legacy checkpoint): there is nothing "
            "to verify the copy against; copy it with your storage tool instead"
        )
    raise CheckpointNotFoundError(f"{info.url}: no checkpoint here ({info.reason})")


def _same_commit(a: Manifest, b: Manifest) -> bool:
    return (a.timestamp, a.step, sorted(a.files, key=lambda f: f.path)) == (
        b.timestamp,
        b.step,
        sorted(b.files, key=lambda f: f.path),
    )


def _up_to_date(manifest: Manifest, dst: Location, *, overwrite: bool) -> bool:
    """True if ``dst`` already holds this very commit; raise if it holds another one."""
    existing = checkpoint_info(dst)
    if existing.status is CheckpointStatus.COMPLETE and existing.manifest is not None:
        if _same_commit(existing.manifest, manifest):
            return True
        if not overwrite:
            raise CommitConflictError(
                f"{dst.url} already holds a different checkpoint (step {existing.step}, committed "
                f"{existing.manifest.timestamp}); pass overwrite=True (`--overwrite`) to replace it"
            )
    elif existing.status is CheckpointStatus.LEGACY and not overwrite:
        raise CommitConflictError(
            f"{dst.url} already holds a checkpoint without a manifest; pass overwrite=True "
            "(`--overwrite`) to replace it"
        )
    return False


def _check_distinct(src: Location, dst: Location) -> None:
    if type(src.fs) is type(dst.fs) and src.path.rstrip("/") == dst.path.rstrip("/"):
        raise ConfigError(f"source and destination are the same location: {src.url}")


def _copy_one(
    src: Location,
    manifest: Manifest,
    dst: Location,
    *,
    jobs: int,
    progress: _Progress,
    overwrite: bool = False,
) -> CopiedCheckpoint:
    def write(directory: Location, target: SaveTarget) -> None:
        _copy_records(src, directory, manifest.files, jobs=jobs, progress=progress)
        committed = replace(manifest, checkpoint_path=dst.url)
        commit_checkpoint(directory, committed, claim_id=target.claim_id)

    write_claimed(dst, overwrite=overwrite, write=write)
    return CopiedCheckpoint(src.url, dst.url, "copied", len(manifest.files), manifest.total_nbytes)


def _jobs(jobs: int | None) -> int:
    n = knobs.IO_THREADS.get() if jobs is None else jobs
    if n < 1:
        raise ConfigError(f"jobs must be at least 1, not {n}")
    return n


def copy_checkpoint(
    src: str | Location,
    dst: str | Location,
    *,
    jobs: int | None = None,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> CopyReport:
    """Copy the complete checkpoint ``src`` to the directory ``dst`` (see the module
    docstring). ``storage_options`` are for ``src``; ``dst_storage_options`` default to
    them. ``jobs`` files are copied at once (default ``CKPTSVC_IO_THREADS``)."""
    started = time.monotonic()
    n_jobs = _jobs(jobs)
    src_loc = Location.parse(src, storage_options)
    dst_loc = Location.parse(
        dst, storage_options if dst_storage_options is None else dst_storage_options
    )
    _check_distinct(src_loc, dst_loc)
    manifest = _source_manifest(
        checkpoint_info(src_loc, check_files=False)
    )  # each file checked as copied
    if _up_to_date(manifest, dst_loc, overwrite=overwrite):
        logger.info("%s is up to date with %s", dst_loc.url, src_loc.url)
        done = CopiedCheckpoint(
            src_loc.url, dst_loc.url, "up-to-date", len(manifest.files), manifest.total_nbytes
        )
    else:
        tracker = _Progress(manifest.total_nbytes, progress)
        done = _copy_one(
            src_loc, manifest, dst_loc, jobs=n_jobs, progress=tracker, overwrite=overwrite
        )
    return CopyReport(src_loc.url, dst_loc.url, (done,), elapsed_s=time.monotonic() - started)


def copy_tree(
    src: str | Location,
    dst: str | Location,
    *,
    jobs: int | None = None,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> CopyReport:
    """Copy every complete checkpoint under the model directory ``src`` to
    ``<dst>/checkpoints/<same name>``, oldest first, each with the commit protocol.
    Checkpoints already at the destination are skipped, so an interrupted copy resumes."""
    started = time.monotonic()
    n_jobs = _jobs(jobs)
    src_root = Location.parse(src, storage_options)
    dst_root = Location.parse(
        dst, storage_options if dst_storage_options is None else dst_storage_options
    )
    _check_distinct(src_root, dst_root)
    infos = list_checkpoints(src_root)
    if not infos:
        raise CheckpointNotFoundError(
            f"no checkpoints under {src_root.join(CHECKPOINTS_DIR).url} (and {src_root.url} is "
            "not a checkpoint itself)"
        )
    skipped: list[tuple[str, str]] = []
    todo: list[tuple[CheckpointInfo, Manifest, Location]] = []
    done: list[CopiedCheckpoint] = []
    for info in infos:
        if info.status is not CheckpointStatus.COMPLETE or info.manifest is None:
            why = info.reason or "no manifest (legacy): nothing to verify against"
            skipped.append((info.url, f"{info.status.value}: {why}"))
            continue
        target = dst_root.join(CHECKPOINTS_DIR, info.location.name)
        if _up_to_date(info.manifest, target, overwrite=overwrite):
            done.append(
                CopiedCheckpoint(
                    info.url,
                    target.url,
                    "up-to-date",
                    len(info.manifest.files),
                    info.manifest.total_nbytes,
                )
            )
            continue
        todo.append((info, info.manifest, target))
    tracker = _Progress(sum(m.total_nbytes for _, m, _ in todo), progress)
    for info, manifest, target in todo:
        done.append(
            _copy_one(
                info.location, manifest, target, jobs=n_jobs, progress=tracker, overwrite=overwrite
            )
        )
    for url, why in skipped:
        logger.warning("not copied: %s (%s)", url, why)
    return CopyReport(
        src_root.url,
        dst_root.url,
        tuple(done),
        tuple(skipped),
        elapsed_s=time.monotonic() - started,
    )


def copy(
    src: str | Location,
    dst: str | Location,
    *,
    jobs: int | None = None,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> CopyReport:
    """``ckptsvc cp``: a checkpoint directory is copied to ``dst`` (the new checkpoint
    directory); a model directory has each of its complete checkpoints copied under
    ``dst/checkpoints/``."""
    src_loc = Location.parse(src, storage_options)
    kwargs: dict[str, Any] = {
        "jobs": jobs,
        "storage_options": storage_options,
        "dst_storage_options": dst_storage_options,
        "overwrite": overwrite,
        "progress": progress,
    }
    info = checkpoint_info(src_loc)
    if info.status is CheckpointStatus.ABSENT and src_loc.join(CHECKPOINTS_DIR).exists():
        return copy_tree(src_loc, dst, **kwargs)
    return copy_checkpoint(src_loc, dst, **kwargs)


def copy_files(
    src: str | Location,
    dst_dir: str | Location,
    *,
    paths: Iterable[str] | None = None,
    jobs: int | None = None,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> tuple[FileRecord, ...]:
    """Copy files of the complete checkpoint ``src`` (``paths``, default: every file its
    manifest lists) into the plain directory ``dst_dir``, each verified against the
    manifest. No marker or manifest is written: ``dst_dir`` is not a checkpoint."""
    src_loc = Location.parse(src, storage_options)
    dst_loc = Location.parse(
        dst_dir, storage_options if dst_storage_options is None else dst_storage_options
    )
    _check_distinct(src_loc, dst_loc)
    manifest = _source_manifest(
        checkpoint_info(src_loc, check_files=False)
    )  # each file checked as copied
    if paths is None:
        records = manifest.files
    else:
        wanted = list(paths)
        missing = sorted(p for p in wanted if manifest.file(p) is None)
        if missing:
            raise CheckpointNotFoundError(
                f"{src_loc.url}: the manifest lists no file {missing[0]!r} "
                f"({len(missing)} missing of {len(wanted)} asked)"
            )
        records = tuple(r for r in manifest.files if r.path in set(wanted))
    dst_loc.makedirs()
    tracker = _Progress(sum(r.nbytes for r in records), progress)
    _copy_records(src_loc, dst_loc, records, jobs=_jobs(jobs), progress=tracker)
    return tuple(records)


# ---- prune -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune` deleted (or would delete with ``dry_run``) and what it kept."""

    root: str
    keep: int
    dry_run: bool
    deleted: tuple[str, ...]
    kept: tuple[str, ...]
    preserved: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "keep": self.keep,
            "dry_run": self.dry_run,
            "deleted": list(self.deleted),
            "kept": list(self.kept),
            "preserved": list(self.preserved),
        }


def _best_checkpoints(infos: Sequence[CheckpointInfo]) -> list[str]:
    """URLs of the best checkpoints the ``CheckpointManager`` recorded in the newest complete
    manifest, matched by directory name (the recorded paths may predate a copy)."""
    complete = [i for i in infos if i.manifest is not None]
    if not complete:
        return []
    newest = max(complete, key=CheckpointInfo.sort_key)
    section = (newest.manifest.user_metadata if newest.manifest else {}).get(_MANAGER_META_KEY)
    if not isinstance(section, dict):
        return []
    recorded = [
        str(e[0]) for e in section.get("best_checkpoints") or [] if isinstance(e, list) and e
    ]
    if section.get("best_checkpoint"):
        recorded.append(str(section["best_checkpoint"]))
    names = {os.path.basename(p.rstrip("/")) for p in recorded}
    return [i.url for i in infos if i.location.name in names]


def prune(
    root: str | Location,
    *,
    keep: int,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
    preserved: Iterable[str] = (),
) -> PruneReport:
    """Delete the oldest checkpoints under ``<root>/checkpoints`` until ``keep`` remain.

    Rules (``retention.select_for_deletion``): ``keep`` counts complete and legacy
    checkpoints; the newest complete one, the ``preserved`` ones and the best ones a
    ``CheckpointManager`` recorded are never deleted; incomplete directories are neither
    counted nor deleted (they may be saves in flight: ``gc`` handles debris). Each delete
    removes the manifest first, so a crash midway leaves an incomplete directory, never a
    torn complete one.
    """
    if keep < 1:
        raise ConfigError(f"keep must be at least 1, not {keep}")
    root_loc = Location.parse(root, storage_options)
    infos = list_checkpoints(root_loc)
    spared = [*_best_checkpoints(infos), *preserved]
    victims = select_for_deletion(infos, keep=keep, preserved=spared)
    victim_urls = {v.url for v in victims}
    for v in victims:
        if dry_run:
            logger.info("prune: would delete %s", v.url)
        else:
            delete_checkpoint(v.location)
    kept = tuple(
        i.url
        for i in infos
        if i.url not in victim_urls
        and i.status in (CheckpointStatus.COMPLETE, CheckpointStatus.LEGACY)
    )
    return PruneReport(
        root=root_loc.url,
        keep=keep,
        dry_run=dry_run,
        deleted=tuple(v.url for v in victims),
        kept=kept,
        preserved=tuple(u for u in spared if u in kept),
    )
