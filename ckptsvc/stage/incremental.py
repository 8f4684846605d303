"""The trainer's side of incremental saves: which shards may be unchanged, and the base.

An incremental save writes only what changed since the previous checkpoint and
materialises every other shard from it (hard link locally, S3 ``CopyObject``, GCS
rewrite), so each checkpoint stays complete, self-contained and readable by Hugging Face
tools, and retention can delete any checkpoint on its own. Steps (and who runs them):

1. flatten (training thread, :func:`ckptsvc.stage.flatten.flatten_state`): parameters with
   ``requires_grad=False`` are *frozen*;
2. plan (training thread, :func:`ckptsvc.format.layout.plan_files` / ``frozen_groups``): frozen
   tensors get shards of their own, so those files are byte-identical from save to save;
   :func:`frozen_files` names them (the reuse candidates);
3. job (training thread, :func:`base_fields`): the base - the last checkpoint this
   checkpointer committed, or the one the manager resumed from - and its records of the
   candidate files go into the ``SaveJob``;
4. write (node writer, :mod:`ckptsvc.workers.reuse`): a candidate whose size and CRC-32C
   equal the base's record is copied from the base, anything else is written;
5. report (client reader thread): ``SaveTimings.nbytes_written`` / ``nbytes_reused``; the
   committed checkpoint becomes the next base (:class:`IncrementalBase`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ckptsvc.format.layout import FilePlan
from ckptsvc.format.manifest import FileRecord
from ckptsvc.storage import Location

__all__ = ["IncrementalBase", "base_fields", "frozen_files"]


@dataclass(frozen=True)
class IncrementalBase:
    """A committed checkpoint (path or URL) and its files' records (size, CRC-32C)."""

    path: str
    files: tuple[FileRecord, ...]


def frozen_files(plans: Iterable[FilePlan], frozen: Collection[str]) -> frozenset[str]:
    """Names of the planned files that hold frozen tensors only (reuse candidates)."""
    if not frozen:
        return frozenset()
    return frozenset(
        p.file_name
        for p in plans
        if p.layout.entries and all(e.name in frozen for e in p.layout.entries)
    )


def base_fields(
    base: IncrementalBase | None,
    *,
    path: str,
    candidates: Collection[str],
    storage_options: dict[str, Any],
) -> tuple[str, tuple[FileRecord, ...]]:
    """``(SaveJob.base_url, SaveJob.base_files)`` for a save to ``path``: the base's
    records of ``candidates``; empty when there is nothing to reuse (no base, no
    candidate, or the base is the checkpoint being written)."""
    if base is None or not candidates:
        return "", ()
    files: Sequence[FileRecord] = [r for r in base.files if r.path in candidates]
    if not files:
        return "", ()
    base_url = Location.parse(base.path, storage_options).url
    if base_url.rstrip("/") == Location.parse(path, storage_options).url.rstrip("/"):
        return "", ()
    return base_url, tuple(files)
