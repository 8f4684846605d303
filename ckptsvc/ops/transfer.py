"""Copy checkpoints between any two locations (local, S3, GCS, any fsspec URL), verified.

- :func:`copy_checkpoint` copies one complete checkpoint;
- :func:`copy_tree` copies every complete checkpoint under a model directory (into
  ``<dst>/checkpoints/<same name>``); incomplete and manifest-less ones are skipped and
  reported;
- :func:`copy` picks one of the two by what ``src`` is (``ckptsvc cp``);
- :func:`copy_files` copies some files of a checkpoint into a plain directory (no commit
  protocol: the destination is not a checkpoint), each verified;
- :func:`prune` (``ckptsvc prune``) lives in :mod:`ckptsvc.ops.prune`.

Call order of one checkpoint copy (the calling thread unless noted):

1. read the source manifest; a checkpoint without one is refused (nothing to verify
   against), an incomplete one too;
2. look at the destination: a manifest of the same commit (timestamp, step and files) means
   "up to date" and the checkpoint is skipped; a different one needs ``overwrite=True``;
3. claim ``dst`` (:func:`~ckptsvc.commit.target.write_claimed`): its in-progress marker,
   created exclusively; with ``overwrite`` a committed ``dst`` is kept while the copy goes
   to its hidden successor, swapped in after step 5;
4. every file the manifest lists (:func:`ckptsvc.ops.verified_copy.copy_records`), largest
   first, on ``jobs`` copy threads: stream source chunks into the destination's sink
   (multipart / resumable upload on object stores) with CRC-32C on the way; a size or CRC mismatch aborts the upload *before* it is
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
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from ckptsvc import knobs
from ckptsvc.commit.target import SaveTarget, write_claimed
from ckptsvc.errors import CheckpointNotFoundError, CommitConflictError, ConfigError
from ckptsvc.format.manifest import FileRecord, Manifest
from ckptsvc.ops.verified_copy import CopyProgress, ProgressFn, copy_records
from ckptsvc.read.discovery import (
    CHECKPOINTS_DIR,
    CheckpointInfo,
    CheckpointStatus,
    checkpoint_folder_of,
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
    "copy",
    "copy_checkpoint",
    "copy_files",
    "copy_tree",
]

logger = logging.getLogger(__name__)


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


def _endpoints(
    src: str | Location,
    dst: str | Location,
    storage_options: dict[str, Any] | None,
    dst_storage_options: dict[str, Any] | None,
) -> tuple[Location, Location]:
    """Source and destination of a copy (``dst_storage_options`` default to the source's);
    the same location twice is a :class:`ConfigError`."""
    src_loc = Location.parse(src, storage_options)
    dst_loc = Location.parse(
        dst, storage_options if dst_storage_options is None else dst_storage_options
    )
    same_path = src_loc.path.rstrip("/") == dst_loc.path.rstrip("/")
    if type(src_loc.fs) is type(dst_loc.fs) and same_path:
        raise ConfigError(f"source and destination are the same location: {src_loc.url}")
    return src_loc, dst_loc


def _copy_one(
    src: Location,
    manifest: Manifest,
    dst: Location,
    *,
    jobs: int,
    progress: CopyProgress,
    overwrite: bool = False,
) -> CopiedCheckpoint:
    def write(directory: Location, target: SaveTarget) -> None:
        copy_records(src, directory, manifest.files, jobs=jobs, progress=progress)
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
    src_loc, dst_loc = _endpoints(src, dst, storage_options, dst_storage_options)
    manifest = _source_manifest(
        checkpoint_info(src_loc, check_files=False)
    )  # each file checked as copied
    if _up_to_date(manifest, dst_loc, overwrite=overwrite):
        logger.info("%s is up to date with %s", dst_loc.url, src_loc.url)
        done = CopiedCheckpoint(
            src_loc.url, dst_loc.url, "up-to-date", len(manifest.files), manifest.total_nbytes
        )
    else:
        tracker = CopyProgress(manifest.total_nbytes, progress)
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
    """Copy every complete checkpoint under the model directory ``src`` to the same place
    under ``dst`` (``<dst>/checkpoints/<name>``, or ``<dst>/<name>`` for the HF Trainer
    layout), oldest first, each with the commit protocol.
    Checkpoints already at the destination are skipped, so an interrupted copy resumes."""
    started = time.monotonic()
    n_jobs = _jobs(jobs)
    src_root, dst_root = _endpoints(src, dst, storage_options, dst_storage_options)
    infos = list_checkpoints(src_root)
    if not infos:
        raise CheckpointNotFoundError(
            f"no checkpoints under {src_root.join(CHECKPOINTS_DIR).url} or {src_root.url} (and "
            f"{src_root.url} is not a checkpoint itself)"
        )
    skipped: list[tuple[str, str]] = []
    todo: list[tuple[CheckpointInfo, Manifest, Location]] = []
    done: list[CopiedCheckpoint] = []
    for info in infos:
        if info.status is not CheckpointStatus.COMPLETE or info.manifest is None:
            why = info.reason or "no manifest (legacy): nothing to verify against"
            skipped.append((info.url, f"{info.status.value}: {why}"))
            continue
        folder = checkpoint_folder_of(src_root, info)
        target = dst_root.join(*[p for p in (folder, info.location.name) if p])
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
    tracker = CopyProgress(sum(m.total_nbytes for _, m, _ in todo), progress)
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
    src_loc, dst_loc = _endpoints(src, dst_dir, storage_options, dst_storage_options)
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
    tracker = CopyProgress(sum(r.nbytes for r in records), progress)
    copy_records(src_loc, dst_loc, records, jobs=_jobs(jobs), progress=tracker)
    return tuple(records)
