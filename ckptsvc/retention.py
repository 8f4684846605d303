"""Deleting checkpoints safely: the manifest goes first, then the data.

Once the manifest is gone the checkpoint is invisible to discovery, so a crash halfway
through a delete leaves an incomplete directory for ``gc``, never a torn "complete" one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from .discovery import CheckpointInfo, CheckpointStatus, list_checkpoints
from .manifest import MANIFEST_NAME, MARKER_NAME
from .storage import Location

__all__ = ["delete_checkpoint", "maybe_delete_oldest_checkpoint", "select_for_deletion"]

logger = logging.getLogger(__name__)


def delete_checkpoint(
    ckpt: Location | str, *, storage_options: dict[str, Any] | None = None
) -> None:
    """Delete one checkpoint: retire its manifest (marker first), then remove the data."""
    loc = Location.parse(ckpt, storage_options)
    loc.join(MARKER_NAME).publish(b'{"deleting": true}')
    loc.join(MANIFEST_NAME).remove(missing_ok=True)
    loc.remove(recursive=True, missing_ok=True)
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
    preserved = list(preserved_checkpoints or [])
    if best_checkpoint:
        preserved.append(best_checkpoint)
    infos = list_checkpoints(model_dir, storage_options=storage_options)
    for victim in select_for_deletion(infos, keep=max_checkpoints, preserved=preserved):
        delete_checkpoint(victim.location)
