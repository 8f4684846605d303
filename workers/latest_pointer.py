"""The ``latest`` pointer: one small object beside the checkpoints naming the newest one.

After each commit the committing process writes ``ckptsvc-latest.json`` into the folder
that holds the checkpoint (``<root>/checkpoints/`` for ckptsvc's layout, ``<root>/`` for
the Hugging Face ``Trainer``'s)::

    {"format": "ckptsvc-latest", "version": 1, "name": "checkpoint-12", "step": 12,
     "manifest_timestamp": "2026-12-03T19:40:00.123456+00:00"}

``name`` is the checkpoint directory's name in that folder (never a path: a name with
``/``, ``\\``, ``..`` or an absolute path is refused when read), ``step`` and
``manifest_timestamp`` are copied from its manifest, so a reader can tell the checkpoint it
points at was not replaced or deleted since. The pointer is written only when it moves
forward in discovery's order (manifest timestamp, then step): never back to a checkpoint
committed before the one it names. Two savers racing on one folder (each reads the
pointer, then writes) can still make it go back, which readers detect
(:mod:`ckptsvc.read.latest`: the pointer is a hint, verified against the manifest and the
folder's listing).

Torch-free: the node writer writes it after the manifest (:func:`advance_pointer`), and
retention / ``gc`` drop it before deleting the checkpoint it names (:func:`drop_pointer_to`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone

from ckptsvc.errors import CheckpointError, CorruptCheckpointError, StorageNotFoundError
from ckptsvc.format.manifest import Manifest
from ckptsvc.storage import Location

__all__ = [
    "MAX_POINTER_NBYTES",
    "POINTER_NAME",
    "LatestPointer",
    "advance_pointer",
    "current_pointer",
    "drop_pointer_to",
    "is_pointer_name",
    "read_pointer",
]

logger = logging.getLogger(__name__)

POINTER_NAME = "ckptsvc-latest.json"
#: a pointer is a few hundred bytes; anything larger is refused unread
MAX_POINTER_NBYTES = 4096
_FORMAT = "ckptsvc-latest"
_VERSION = 1
_NAME_RE = re.compile(r"[A-Za-z0-9._=-]{1,255}")


@dataclass(frozen=True)
class LatestPointer:
    """What ``ckptsvc-latest.json`` says: the checkpoint ``name`` in its folder, its step
    and its manifest's timestamp."""

    name: str
    step: int | None
    manifest_timestamp: str

    @classmethod
    def of(cls, name: str, manifest: Manifest) -> LatestPointer:
        """The pointer to the checkpoint ``name`` committed with ``manifest``."""
        return cls(name=name, step=manifest.step, manifest_timestamp=manifest.timestamp)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": _FORMAT,
                "version": _VERSION,
                "name": self.name,
                "step": self.step,
                "manifest_timestamp": self.manifest_timestamp,
            },
            ensure_ascii=True,
        ).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> LatestPointer:
        """Parse and check a pointer: :class:`CorruptCheckpointError` names what is wrong."""
        if len(raw) > MAX_POINTER_NBYTES:
            raise CorruptCheckpointError(
                f"{where}: {len(raw)} bytes, a latest pointer is at most {MAX_POINTER_NBYTES}"
            )
        try:
            d = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise CorruptCheckpointError(f"{where}: not a latest pointer ({e})") from e
        if not isinstance(d, dict) or d.get("format") != _FORMAT or d.get("version") != _VERSION:
            raise CorruptCheckpointError(
                f"{where}: not a version-{_VERSION} {_FORMAT} document; delete it (the next "
                "save writes a new one, discovery lists the folder meanwhile)"
            )
        name, step, stamp = d.get("name"), d.get("step"), d.get("manifest_timestamp")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
            raise CorruptCheckpointError(
                f"{where}: {name!r} is not a checkpoint name in this folder (a pointer names a "
                "directory beside it, never a path)"
            )
        if step is not None and (type(step) is not int or step < 0):
            raise CorruptCheckpointError(f"{where}: step {step!r} is not a non-negative int")
        if not isinstance(stamp, str) or len(stamp) > 64:
            raise CorruptCheckpointError(
                f"{where}: manifest_timestamp {stamp!r} is not a timestamp"
            )
        return cls(name=name, step=step, manifest_timestamp=stamp)


