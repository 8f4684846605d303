"""``gc``: reclaim the debris of saves and deletions that never finished.

What counts as debris under a model directory's ``checkpoints/`` and its ``checkpoint-*``
directories (the HF Trainer layout) (a complete checkpoint,
one whose manifest parses, is only ever removed when retention already chose to delete
it, item 3):

1. an **incomplete** checkpoint directory - our in-progress marker and no manifest - when
   nothing may still be writing it: its marker names a process on this host that is dead
   (the writer, or the trainer it saves for), says the save failed, or it is marked as
   being deleted (an interrupted retention), or it started before the
   newest complete checkpoint was committed. Kept: a live writer on this host, a save
   that started after the newest commit (it may be in flight on another host), the first
   save ever (same), anything younger than ``min_age_s``, and a directory whose manifest
   is damaged but which has no marker (that is a committed checkpoint gone bad, not
   debris: ``ckptsvc verify`` it and delete it by hand);
2. a ``checkpoint-*`` directory with no manifest, marker or index that holds nothing but
   shard files and temp files (the remains of a deletion or save cut short), or nothing;
3. a complete checkpoint whose deletion by retention was interrupted (its marker says
   ``deleting``): the deletion is finished, as retention decided;
4. inside complete checkpoints: temp files of atomic publishes (``.<name>.<hex>.tmp``), a
   leftover in-progress marker (older than the manifest, its writer dead or elsewhere),
   and shard files (``model-0000i-of-0000N.*``) the manifest does not list that are older
   than the manifest (left by an overwrite with fewer shards);
5. on S3, unfinished multipart uploads under ``checkpoints/`` or ``checkpoint-*`` whose save can no longer
   finish: every one except those of a directory kept above because a save may still be
   writing it (a live writer and trainer on this host, a save newer than the newest
   commit, anything younger than ``min_age_s``) and those that started after gc did. So
   the uploads of failed saves go as soon as the save has failed: its marker says so
   (the node writer marks the saves it gives up), names a dead writer or trainer on this
   host, or started before the newest commit; or there is no marker at all (every save
   writes it first), or no directory. GCS resumable sessions expire by themselves;
6. on this host, staging arenas (``/dev/shm/ckptsvc-<node>-<pidns>-<pid>-<n>``) of any
   node id whose owner process is dead in this pid namespace
   (:func:`ckptsvc.workers.shm.reclaim_stale_segments` with no node).

``dry_run`` reports without changing anything. Every removal is logged and listed.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ckptsvc.errors import CorruptCheckpointError, StorageNotFoundError
from ckptsvc.format.json_doc import read_json_doc
from ckptsvc.format.manifest import MARKER_NAME, Manifest
from ckptsvc.liveness import owner_alive
from ckptsvc.ops.retention import delete_checkpoint
from ckptsvc.read.discovery import (
    CHECKPOINTS_DIR,
    CheckpointInfo,
    CheckpointStatus,
    list_checkpoints,
    read_manifest,
)
from ckptsvc.storage import ChildInfo, Location, call_with_retries
from ckptsvc.workers.shm import reclaim_stale_segments, stale_segments

__all__ = ["GcReport", "collect_garbage", "unfinished_uploads"]

logger = logging.getLogger(__name__)

_TMP_RE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
_SHARD_RE = re.compile(r"^(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)$")
_S3_PROTOCOLS = frozenset({"s3", "s3a"})
#: uploads the store says started less than this before gc began are left alone (the
#: store's clock and this host's may differ by this much)
CLOCK_SLACK_S = 2.0


@dataclass(frozen=True)
class GcReport:
    """What ``collect_garbage`` removed (or, with ``dry_run``, would remove) and kept."""

    root: str
    dry_run: bool
    removed: tuple[str, ...] = field(default_factory=tuple)  # checkpoint dirs and files
    kept: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (url, why)
    aborted_uploads: tuple[str, ...] = field(default_factory=tuple)  # "url (upload id)"
    reclaimed_segments: tuple[str, ...] = field(default_factory=tuple)  # shm names

    @property
    def reclaimed(self) -> int:
        """How many pieces of debris were (or would be) reclaimed, all kinds together."""
        return len(self.removed) + len(self.aborted_uploads) + len(self.reclaimed_segments)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "dry_run": self.dry_run,
            "removed": list(self.removed),
            "aborted_uploads": list(self.aborted_uploads),
            "reclaimed_segments": list(self.reclaimed_segments),
            "kept": [{"url": u, "why": w} for u, w in self.kept],
        }


# ---- markers ---------------------------------------------------------------------------------


def _read_marker(ckpt: Location) -> dict[str, Any] | None:
    """The in-progress marker's JSON (``{}`` if unparseable), ``None`` if there is none."""
    try:
        doc = read_json_doc(ckpt.join(MARKER_NAME), what="in-progress marker")
    except StorageNotFoundError:
        return None
    except CorruptCheckpointError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _started_s(marker: dict[str, Any]) -> float | None:
    try:
        ts = datetime.fromisoformat(str(marker["started"]))
    except (KeyError, ValueError):
        return None
    return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).timestamp()


