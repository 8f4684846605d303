"""``gc``: reclaim the debris of saves that never committed.

What counts as debris under a model directory's ``checkpoints/``:

- an **incomplete** checkpoint directory (marker and no manifest, or an unparseable
  manifest) that is *older than the newest complete checkpoint* and whose marker does not
  belong to a live process on this host (it may be a save in flight);
- leftover temp files of atomic publishes (``.<name>.<hex>.tmp``) inside any checkpoint.

Complete checkpoints are never touched. ``dry_run`` reports without deleting.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .discovery import CheckpointInfo, CheckpointStatus, list_checkpoints
from .errors import StorageNotFoundError
from .manifest import MARKER_NAME
from .retention import delete_checkpoint
from .storage import Location

__all__ = ["GcReport", "collect_garbage"]

logger = logging.getLogger(__name__)
_TMP_RE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


@dataclass(frozen=True)
class GcReport:
    root: str
    dry_run: bool
    removed: tuple[str, ...] = field(default_factory=tuple)
    kept: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (url, why)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "dry_run": self.dry_run,
            "removed": list(self.removed),
            "kept": [{"url": u, "why": w} for u, w in self.kept],
        }


def _marker(ckpt: Location) -> dict[str, Any]:
    try:
        doc = json.loads(ckpt.join(MARKER_NAME).read_bytes())
    except (StorageNotFoundError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _started_s(marker: dict[str, Any]) -> float | None:
    try:
        ts = datetime.fromisoformat(str(marker["started"]))
    except (KeyError, ValueError):
        return None
    return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).timestamp()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _why_keep(info: CheckpointInfo, newest_complete_s: float | None) -> str | None:
    marker = _marker(info.location)
    pid = marker.get("pid")
    same_host = marker.get("host") == socket.gethostname()
    if same_host and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
        return f"its writer (pid {marker['pid']}) is still running"
    if newest_complete_s is None:
        return "there is no complete checkpoint yet; it may be the first save in flight"
    started = _started_s(marker)
    if started is not None and started >= newest_complete_s:
        return "it started after the newest complete checkpoint; it may be in flight"
    return None


def collect_garbage(
    root: str, *, dry_run: bool = False, storage_options: dict[str, Any] | None = None
) -> GcReport:
    """Remove incomplete checkpoints and stray temp files under ``root/checkpoints``."""
    infos = list_checkpoints(root, storage_options=storage_options)
    complete = [i for i in infos if i.status is CheckpointStatus.COMPLETE]
    newest = max((i.sort_key()[0] for i in complete), default=None)
    removed: list[str] = []
    kept: list[tuple[str, str]] = []
    for info in infos:
        if info.status is CheckpointStatus.INCOMPLETE:
            why = _why_keep(info, newest)
            if why:
                kept.append((info.url, why))
                continue
            removed.append(info.url)
            if not dry_run:
                delete_checkpoint(info.location)
        elif info.status is CheckpointStatus.COMPLETE:
            for child in info.location.list_children():
                if not child.is_dir and _TMP_RE.match(child.name):
                    target = info.location.join(child.name)
                    removed.append(target.url)
                    if not dry_run:
                        target.remove(missing_ok=True)
    for url in removed:
        logger.info("%s %s", "would remove" if dry_run else "removed", url)
    return GcReport(root=str(root), dry_run=dry_run, removed=tuple(removed), kept=tuple(kept))
