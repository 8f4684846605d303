"""The commit protocol: marker first, data, small files, manifest last, marker removed.

A checkpoint directory is complete if and only if ``checkpoint_manifest.json`` exists and
parses. Every save follows this order (DESIGN.md section 4):

0. :func:`~ckptsvc.workers.claim.claim_checkpoint` (the saving process) - the in-progress
   marker, created exclusively: one saver per directory.
1. :func:`begin_checkpoint` (every writer that writes into the directory) - create the
   directory; refuse one that is committed. Committed files are never rewritten in place.
2. The data: shards streamed by :mod:`ckptsvc.workers.shard_writer`, small JSON files
   through :func:`publish_file`. All durable before step 3.
3. :func:`commit_checkpoint` - check the claim is still this save's (the check may have
   been started ahead, :func:`start_claim_check`, overlapping the manifest's build), publish
   the manifest atomically (temp + fsync + rename + directory fsync locally; one PUT on
   object stores): the save is committed; then remove the marker (cleanup: with
   ``durable`` the outcome is reported before it).

A crash anywhere before step 3's publish leaves the marker and no manifest: "incomplete",
never returned by discovery and collectable by ``gc``. A crash between the manifest and
the marker's delete leaves a complete checkpoint with a leftover marker: discovery ranks
the manifest above the marker, ``gc`` removes the marker once its owner is gone.

**Replacing a committed checkpoint** (``overwrite=True``) never destroys it before its
successor commits: the new one is saved, with this same protocol, to the hidden sibling
:func:`replacement_location` (``.checkpoint-N.ckptsvc-replace``); once that committed,
:func:`swap_in` moves it into place. Locally that is one atomic ``renameat2
(RENAME_EXCHANGE)`` of the two directories, then the old one is deleted. Object stores
have no rename: the target gets a marker, loses its manifest and files, receives
server-side copies of the new files and the new manifest last; a crash in between leaves
the target incomplete and the replacement complete, and discovery returns the replacement
for that step (:func:`replacement_location`) until a later save or ``gc`` finishes the swap.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import replace

from ckptsvc import knobs
from ckptsvc.errors import CommitConflictError, StorageError
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.format.manifest import (
    MANIFEST_NAME,
    MARKER_NAME,
    FileRecord,
    Manifest,
    check_relpath,
)
from ckptsvc.storage import Location, fsync_dir

from .claim import check_claim, read_marker

__all__ = [
    "REPLACEMENT_SUFFIX",
    "abandon_checkpoint",
    "begin_checkpoint",
    "commit_checkpoint",
    "publish_file",
    "replacement_location",
    "start_claim_check",
    "swap_in",
    "sync_local_dirs",
]

#: a committed checkpoint's successor is saved beside it as ``.<name><suffix>``
REPLACEMENT_SUFFIX = ".ckptsvc-replace"

logger = logging.getLogger(__name__)


def begin_checkpoint(ckpt: Location) -> None:
    """Step 1: the directory; a committed one is refused (its files are never rewritten)."""
    if ckpt.join(MANIFEST_NAME).exists():
        raise CommitConflictError(
            f"{ckpt.url} is already committed; its files are never rewritten in place: "
            "pass overwrite=True to replace it, or save under another step"
        )
    ckpt.makedirs()


def abandon_checkpoint(ckpt: Location, reason: str, *, claim_id: str) -> None:
    """The save that claimed ``ckpt`` as ``claim_id`` failed (or was cancelled): say so in
    its marker, so ``gc`` reclaims the directory and its unfinished uploads although the
    claiming process lives on. Best effort (the storage may be what failed): never raises."""
    if not claim_id:
        return  # not the committing job: rank 0 decides the save's fate
    try:
        doc = read_marker(ckpt)
        if not doc or doc.get("claim") != claim_id:
            return  # not our claim (any more): another save owns the directory now
        doc["failed"] = reason[:500]
        ckpt.join(MARKER_NAME).publish(json.dumps(doc).encode())
    except Exception as e:
        logger.info("could not mark the failed save in %s as abandoned: %s", ckpt.url, e)


def publish_file(ckpt: Location, rel_path: str, data: bytes) -> FileRecord:
    """Atomically write a small file of the checkpoint; return its manifest record."""
    check_relpath(rel_path, where=ckpt.url)
    ckpt.join(rel_path).publish(data)
    return FileRecord(rel_path, len(data), crc32c_hex(data))


def sync_local_dirs(ckpt: Location, rel_paths: Iterable[str]) -> None:
    """fsync the local directories that received files, so their entries are durable
    (unless ``ckpt.settings`` - else ``CKPTSVC_FSYNC`` - turns fsync off)."""
    fsync = ckpt.settings.fsync if ckpt.settings is not None else knobs.FSYNC.get()
    if not ckpt.is_local or not fsync:
        return
    dirs = {os.path.dirname(os.path.join(ckpt.path, p)) for p in rel_paths} | {ckpt.path}
    for d in sorted(dirs):
        fsync_dir(d)


def commit_checkpoint(
    ckpt: Location,
    manifest: Manifest,
    *,
    claim_id: str = "",
    claim_check: Future[float] | None = None,
    durable: Callable[[], object] | None = None,
) -> None:
    """Step 3: the manifest, last and atomic; then the marker goes.

    The caller guarantees every file listed in ``manifest.files`` is durable. With
    ``claim_id`` the marker must still carry it (:func:`~ckptsvc.workers.claim.check_claim`);
    ``claim_check``: that check started ahead (:func:`start_claim_check`, overlapping the
    manifest's build), else it runs here, one round trip before the manifest's PUT.

    ``durable`` runs once the manifest is published: the save is committed from there
    (the writer reports it then; design.md section 4). With it, what follows - the
    marker's delete - is cleanup: a failure is logged, not raised (the marker left in a
    committed directory is debris ``gc`` removes; discovery ranks the manifest above it).
    """
    sync_local_dirs(ckpt, (f.path for f in manifest.files))
    raw = manifest.to_json()  # encoded while a claim check started ahead is in flight
    if claim_id:
        _claim_still_ours(ckpt, claim_id, claim_check)
    ckpt.join(MANIFEST_NAME).publish(raw)
    logger.info(
        "committed %s (step %s, %d files, %d bytes)",
        ckpt.url,
        manifest.step,
        len(manifest.files),
        manifest.total_nbytes,
    )
    if durable is None:
        ckpt.join(MARKER_NAME).remove(missing_ok=True)
        return
    durable()
    try:
        ckpt.join(MARKER_NAME).remove(missing_ok=True)
    except Exception as e:
        logger.warning(
            "%s is committed but its in-progress marker could not be removed (%s: %s); "
            "`ckptsvc gc` removes it",
            ckpt.url,
            type(e).__name__,
            e,
        )


def start_claim_check(side: Executor, ckpt: Location, claim_id: str) -> Future[float] | None:
    """Start :func:`~ckptsvc.workers.claim.check_claim` on ``side`` ahead of the commit
    (its GET overlaps building and encoding the manifest); the future gives the
    ``time.monotonic()`` at which the marker was seen to carry ``claim_id``."""
    if not claim_id:
        return None

    def check() -> float:
        check_claim(ckpt, claim_id)
        return time.monotonic()

    return side.submit(check)


def _claim_still_ours(ckpt: Location, claim_id: str, ahead: Future[float] | None) -> None:
    """The claim check before the manifest's PUT: the one started ahead if it is recent
    (younger than a quarter lease, the claim keeper's refresh period: design.md section 4
    gives the argument), else a fresh one."""
    if ahead is not None:
        seen = ahead.result()  # raises CommitConflictError if the claim was taken over
        if time.monotonic() - seen < knobs.CLAIM_LEASE_S.get() / 4:
            return
    check_claim(ckpt, claim_id)


# ---- replacing a committed checkpoint ------------------------------------------------------


def replacement_location(final: Location) -> Location:
    """Where the successor of the checkpoint at ``final`` is saved before :func:`swap_in`."""
    return final.parent.join(f".{final.name}{REPLACEMENT_SUFFIX}")


def swap_in(stage: Location, final: Location) -> None:
    """Move the committed checkpoint at ``stage`` to ``final``, replacing what is there.

    ``final`` holds a complete checkpoint at every instant on local filesystems with
    ``RENAME_EXCHANGE`` (ext4, xfs, btrfs, tmpfs); elsewhere see the module docstring.
    """
    if stage.is_local:
        _swap_local(stage.path, final.path)
        return
    manifest_raw = stage.join(MANIFEST_NAME).read_bytes()
    manifest = Manifest.from_json(manifest_raw, where=stage.url)
    final.makedirs()
    final.join(MARKER_NAME).publish(b'{"replacing": true}')
    final.join(MANIFEST_NAME).remove(missing_ok=True)
    final.remove_children(keep={MARKER_NAME})
    for record in manifest.files:
        _copy(stage.join(record.path), final.join(record.path))
        if final.join(record.path).size() != record.nbytes:
            raise StorageError(
                f"{final.join(record.path).url}: the copy of {record.path} has the wrong size; "
                f"the new checkpoint is intact at {stage.url}",
                url=final.url,
            )
    final.join(MANIFEST_NAME).publish(replace(manifest, checkpoint_path=final.url).to_json())
    final.join(MARKER_NAME).remove(missing_ok=True)
    stage.remove(recursive=True, missing_ok=True)
    logger.info("replaced %s by the checkpoint saved at %s", final.url, stage.url)


def _copy(src: Location, dst: Location) -> None:
    """A server-side copy where the store has one; else the bytes through this process."""
    if src.protocol in ("s3", "s3a", "gs", "gcs"):
        src.copy_to(dst)
    else:
        dst.publish(src.read_bytes())


def _swap_local(stage: str, final: str) -> None:
    parent = os.path.dirname(final)
    if os.path.lexists(final):
        if not _rename_exchange(stage, final):
            old = os.path.join(parent, f".{os.path.basename(final)}.ckptsvc-old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)  # a crash here: discovery returns the stage for this step
            os.rename(stage, final)
            stage = old
        fsync_dir(parent)
        shutil.rmtree(stage)  # now the old checkpoint
    else:
        os.rename(stage, final)
    fsync_dir(parent)
    logger.info("replaced %s by its committed successor", final)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _rename_exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); ``False`` where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)
