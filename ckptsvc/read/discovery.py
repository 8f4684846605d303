"""Which checkpoints exist under a root, which are complete, and which is the latest.

Classification of one checkpoint directory (DESIGN.md section 4):

- **complete**: ``checkpoint_manifest.json`` exists and parses;
- **incomplete**: no (valid) manifest, but our in-progress marker, or a manifest that does
  not parse - a save that never committed; never returned, collectable by ``gc``;
- **legacy**: no manifest and no marker but model weights (a Forgather or HF checkpoint
  written without a manifest) - ordered by modification time, as Forgather does;
- **absent**: none of these;
- **damaged**: the entry could not be classified at all (an I/O error, a name that is not
  a directory, ...); logged and skipped, never returned, left to a person.

A complete checkpoint's files must match its manifest: locally every listed file is
stat'ed (present, regular, recorded size), otherwise the directory is incomplete (a copy
cut short by ``cp -r``/rsync copies the manifest first). On object stores the listing is
done only for the candidate :func:`find_latest_checkpoint` is about to return. Each entry
is classified on its own: one hostile or damaged entry never stops the listing.

Checkpoints are listed in three layouts: ``<root>/checkpoints/checkpoint-*`` (ckptsvc's),
``<root>/checkpoint-*`` (the Hugging Face ``Trainer``'s, which the HF callback writes) and
``<root>/*.ckpt`` directories (a Lightning ``ModelCheckpoint`` ``dirpath`` as root, which
the Lightning plugin writes; Lightning's own ``.ckpt`` *files* are not checkpoints here).
On object stores, discovery costs one listing each of ``<root>/checkpoints/`` and
``<root>/`` plus one GET of
each candidate's manifest, issued in parallel; a directory is listed only when its
manifest is missing, and ``find_latest_checkpoint`` lists the one it returns (its files
must match its manifest).
"""

from __future__ import annotations

import enum
import logging
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ckptsvc import knobs
from ckptsvc.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageNotFoundError,
)
from ckptsvc.format.json_doc import read_doc_bytes
from ckptsvc.format.layout import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME, Manifest
from ckptsvc.read.manifest_view import read_manifest_view
from ckptsvc.storage import Location
from ckptsvc.workers.claim import describe_claim
from ckptsvc.workers.commit import REPLACEMENT_SUFFIX