def _writer_state(marker: dict[str, Any]) -> str:
    """``"alive"`` / ``"dead"`` for a save on this host (and pid namespace), ``"unknown"``
    otherwise. The marker names the process that claimed the directory (the trainer: its
    writer cancels the jobs of a trainer that went away); markers of earlier versions named
    the writer and its trainer (``trainer_pid``)."""
    pid = marker.get("pid")
    host, pidns = marker.get("host"), marker.get("pidns")
    trainer = marker.get("trainer_pid")
    if (
        type(trainer) is int
        and trainer != os.getpid()
        and owner_alive(host, pidns, trainer) is False
    ):
        return "dead"
    if pid == os.getpid() and host == socket.gethostname():
        return "unknown"  # a save of this very process may be in flight, or may have failed
    alive = owner_alive(host, pidns, pid)
    return "unknown" if alive is None else ("alive" if alive else "dead")


def _failed(marker: dict[str, Any]) -> bool:
    """The writer said the save failed (``abandon_checkpoint``): nothing writes it now."""
    return bool(marker.get("failed"))


def _why_keep_incomplete(
    info: CheckpointInfo, newest_s: float | None, *, now_s: float, min_age_s: float
) -> str | None:
    """Why an incomplete checkpoint must stay, or ``None`` if it is debris."""
    marker = _read_marker(info.location)
    if marker is None:
        return (
            f"its manifest is damaged ({info.reason}) but it has no in-progress marker: a "
            "committed checkpoint gone bad, not debris; check it with `ckptsvc verify` and "
            "delete it by hand"
        )
    started = _started_s(marker)
    if min_age_s > 0 and started is not None and now_s - started < min_age_s:
        return f"it started {now_s - started:.0f} s ago (younger than min_age_s={min_age_s:g})"
    if marker.get("deleting") is True:
        return None  # an interrupted deletion: finish it
    if _failed(marker):
        return None  # its writer gave it up (and aborted what it could)
    state = _writer_state(marker)
    if state == "alive":
        return f"its writer (pid {marker['pid']}) is still running"
    if state == "dead":
        return None
    if newest_s is None:
        return "there is no complete checkpoint yet; it may be the first save, in flight elsewhere"
    if started is not None and started >= newest_s:
        host = marker.get("host", "another host")
        return f"it started after the newest complete checkpoint; it may be in flight on {host}"
    return None


# ---- inside complete checkpoints ---------------------------------------------------------------


def _debris_in_complete(
    info: CheckpointInfo, manifest: Manifest, *, now_s: float, min_age_s: float
) -> tuple[list[Location], str | None]:
    """Files to remove inside a complete checkpoint, or a reason to leave it alone."""
    committed_s = manifest.timestamp_s()
    children: list[ChildInfo] = info.location.list_children()
    names = {c.name for c in children}
    debris: list[Location] = []
    if MARKER_NAME in names:
        marker = _read_marker(info.location) or {}
        if marker.get("deleting") is True:  # retention chose it, then stopped: finish
            return [info.location], None
        started = _started_s(marker)
        live = _writer_state(marker) == "alive" and not _failed(marker)
        if started is None or started >= committed_s or live:
            return [], "a save to this directory is in progress (marker newer than the manifest)"
        debris.append(info.location.join(MARKER_NAME))
    listed = {f.path for f in manifest.files}

    def old_enough(c: ChildInfo) -> bool:
        return min_age_s <= 0 or c.mtime is None or now_s - c.mtime >= min_age_s

    for c in children:
        if c.is_dir or not old_enough(c):
            continue
        stale_shard = (
            _SHARD_RE.match(c.name)
            and c.name not in listed
            and c.mtime is not None
            and c.mtime < committed_s
        )
        if _TMP_RE.match(c.name) or stale_shard:
            debris.append(info.location.join(c.name))
    return debris, None


