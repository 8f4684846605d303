"""Prune a model directory down to its newest checkpoints (``ckptsvc prune``).

:func:`prune` keeps the newest ``keep`` checkpoints under ``<root>/checkpoints``; the newest
complete one, the caller's ``preserved`` ones and the best ones a ``CheckpointManager``
recorded in the newest manifest are never deleted; incomplete directories are left to
``gc``. The choice is :func:`ckptsvc.ops.retention.select_for_deletion`, each delete
:func:`ckptsvc.ops.retention.delete_checkpoint` (manifest first).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ckptsvc.errors import ConfigError
from ckptsvc.ops.retention import delete_checkpoint, select_for_deletion
from ckptsvc.read.discovery import CheckpointInfo, CheckpointStatus, list_checkpoints
from ckptsvc.storage import Location

__all__ = ["PruneReport", "prune"]

logger = logging.getLogger(__name__)

#: ``ckptsvc.compat.restore.META_KEY``, spelled out: ``compat`` is a higher layer (and
#: imports torch); prune does not
_MANAGER_META_KEY = "ckptsvc_manager"


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