__all__ = [
    "CheckpointInfo",
    "CheckpointStatus",
    "checkpoint_folder_of",
    "checkpoint_info",
    "classify_entry",
    "is_checkpoint_name",
    "list_checkpoints",
    "next_checkpoint_path",
    "read_manifest",
    "refuse_unloadable",
    "require_checkpoint_path",
    "require_complete_checkpoint",
    "validate_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
#: the reason of an incomplete checkpoint that holds our in-progress marker
NEVER_COMMITTED = "save never committed"
_CKPT_RE = re.compile(r"^checkpoint-(.+)$")
#: how Lightning's ``ModelCheckpoint`` names a checkpoint (``<dirpath>/step=400.ckpt``)
LIGHTNING_SUFFIX = ".ckpt"
_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
#: files that make a manifest-less directory a legacy checkpoint (Forgather's order)
LEGACY_WEIGHT_FILES = (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_NAME)


class CheckpointStatus(enum.Enum):
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    LEGACY = "legacy"
    ABSENT = "absent"
    DAMAGED = "damaged"


@dataclass(frozen=True)
class CheckpointInfo:
    """What discovery knows of one checkpoint directory."""

    location: Location
    status: CheckpointStatus
    manifest: Manifest | None
    mtime_s: float | None
    reason: str = ""
    #: a manifest parsed, but the files do not match it (a copy cut short, damage)
    mismatch: bool = False

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def checkpoint_id(self) -> str:
        m = _CKPT_RE.match(self.location.name)
        return m.group(1) if m else self.location.name

    @property
    def step(self) -> int | None:
        if self.manifest is not None and self.manifest.step is not None:
            return self.manifest.step
        try:
            return int(self.checkpoint_id)
        except ValueError:
            return None

    def sort_key(self) -> tuple[float, int]:
        """Manifest timestamp (complete) or mtime (legacy), then the step as tie-break."""
        ts = self.manifest.timestamp_s() if self.manifest is not None else (self.mtime_s or 0.0)
        return (ts, self.step if self.step is not None else -1)


def read_manifest(ckpt: Location, *, view_rank: int | None = None) -> Manifest | None:
    """The parsed manifest, ``None`` if there is none; CorruptCheckpointError if unparseable.

    ``view_rank``: only what that rank needs of a v3 manifest (the head and its region,
    :func:`~ckptsvc.read.manifest_view.read_manifest_view`); a v1/v2 manifest is read whole.
    """
    if view_rank is not None:
        try:
            return read_manifest_view(ckpt, rank=view_rank)
        except StorageNotFoundError:
            return None
    loc = ckpt.join(MANIFEST_NAME)
    try:
        raw = read_doc_bytes(loc, what="manifest")  # bounded, regular files only
    except StorageNotFoundError:
        return None
    return Manifest.from_json(raw, where=loc.url)


def files_mismatch(ckpt: Location, manifest: Manifest, *, listing: bool = False) -> str:
    """Why the files of ``ckpt`` do not match ``manifest`` (``""`` when they do).

    Locally each listed file is stat'ed (of a view: the head's and that rank's files) (must be a regular file of the recorded size).
    Elsewhere nothing is checked unless ``listing`` is set; then one recursive listing
    of the checkpoint is compared with the manifest.
    """
    if ckpt.is_local:
        for rec in manifest.files:
            path = os.path.join(ckpt.path, *rec.path.split("/"))
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return f"{rec.path} is missing (copy or save cut short?)"
            except OSError as e:
                return f"{rec.path} cannot be stat'ed ({e})"
            if not stat.S_ISREG(st.st_mode):
                return f"{rec.path} is not a regular file"
            if st.st_size != rec.nbytes:
                return (
                    f"{rec.path} is {st.st_size} bytes, the manifest records {rec.nbytes} "
                    "(copy cut short or file replaced)"
                )
        return ""
    if not listing:
        return ""
    sizes = dict(ckpt.walk_files())
    for rec in manifest.files:
        if rec.path not in sizes:
            return f"{rec.path} is missing (copy or upload cut short?)"
        if sizes[rec.path] != rec.nbytes:
            return f"{rec.path} is {sizes[rec.path]} bytes, the manifest records {rec.nbytes}"
    return ""


def checkpoint_info(
    path: Location | str,
    *,
    storage_options: dict[str, Any] | None = None,
    check_files: bool = True,
    view_rank: int | None = None,
) -> CheckpointInfo:
    """Classify one directory (see the module docstring).

    ``check_files=False`` skips comparing a local checkpoint's files with its manifest
    (for callers that check each file themselves and report it by name: verify, load).
    ``view_rank``: read only that rank's view of a v3 manifest (the files compared are
    then the head's and that rank's).
    """
    loc = Location.parse(path, storage_options)
    try:
        manifest = read_manifest(loc, view_rank=view_rank)
    except CorruptCheckpointError as e:
        return CheckpointInfo(loc, CheckpointStatus.INCOMPLETE, None, None, reason=str(e))
    if manifest is not None:
        why = files_mismatch(loc, manifest) if check_files else ""
        if why:
            return CheckpointInfo(
                loc,
                CheckpointStatus.INCOMPLETE,
                None,
                None,
                reason=f"its files do not match its manifest: {why}",
                mismatch=True,
            )
        return CheckpointInfo(loc, CheckpointStatus.COMPLETE, manifest, None)
    try:
        children = {c.name: c for c in loc.list_children()}
    except StorageNotFoundError:
        return CheckpointInfo(loc, CheckpointStatus.ABSENT, None, None, reason="no such directory")
    if MARKER_NAME in children:
        return CheckpointInfo(loc, CheckpointStatus.INCOMPLETE, None, None, reason=NEVER_COMMITTED)
    weights = [n for n in LEGACY_WEIGHT_FILES if n in children]
    if weights:
        mtime = max((children[n].mtime or 0.0) for n in weights)
        if loc.is_local:
            mtime = os.path.getmtime(loc.path)
        return CheckpointInfo(loc, CheckpointStatus.LEGACY, None, mtime)
    return CheckpointInfo(
        loc, CheckpointStatus.ABSENT, None, None, reason="no manifest and no weights"
    )


#: what a refused checkpoint's message tells a resuming user to do
RESUME_HINT = "resume from find_latest_checkpoint(...) instead, or delete it with `ckptsvc gc`"


def refuse_unloadable(
    info: CheckpointInfo, *, legacy_ok: bool = False, hint: str = RESUME_HINT
) -> None:
    """The one check every reader makes before it reads a checkpoint (load, load_state,
    export, cp, tiering, DCP): raises :class:`CorruptCheckpointError` when its files do not
    match its manifest, :class:`IncompleteCheckpointError` for a save that never committed
    (a marker, a manifest that does not parse) and :class:`CheckpointNotFoundError` for nothing there - or for a directory
    without a manifest (written without ckptsvc) unless ``legacy_ok``. ``hint`` ends the
    message: what to do instead."""
    if info.mismatch:
        raise CorruptCheckpointError(
            f"{info.url}: {info.reason} (a copy or transfer cut short, or damaged files); {hint}"
        )
    if info.status is CheckpointStatus.INCOMPLETE:
        why = info.reason
        if why == NEVER_COMMITTED:  # whose save: this process's in flight, another's, a dead one
            why = f"{why}: {describe_claim(info.location)}"
        raise IncompleteCheckpointError(f"{info.url} is an incomplete checkpoint ({why}); {hint}")
    if info.manifest is None and not (legacy_ok and info.status is CheckpointStatus.LEGACY):
        raise CheckpointNotFoundError(
            f"{info.url}: no checkpoint manifest ({info.status.value}"
            + (f": {info.reason}" if info.reason else "")
            + "; not a complete checkpoint written by ckptsvc)"
        )


def require_checkpoint_path(path: object, *, caller: str) -> None:
    """Refuse ``path=None`` with :class:`CheckpointNotFoundError`: what a loader gets from
    ``find_latest_checkpoint`` when a root holds no complete checkpoint yet."""
    if path is None:
        raise CheckpointNotFoundError(
            f"no checkpoint: {caller}() was given None as the checkpoint path, which is what "
            "find_latest_checkpoint returns when the root holds no complete checkpoint; check "
            "its result before loading (`if latest is not None:`)"
        )


def require_complete_checkpoint(ckpt: Location, *, view_rank: int | None = None) -> Manifest:
    """The manifest of the complete checkpoint ``ckpt``; a loader's first check
    (:func:`refuse_unloadable`). ``view_rank``: that rank's view of a v3 manifest."""
    info = checkpoint_info(ckpt, view_rank=view_rank)
    refuse_unloadable(info)
    if info.manifest is None:  # refuse_unloadable raised; for the type checker
        raise CheckpointNotFoundError(f"{ckpt.url}: no checkpoint manifest")
    return info.manifest


def list_checkpoints(
    root: Location | str, *, storage_options: dict[str, Any] | None = None
) -> list[CheckpointInfo]:
    """Every checkpoint directory under ``root``, oldest first: ``checkpoints/checkpoint-*``
    (ckptsvc's layout), and ``checkpoint-*`` (the Hugging Face ``Trainer``'s layout, which
    :class:`~ckptsvc.integrations.hf_trainer.CkptsvcCallback` writes) and ``*.ckpt``
    (Lightning's ``ModelCheckpoint`` names, which
    :class:`~ckptsvc.integrations.lightning.CkptsvcCheckpointIO` writes) directly under
    ``root``."""
    root_loc = Location.parse(root, storage_options)
    infos: list[CheckpointInfo] = []
    for folder in (root_loc.join(CHECKPOINTS_DIR), root_loc):
        infos += _list_folder(folder)
    return sorted(infos, key=CheckpointInfo.sort_key)


def _list_folder(folder: Location) -> list[CheckpointInfo]:
    """The ``checkpoint-*`` directories of one folder (and unswapped replacements)."""
    try:
        children = folder.list_children()
    except StorageNotFoundError:
        return []
    dirs = [folder.join(c.name) for c in children if c.is_dir and is_checkpoint_name(c.name)]
    successors = {  # ".checkpoint-N.ckptsvc-replace" -> "checkpoint-N"
        c.name: c.name[1 : -len(REPLACEMENT_SUFFIX)]
        for c in children
        if c.is_dir
        and c.name.startswith(".")
        and c.name.endswith(REPLACEMENT_SUFFIX)
        and is_checkpoint_name(c.name[1 : -len(REPLACEMENT_SUFFIX)])
    }
    if not dirs and not successors:
        return []
    with ThreadPoolExecutor(max_workers=min(16, max(1, knobs.IO_THREADS.get() * 2))) as pool:
        infos = list(pool.map(classify_entry, dirs))
    if successors:
        infos = _with_unswapped_successors(folder, infos, successors)
    return infos


def is_checkpoint_name(name: str) -> bool:
    """``checkpoint-*`` (ckptsvc's and the HF Trainer's names) or ``*.ckpt`` (Lightning's)."""
    return bool(_CKPT_RE.match(name)) or (
        name.endswith(LIGHTNING_SUFFIX) and len(name) > len(LIGHTNING_SUFFIX)
    )


def checkpoint_folder_of(root: Location, info: CheckpointInfo) -> str | None:
    """``"checkpoints"`` or ``""``: where under ``root`` the listed checkpoint ``info`` lies
    (``None`` when it is not a child of either folder)."""
    parent = info.location.parent.path.rstrip("/")
    if parent == root.join(CHECKPOINTS_DIR).path.rstrip("/"):
        return CHECKPOINTS_DIR
    if parent == root.path.rstrip("/"):
        return ""
    return None


def _with_unswapped_successors(
    root: Location, infos: list[CheckpointInfo], successors: dict[str, str]
) -> list[CheckpointInfo]:
    """A committed replacement whose target is not complete (a swap cut short on an object
    store, or between the two renames where ``RENAME_EXCHANGE`` is missing) stands in for
    its target until a later save of that step or ``gc`` moves it into place."""
    by_name = {i.location.name: i for i in infos}
    for hidden, target in sorted(successors.items()):
        current = by_name.get(target)
        if current is not None and current.status is CheckpointStatus.COMPLETE:
            continue  # a replacement in flight (or one already swapped): not a checkpoint
        info = classify_entry(root.join(hidden))
        if info.status is not CheckpointStatus.COMPLETE:
            continue
        logger.warning("%s was not swapped into %s yet; it stands in for it", info.url, target)
        infos = [i for i in infos if i.location.name != target] + [info]
    return infos


def classify_entry(loc: Location) -> CheckpointInfo:
    """:func:`checkpoint_info` for one listed entry; whatever goes wrong stays with it."""
    try:
        info = checkpoint_info(loc)
    except (CheckpointError, OSError, ValueError, OverflowError, RecursionError) as e:
        info = CheckpointInfo(
            loc, CheckpointStatus.DAMAGED, None, None, reason=f"{type(e).__name__}: {e}"
        )
    if info.status in (CheckpointStatus.INCOMPLETE, CheckpointStatus.DAMAGED):
        logger.warning("checkpoint %s is %s: %s", loc.url, info.status.value, info.reason)
    return info


def validate_checkpoint(
    checkpoint_path: str, *, storage_options: dict[str, Any] | None = None
) -> bool:
    """True for a complete or legacy checkpoint; False for an incomplete or absent one."""
    info = checkpoint_info(checkpoint_path, storage_options=storage_options)
    return info.status in (CheckpointStatus.COMPLETE, CheckpointStatus.LEGACY)


def next_checkpoint_path(model_dir: str, checkpoint_id: int | str) -> str:
    """``<model_dir>/checkpoints/checkpoint-<id>`` (local path or URL). ``checkpoint_id``
    is a non-negative int or a name of ``[A-Za-z0-9._-]`` (else ``ConfigError``)."""
    checkpoint_id = _check_checkpoint_id(checkpoint_id)
    if "://" in str(model_dir):
        return f"{str(model_dir).rstrip('/')}/{CHECKPOINTS_DIR}/checkpoint-{checkpoint_id}"
    return os.path.join(model_dir, CHECKPOINTS_DIR, f"checkpoint-{checkpoint_id}")


def _check_checkpoint_id(checkpoint_id: object) -> str:
    """A step, or a name of letters, digits, ``.``, ``_`` and ``-`` (not ``.`` or ``..``)."""
    if type(checkpoint_id) is int and checkpoint_id >= 0:
        return str(checkpoint_id)
    if (
        not isinstance(checkpoint_id, str)
        or not _ID_RE.fullmatch(checkpoint_id)
        or checkpoint_id in (".", "..")
        or len(checkpoint_id) > 200
    ):
        raise ConfigError(
            f"checkpoint id must be a non-negative int or a name of [A-Za-z0-9._-], not "
            f"{checkpoint_id!r}"
        )
    return checkpoint_id