def _marker_still_stale(marker: Location) -> bool:
    """Re-read a leftover marker just before removing it: a save that started meanwhile
    replaced it (and its marker must stay, or its directory would look committed)."""
    doc = _read_marker(marker.parent)
    started = None if doc is None else _started_s(doc)
    committed = _read_committed_s(marker.parent)
    return doc is not None and started is not None and committed is not None and started < committed


def _read_committed_s(ckpt: Location) -> float | None:
    try:
        manifest = read_manifest(ckpt)
    except CorruptCheckpointError:
        return None
    return None if manifest is None else manifest.timestamp_s()


def _is_remains(info: CheckpointInfo, *, now_s: float, min_age_s: float) -> bool:
    """An ABSENT directory that holds only our shard/temp files (or nothing), all old enough."""
    children = info.location.list_children()
    return all(
        not c.is_dir
        and (_SHARD_RE.match(c.name) or _TMP_RE.match(c.name))
        and (min_age_s <= 0 or c.mtime is None or now_s - c.mtime >= min_age_s)
        for c in children
    )


# ---- S3 multipart uploads ----------------------------------------------------------------------


def _s3_uploads(ckpts: Location, names: str = "") -> list[dict[str, Any]]:
    """Every unfinished multipart upload under ``ckpts`` whose path there starts with
    ``names`` (paginated ListMultipartUploads); ``Rel`` is the path under ``ckpts``."""
    fs: Any = ckpts.fs
    bucket, key, _ = fs.split_path(ckpts.path)
    folder = key.rstrip("/") + "/"
    prefix = folder + names
    uploads: list[dict[str, Any]] = []
    page: dict[str, str] = {}
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, **page}
        out = call_with_retries(
            functools.partial(fs.call_s3, "list_multipart_uploads", **kwargs),
            url=ckpts.url,
            action="list unfinished uploads under",
        )
        for up in out.get("Uploads") or []:
            uploads.append({**up, "Bucket": bucket, "Rel": str(up["Key"])[len(folder) :]})
        if not out.get("IsTruncated"):
            return uploads
        page = {"KeyMarker": out["NextKeyMarker"], "UploadIdMarker": out["NextUploadIdMarker"]}


