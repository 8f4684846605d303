"""Deleting checkpoints safely: the manifest goes first, then the data.

Once the manifest is gone the checkpoint is invisible to discovery, so a crash halfway
through a delete leaves an incomplete directory for ``gc``, never a torn "complete" one.
On object stores the data goes in batched requests (S3: DeleteObjects of up to 1000
keys; GCS: gcsfs's batch API), optionally on a background thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME
from ckptsvc.read.discovery import CheckpointInfo, CheckpointStatus, list_checkpoints
from ckptsvc.storage import Location
from ckptsvc.workers.latest_pointer import drop_pointer_to

__all__ = [
    "delete_checkpoint",
    "delete_oldest_checkpoints_in_background",
    "maybe_delete_oldest_checkpoint",
    "select_for_deletion",
]

logger = logging.getLogger(__name__)


def delete_checkpoint(
    path: Location | str, *, storage_options: dict[str, Any] | None = None
) -> None:
    """Delete one checkpoint: marker, manifest gone, the data, the marker, the directory.

    First the folder's ``latest`` pointer goes if it names this checkpoint (a pointer never
    names a deleted checkpoint; discovery lists the folder until the next save). Until the last file goes the directory holds the marker, so a crash at any point
    leaves an incomplete checkpoint (invisible to discovery, collectable by ``gc``) or an
    empty directory; never manifest-less weights that would look like a legacy one.
    """
    loc = Location.parse(path, storage_options)
    drop_pointer_to(loc)
    loc.join(MARKER_NAME).publish(b'{"deleting": true}')
    loc.join(MANIFEST_NAME).remove(missing_ok=True)
    loc.remove_children(keep=(MARKER_NAME,))  # the data; batched on object stores
    loc.join(MARKER_NAME).remove(missing_ok=True)
    loc.remove(recursive=True, missing_ok=True)  # the directory (or leftover folder keys)
    logger.info("deleted checkpoint %s", loc.url)


def select_for_deletion(
    infos: Iterable[CheckpointInfo], *, keep: int, preserved: Iterable[str] = ()
) -> list[CheckpointInfo]:
    """The oldest complete/legacy checkpoints beyond ``keep``, never the newest complete
    one and never a preserved one (paths or URLs). Incomplete ones are not counted or
    chosen: they may be saves still in flight (``gc`` handles debris)."""
    usable = sorted(
        (i for i in infos if i.status in (CheckpointStatus.COMPLETE, CheckpointStatus.LEGACY)),
        key=CheckpointInfo.sort_key,
    )
    keep_urls: set[str] = set()
    for p in preserved:  # normalise: relative paths, trailing slashes, file:// URLs
        loc = Location.parse(p)
        keep_urls |= {loc.url, loc.path}
    complete = [i for i in usable if i.status is CheckpointStatus.COMPLETE]
    if complete:
        keep_urls.add(complete[-1].url)
    excess = len(usable) - max(keep, 0)
    victims = [i for i in usable if i.url not in keep_urls and i.location.path not in keep_urls]
    return victims[: max(excess, 0)]


def _delete_oldest(
    model_dir: str,
    max_checkpoints: int,
    best_checkpoint: str | None,
    preserved_checkpoints: list[str] | None,
    storage_options: dict[str, Any] | None,
) -> list[str]:
    preserved = list(preserved_checkpoints or [])
    if best_checkpoint:
        preserved.append(best_checkpoint)
    infos = list_checkpoints(model_dir, storage_options=storage_options)
    deleted = []
    for victim in select_for_deletion(infos, keep=max_checkpoints, preserved=preserved):
        delete_checkpoint(victim.location)
        deleted.append(victim.url)
    return deleted


def maybe_delete_oldest_checkpoint(
    model_dir: str,
    max_checkpoints: int,
    best_checkpoint: str | None = None,
    preserved_checkpoints: list[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Forgather's retention: keep ``max_checkpoints`` under ``<model_dir>/checkpoints``.

    Never deletes ``best_checkpoint``, a preserved checkpoint, the newest complete one,
    or an incomplete one (it may still be saving).
    """
    _delete_oldest(
        model_dir, max_checkpoints, best_checkpoint, preserved_checkpoints, storage_options
    )


_background: ThreadPoolExecutor | None = None
_background_lock = threading.Lock()


def _retention_thread() -> ThreadPoolExecutor:
    """One thread for background deletions, so they run in the order they were asked."""
    global _background
    with _background_lock:
        if _background is None:
            _background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptsvc-retention")
        return _background


def _forget_thread_in_child() -> None:
    """A forked child has none of the parent's threads: it starts its own deletion thread
    (an inherited executor would queue the work and never run it)."""
    global _background, _background_lock
    _background, _background_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_thread_in_child)


def delete_oldest_checkpoints_in_background(
    model_dir: str,
    max_checkpoints: int,
    best_checkpoint: str | None = None,
    preserved_checkpoints: list[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> Future[list[str]]:
    """:func:`maybe_delete_oldest_checkpoint` on a background thread (listing and
    deleting cost requests on object stores); the future gives the URLs deleted."""
    return _retention_thread().submit(
        _delete_oldest,
        model_dir,
        max_checkpoints,
        best_checkpoint,
        preserved_checkpoints,
        storage_options,
    )