def read_pointer(folder: Location) -> LatestPointer | None:
    """The pointer in ``folder``; ``None`` when there is none. Raises
    :class:`CorruptCheckpointError` for a damaged or hostile one (bounded read)."""
    loc = folder.join(POINTER_NAME)
    if loc.is_local:  # never open a FIFO, device or symlink that stands in its place
        try:
            st = os.lstat(loc.path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpointError(f"{loc.url} is not a regular file, not a latest pointer")
    try:
        raw = loc.read_range(0, MAX_POINTER_NBYTES + 1)
    except StorageNotFoundError:
        return None
    return LatestPointer.from_json(raw, where=loc.url)


def current_pointer(folder: Location) -> LatestPointer | None:
    """The pointer in ``folder`` as a writer sees it: ``None`` when there is none, or when it
    is damaged or unreadable (logged; the next write replaces it)."""
    try:
        return read_pointer(folder)
    except (CheckpointError, OSError) as e:
        logger.warning("replacing a damaged or unreadable latest pointer in %s: %s", folder.url, e)
        return None


def advance_pointer(
    ckpt: Location, manifest: Manifest, *, current: Future[LatestPointer | None] | None = None
) -> bool:
    """After the commit of ``ckpt`` (its ``manifest`` published): point its folder's
    ``latest`` at it, unless the pointer there already names a newer checkpoint (a later
    commit, or the same time and a higher step: discovery's order). ``current``:
    the folder's pointer read ahead (:func:`current_pointer`, overlapping the commit's
    other requests); else it is read now. Returns whether it wrote. Best effort: the
    checkpoint is committed whatever happens here (a failure is logged; readers fall back
    to listing the folder)."""
    if not is_pointer_name(ckpt.name):
        return False  # a hidden successor: the swap names the checkpoint, not this directory
    folder = ckpt.parent
    try:
        now = current.result() if current is not None else current_pointer(folder)
        ours = _order(manifest.timestamp, manifest.step)
        if now is not None and _order(now.manifest_timestamp, now.step) > ours:
            logger.info(
                "latest pointer in %s stays at %s (step %s): %s is step %s",
                folder.url,
                now.name,
                now.step,
                ckpt.name,
                manifest.step,
            )
            return False
        folder.join(POINTER_NAME).publish(LatestPointer.of(ckpt.name, manifest).to_json())
        return True
    except (CheckpointError, OSError) as e:
        logger.warning("could not update the latest pointer in %s: %s", folder.url, e)
        return False


def is_pointer_name(name: str) -> bool:
    """Whether a pointer may name the directory ``name``: a name discovery lists
    (``checkpoint-*``, Lightning's ``*.ckpt``), not a hidden successor."""
    return (
        bool(_NAME_RE.fullmatch(name))
        and not name.startswith(".")
        and (name.startswith("checkpoint-") or (name.endswith(".ckpt") and name != ".ckpt"))
    )


def _order(timestamp: str, step: int | None) -> tuple[float, int]:
    """Discovery's order (manifest timestamp, then step): a later commit is newer."""
    try:
        ts = datetime.fromisoformat(timestamp)
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=timezone.utc)
        when = ts.timestamp()
    except (ValueError, OverflowError):
        when = 0.0
    return (when, -1 if step is None else step)


def drop_pointer_to(ckpt: Location) -> None:
    """Before ``ckpt`` is deleted: remove its folder's pointer if it names ``ckpt`` (or
    cannot be read), so a pointer never names a deleted checkpoint. Discovery lists the
    folder until the next save writes a new pointer."""
    folder = ckpt.parent
    try:
        current = read_pointer(folder)
    except CorruptCheckpointError:
        current = LatestPointer(name=ckpt.name, step=None, manifest_timestamp="")
    if current is not None and current.name == ckpt.name:
        folder.join(POINTER_NAME).remove(missing_ok=True)
