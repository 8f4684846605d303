"""The newest usable checkpoint under a root: :func:`find_latest_checkpoint` (complete,
files matching the manifest) and :func:`find_latest_verified` (also passing
:func:`~ckptsvc.read.verify.verify_checkpoint`), newest first, skipping the rest with a
warning.

``find_latest_checkpoint`` reads the ``latest`` pointer first
(:mod:`ckptsvc.workers.latest_pointer`) and trusts it only once verified:

1. list ``<root>/checkpoints/`` and ``<root>/`` (names only: one LIST each);
2. for each folder whose listing holds a pointer: read it (one GET, at most 4 KiB), check
   it names a checkpoint directory listed beside it, read that checkpoint's manifest (one
   GET): complete, same step and timestamp as the pointer, files matching (locally
   stat'ed);
3. staleness: every listed checkpoint that could be newer than the pointed one - a higher
   step in its name, or a name without a step (Lightning's ``*.ckpt``, an unswapped
   replacement) - is classified (one GET of its manifest each; usually none, or the one
   save in flight); the newest of these and the pointed checkpoint (same order as the
   listing: manifest timestamp, then step) is the answer;
4. on an object store the answer's files are listed once (as without a pointer).

Anything else - no pointer, a damaged or hostile one (garbage, too large, a path instead
of a name), one naming a deleted, incomplete or replaced checkpoint - falls back to the
listing of every checkpoint (1 GET per checkpoint), with a warning for a bad pointer.
What the pointer path does not see: a checkpoint committed after the pointed one whose
committer did not move the pointer (it died between the manifest and the pointer, or it
writes none: ``ckptsvc cp``, tiering) *and* whose name holds a step no higher than the
pointed one's - a job that rolled back to an older checkpoint and was killed in that
window of its first save. Higher steps (the normal case of such a kill) are read. Delete
``ckptsvc-latest.json`` to make discovery list every checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from ckptsvc.errors import CheckpointError, CorruptCheckpointError, StorageNotFoundError
from ckptsvc.read.discovery import (
    CHECKPOINTS_DIR,
    CheckpointInfo,
    CheckpointStatus,
    checkpoint_folder_of,
    checkpoint_info,
    classify_entry,
    files_mismatch,
    is_checkpoint_name,
    list_checkpoints,
    validate_checkpoint,
)
from ckptsvc.read.verify import (
    MAX_REPORTED_KEYS,
    VerifyMode,
    normalise_mode,
    unlisted_problems,
    verify_checkpoint,
)
from ckptsvc.storage import ChildInfo, Location
from ckptsvc.workers.commit import REPLACEMENT_SUFFIX
from ckptsvc.workers.latest_pointer import MAX_POINTER_NBYTES, POINTER_NAME, read_pointer

__all__ = ["find_latest_checkpoint", "find_latest_verified"]

logger = logging.getLogger(__name__)


def find_latest_checkpoint(
    model_dir: str,
    *,
    verify: bool | str = False,
    storage_options: dict[str, Any] | None = None,
) -> str | None:
    """The newest complete (or legacy) checkpoint under ``<model_dir>/checkpoints`` or
    directly under ``model_dir`` (``<model_dir>/checkpoint-*``, the HF ``Trainer``'s layout).

    Complete checkpoints are ordered by manifest timestamp, legacy ones by modification
    time, ties broken by step. An incomplete checkpoint is never returned, not even when
    it is the only one. Without a ``checkpoints`` directory, ``model_dir`` itself is
    returned if it holds a checkpoint (Forgather's behaviour). The result is spelled like
    ``model_dir`` (relative stays relative), as ``next_checkpoint_path`` would build it.

    ``verify`` (``"shallow"``: sizes; ``"deep"`` or ``True``: sizes and CRC-32C) skips
    checkpoints that are complete but damaged, newest first (see
    :func:`find_latest_verified`).
    """
    if verify:
        return find_latest_verified(model_dir, verify=verify, storage_options=storage_options)  # type: ignore[arg-type]
    root = Location.parse(model_dir, storage_options)
    found = _via_pointer(root)
    if found is not None:
        return _spelled(model_dir, root, found)
    infos = list_checkpoints(root)
    if not infos and not root.join(CHECKPOINTS_DIR).exists():
        logger.info(
            "no %s directory under %s; checking the directory itself", CHECKPOINTS_DIR, root.url
        )
        return model_dir if validate_checkpoint(root.url, storage_options=storage_options) else None
    usable = [i for i in infos if i.status in (CheckpointStatus.COMPLETE, CheckpointStatus.LEGACY)]
    for latest in sorted(usable, key=CheckpointInfo.sort_key, reverse=True):
        why = _remote_mismatch(latest)
        if why:
            logger.warning(
                "skipping checkpoint %s: incomplete, its files do not match its manifest: %s",
                latest.url,
                why,
            )
            continue
        return _spelled(model_dir, root, latest)
    logger.warning("no complete checkpoint under %s", root.url)
    return None


def _via_pointer(root: Location) -> CheckpointInfo | None:
    """The latest checkpoint by way of the ``latest`` pointers (module docstring); ``None``
    when the listing must decide."""
    listed: list[tuple[Location, dict[str, ChildInfo]]] = []
    for folder in (root.join(CHECKPOINTS_DIR), root):
        try:
            listed.append((folder, {c.name: c for c in folder.list_children()}))
        except StorageNotFoundError:
            continue
        except (CheckpointError, OSError) as e:
            logger.warning("cannot list %s (%s); listing every checkpoint instead", folder.url, e)
            return None
    pointed = [
        info
        for folder, children in listed
        if POINTER_NAME in children
        for info in [_pointed(folder, children)]
        if info is not None
    ]
    if not pointed or any(
        name.endswith(REPLACEMENT_SUFFIX) for _, children in listed for name in children
    ):
        return None  # an unswapped replacement may stand in for its target: the listing decides
    floor = max(i.step if i.step is not None else -1 for i in pointed)
    rivals = [
        folder.join(name)
        for folder, children in listed
        for name, child in children.items()
        if child.is_dir
        and is_checkpoint_name(name)
        and folder.join(name).url not in {i.url for i in pointed}
        and _may_be_newer(name, floor)
    ]
    candidates = pointed + [
        info
        for info in map(classify_entry, rivals)
        if info.status in (CheckpointStatus.COMPLETE, CheckpointStatus.LEGACY)
    ]
    if not candidates:
        return None
    latest = max(candidates, key=CheckpointInfo.sort_key)
    # its files do not match its manifest: the listing decides (and warns for it)
    return None if _remote_mismatch(latest) else latest


def _remote_mismatch(info: CheckpointInfo) -> str:
    """Why a complete checkpoint on an object store does not match its manifest (one
    listing of its files; ``""`` when it does). Local files were stat'ed by
    ``checkpoint_info`` already."""
    if info.manifest is None or info.location.is_local:
        return ""
    try:
        return files_mismatch(info.location, info.manifest, listing=True)
    except (CheckpointError, OSError, ValueError) as e:
        return f"cannot list its files ({type(e).__name__}: {e})"


def _pointed(folder: Location, children: dict[str, ChildInfo]) -> CheckpointInfo | None:
    """The complete checkpoint ``folder``'s pointer names, verified; ``None`` (with a
    warning) when the pointer is damaged or names nothing usable."""
    entry = children[POINTER_NAME]
    where = folder.join(POINTER_NAME).url
    try:
        if entry.is_dir or entry.nbytes > MAX_POINTER_NBYTES:
            raise CorruptCheckpointError(
                f"{where}: not a latest pointer (a directory, or {entry.nbytes} bytes)"
            )
        pointer = read_pointer(folder)
        if pointer is None:
            return None  # deleted since the listing
        child = children.get(pointer.name)
        if child is None or not child.is_dir or not is_checkpoint_name(pointer.name):
            raise CorruptCheckpointError(
                f"{where} names {pointer.name!r}, which is not a checkpoint there (deleted?)"
            )
        info = checkpoint_info(folder.join(pointer.name))
        manifest = info.manifest
        if info.status is not CheckpointStatus.COMPLETE or manifest is None:
            raise CorruptCheckpointError(
                f"{where} names {pointer.name}, which is {info.status.value} ({info.reason})"
            )
        if (manifest.step, manifest.timestamp) != (pointer.step, pointer.manifest_timestamp):
            raise CorruptCheckpointError(
                f"{where} names step {pointer.step} of {pointer.manifest_timestamp}, but "
                f"{pointer.name} holds step {manifest.step} of {manifest.timestamp} (replaced?)"
            )
        return info
    except (CheckpointError, OSError, ValueError) as e:
        logger.warning("not using the latest pointer: %s; listing every checkpoint instead", e)
        return None


def _may_be_newer(name: str, floor: int) -> bool:
    """Whether the checkpoint ``name`` could be newer than the pointed step ``floor``: its
    name holds a higher step, or none at all (then it must be read)."""
    m = re.fullmatch(r"checkpoint-(\d{1,18})", name)
    return m is None or int(m.group(1)) > floor


def _spelled(model_dir: str, root: Location, info: CheckpointInfo) -> str:
    """The caller's spelling of ``model_dir``, then the listed checkpoint's folder and name."""
    folder = checkpoint_folder_of(root, info)
    if folder is None:  # a child of neither folder: only its URL names it
        return info.url
    parts = [p for p in (folder, info.location.name) if p]
    if "://" in str(model_dir):
        return "/".join([str(model_dir).rstrip("/"), *parts])
    return os.path.join(model_dir, *parts)


def find_latest_verified(
    model_dir: str,
    *,
    verify: bool | VerifyMode = "deep",
    storage_options: dict[str, Any] | None = None,
) -> str | None:
    """The newest checkpoint under ``model_dir`` (both layouts) that passes verification.

    Same order and spelling as ``find_latest_checkpoint``; a complete checkpoint that
    fails :func:`verify_checkpoint` (``"shallow"``: sizes; ``"deep"``: CRC-32C, headers,
    index, skeleton) is skipped with a warning naming its problems, and the next older one
    is tried. A legacy checkpoint (no manifest) passes if every file its index names
    exists. Without a ``checkpoints`` directory, ``model_dir`` itself is checked.
    """
    deep = normalise_mode(verify) == "deep"
    root = Location.parse(model_dir, storage_options)
    infos = list_checkpoints(root)
    candidates: list[tuple[CheckpointInfo, str]]
    if not infos and not root.join(CHECKPOINTS_DIR).exists():
        candidates = [(checkpoint_info(root), model_dir)]
    else:
        candidates = [(i, _spelled(model_dir, root, i)) for i in infos]
    usable = [
        (i, p)
        for i, p in candidates
        if i.status in (CheckpointStatus.COMPLETE, CheckpointStatus.LEGACY)
    ]
    for info, spelled in sorted(usable, key=lambda c: c[0].sort_key(), reverse=True):
        if info.status is CheckpointStatus.LEGACY:
            issues = [p.detail for p in unlisted_problems(info.location)]
        else:
            report = verify_checkpoint(info.location, deep=deep)
            issues = [f"{p.kind}: {p.detail}" for p in report.problems]
        if not issues:
            return spelled
        logger.warning(
            "skipping checkpoint %s: it fails %s verification: %s",
            info.url,
            "deep" if deep else "shallow",
            "; ".join(issues[:MAX_REPORTED_KEYS]),
        )
    return None
