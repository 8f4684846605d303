"""The newest usable checkpoint under a root: :func:`find_latest_checkpoint` (complete,
files matching the manifest) and :func:`find_latest_verified` (also passing
:func:`~ckptsvc.read.verify.verify_checkpoint`), newest first, skipping the rest with a
warning."""

from __future__ import annotations

import logging
import os
from typing import Any

from ckptsvc.errors import CheckpointError
from ckptsvc.read.discovery import (
    CHECKPOINTS_DIR,
    CheckpointInfo,
    CheckpointStatus,
    checkpoint_folder_of,
    checkpoint_info,
    files_mismatch,
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
from ckptsvc.storage import Location

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
    infos = list_checkpoints(root)
    if not infos and not root.join(CHECKPOINTS_DIR).exists():
        logger.info(
            "no %s directory under %s; checking the directory itself", CHECKPOINTS_DIR, root.url
        )
        return model_dir if validate_checkpoint(root.url, storage_options=storage_options) else None
    usable = [i for i in infos if i.status in (CheckpointStatus.COMPLETE, CheckpointStatus.LEGACY)]
    for latest in sorted(usable, key=CheckpointInfo.sort_key, reverse=True):
        if latest.manifest is not None and not latest.location.is_local:
            # local files were stat'ed by checkpoint_info; remote: list only this candidate
            try:
                why = files_mismatch(latest.location, latest.manifest, listing=True)
            except (CheckpointError, OSError, ValueError) as e:
                why = f"cannot list its files ({type(e).__name__}: {e})"
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
