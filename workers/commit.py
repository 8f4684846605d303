"""The commit protocol: marker first, data, small files, manifest last, marker removed.

A checkpoint directory is complete if and only if ``checkpoint_manifest.json`` exists and
parses. Every save follows this order (DESIGN.md section 4):

1. :func:`begin_checkpoint` - create the directory, write the in-progress marker, and only
   then delete a manifest left by an earlier save to the same path (so an interrupted
   overwrite is never mistaken for the old, complete checkpoint).
2. The data: shards streamed by :mod:`ckptsvc.workers.shard_writer`, small JSON files
   through :func:`publish_file`. All durable before step 3.
3. :func:`commit_checkpoint` - publish the manifest atomically (temp + fsync + rename +
   directory fsync locally; one PUT on object stores), then remove the marker.

A crash anywhere before step 3 leaves the marker and no manifest: "incomplete", never
returned by discovery and collectable by ``gc``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable

from ckptsvc import knobs
from ckptsvc.checksum import crc32c_hex
from ckptsvc.manifest import (
    MANIFEST_NAME,
    MARKER_NAME,
    FileRecord,
    Manifest,
    check_relpath,
    now_iso,
)
from ckptsvc.storage import Location, fsync_dir

__all__ = [
    "abandon_checkpoint",
    "begin_checkpoint",
    "commit_checkpoint",
    "publish_file",
    "sync_local_dirs",
]

logger = logging.getLogger(__name__)


def begin_checkpoint(ckpt: Location, *, trainer_pid: int | None = None) -> None:
    """Step 1: directory, in-progress marker, then retire any previous manifest.

    The marker names this process and host (and ``trainer_pid``, the trainer a node
    writer saves for: the save cannot go on once either is dead), so ``gc`` can tell a
    live save from debris."""
    ckpt.makedirs()
    doc: dict[str, object] = {"pid": os.getpid(), "host": socket.gethostname()}
    if trainer_pid is not None:
        doc["trainer_pid"] = trainer_pid
    doc["started"] = now_iso()
    ckpt.join(MARKER_NAME).publish(json.dumps(doc).encode())
    ckpt.join(MANIFEST_NAME).remove(missing_ok=True)


def abandon_checkpoint(ckpt: Location, reason: str) -> None:
    """A save that began here failed (or was cancelled): say so in its marker, so ``gc``
    reclaims the directory and its unfinished uploads although the writer lives on.
    Best effort (the storage may be what failed): never raises."""
    try:
        raw = ckpt.join(MARKER_NAME).read_bytes()
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("pid") != os.getpid():
            return  # not our marker (any more): another save owns the directory now
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
    """fsync the local directories that received files, so their entries are durable."""
    if not ckpt.is_local or not knobs.FSYNC.get():
        return
    dirs = {os.path.dirname(os.path.join(ckpt.path, p)) for p in rel_paths} | {ckpt.path}
    for d in sorted(dirs):
        fsync_dir(d)


def commit_checkpoint(ckpt: Location, manifest: Manifest) -> None:
    """Step 3: the manifest, last and atomic; then the marker goes.

    The caller guarantees every file listed in ``manifest.files`` is durable.
    """
    sync_local_dirs(ckpt, (f.path for f in manifest.files))
    ckpt.join(MANIFEST_NAME).publish(manifest.to_json())
    ckpt.join(MARKER_NAME).remove(missing_ok=True)
    logger.info(
        "committed %s (step %s, %d files, %d bytes)",
        ckpt.url,
        manifest.step,
        len(manifest.files),
        manifest.total_nbytes,
    )