def unfinished_uploads(root: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """URLs of unfinished multipart uploads under ``root/checkpoints`` and ``root/checkpoint-*`` (S3; else empty)."""
    root_loc = Location.parse(root, storage_options)
    if root_loc.protocol not in _S3_PROTOCOLS or not hasattr(root_loc.fs, "call_s3"):
        return []
    return [
        f"s3://{u['Bucket']}/{u['Key']} (upload {u['UploadId']})"
        for folder, names in _upload_folders(root_loc)
        for u in _s3_uploads(folder, names)
    ]


def _upload_folders(root: Location) -> tuple[tuple[Location, str], ...]:
    """Where a root's checkpoints are: ``checkpoints/*`` and ``checkpoint-*`` (HF layout)."""
    return ((root.join(CHECKPOINTS_DIR), ""), (root, "checkpoint-"))


def _abort_upload(ckpts: Location, up: dict[str, Any]) -> None:
    fs: Any = ckpts.fs
    call_with_retries(
        lambda: fs.call_s3(
            "abort_multipart_upload", Bucket=up["Bucket"], Key=up["Key"], UploadId=up["UploadId"]
        ),
        url=f"s3://{up['Bucket']}/{up['Key']}",
        action="abort the unfinished upload of",
    )


def _initiated_s(up: dict[str, Any]) -> float | None:
    value = up.get("Initiated")
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    return None


def _collect_uploads(
    ckpts: Location,
    names: str,
    *,
    live_dirs: dict[str, str],
    started_s: float,
    min_age_s: float,
    dry_run: bool,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Abort the uploads of saves that can no longer finish (see the module docstring)."""
    aborted: list[str] = []
    kept: list[tuple[str, str]] = []
    for up in _s3_uploads(ckpts, names):
        url = f"s3://{up['Bucket']}/{up['Key']}"
        label = f"{url} (upload {up['UploadId']})"
        directory = str(up["Rel"]).split("/", 1)[0]
        initiated = _initiated_s(up)
        why: str | None = None
        if directory in live_dirs:
            why = live_dirs[directory]
        elif initiated is not None and initiated > started_s - CLOCK_SLACK_S:
            why = "it started while gc ran"
        elif min_age_s > 0 and initiated is not None and started_s - initiated < min_age_s:
            why = (
                f"started {started_s - initiated:.0f} s ago (younger than min_age_s={min_age_s:g})"
            )
        if why is not None:
            kept.append((label, why))
            continue
        # no save that may be live claims its directory: gone, committed without it,
        # debris, a failed save (marker says so, or names a dead writer or trainer), or a
        # directory with no marker at all (every save writes its marker first)
        aborted.append(label)
        if not dry_run:
            _abort_upload(ckpts, up)
    return aborted, kept


# ---- the entry point ---------------------------------------------------------------------------


def collect_garbage(
    root: str,
    *,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
    min_age_s: float = 0.0,
    shared_memory: bool = True,
    node: str | None = None,
) -> GcReport:
    """Reclaim the debris under ``root/checkpoints`` and ``root/checkpoint-*`` (see the module docstring).

    ``min_age_s`` keeps anything younger (a guard for saves in flight on other hosts);
    ``shared_memory`` also unlinks this host's staging arenas whose owner process is dead
    in this pid namespace: those of ``node``, or (default) of every node, whatever node id
    the job that made them had.
    """
    now_s = time.time()
    root_loc = Location.parse(root, storage_options)
    infos = list_checkpoints(root_loc)
    complete = [i for i in infos if i.status is CheckpointStatus.COMPLETE]
    newest_s = max((i.sort_key()[0] for i in complete), default=None)
    removed: list[str] = []
    kept: list[tuple[str, str]] = []
    removed_dirs: set[str] = set()
    live_dirs: dict[str, str] = {}  # kept because a save may still write there: its uploads too
    for info in infos:
        if info.status is CheckpointStatus.INCOMPLETE:
            why = _why_keep_incomplete(info, newest_s, now_s=now_s, min_age_s=min_age_s)
            if why:
                kept.append((info.url, why))
                if _read_marker(info.location) is not None:  # else: a damaged commit
                    live_dirs[info.location.name] = why
                continue
            removed.append(info.url)
            removed_dirs.add(info.location.name)
            if not dry_run:
                delete_checkpoint(info.location)
        elif info.status is CheckpointStatus.ABSENT:
            if _is_remains(info, now_s=now_s, min_age_s=min_age_s):
                removed.append(info.url)
                removed_dirs.add(info.location.name)
                if not dry_run:
                    info.location.remove(recursive=True, missing_ok=True)
        elif info.status is CheckpointStatus.COMPLETE and info.manifest is not None:
            files, why = _debris_in_complete(info, info.manifest, now_s=now_s, min_age_s=min_age_s)
            if why:
                kept.append((info.url, why))
                live_dirs[info.location.name] = why
            for target in files:
                if target.name == MARKER_NAME and not _marker_still_stale(target):
                    kept.append((info.url, "a new save to this directory just started"))
                    live_dirs[info.location.name] = "a new save to this directory just started"
                    continue
                removed.append(target.url)
                if target == info.location:
                    removed_dirs.add(info.location.name)
                    if not dry_run:
                        delete_checkpoint(target)
                elif not dry_run:
                    target.remove(missing_ok=True)
    aborted: list[str] = []
    if root_loc.protocol in _S3_PROTOCOLS and hasattr(root_loc.fs, "call_s3"):
        for folder, names in _upload_folders(root_loc):
            gone, kept_uploads = _collect_uploads(
                folder,
                names,
                live_dirs=live_dirs,
                started_s=now_s,
                min_age_s=min_age_s,
                dry_run=dry_run,
            )
            aborted += gone
            kept += kept_uploads
    segments: list[str] = []
    if shared_memory:
        segments = stale_segments(node) if dry_run else reclaim_stale_segments(node)
    _log(dry_run, removed, aborted, segments)
    return GcReport(
        root=str(root),
        dry_run=dry_run,
        removed=tuple(removed),
        kept=tuple(kept),
        aborted_uploads=tuple(aborted),
        reclaimed_segments=tuple(segments),
    )


def _log(dry_run: bool, *groups: Iterable[str]) -> None:
    verb = "would remove" if dry_run else "removed"
    for group in groups:
        for what in group:
            logger.info("gc: %s %s", verb, what)
