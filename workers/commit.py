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

__all__ = ["begin_checkpoint", "commit_checkpoint", "publish_file", "sync_local_dirs"]

logger = logging.getLogger(__name__)


def begin_checkpoint(ckpt: Location) -> None:
    """Step 1: directory, in-progress marker, then retire any previous manifest."""
    ckpt.makedirs()
    marker = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso()})
    ckpt.join(MARKER_NAME).publish(marker.encode())
    ckpt.join(MANIFEST_NAME).remove(missing_ok=True)


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
