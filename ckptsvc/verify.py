"""Check a checkpoint against its manifest: every file present, right size, right CRC-32C.

``verify_checkpoint`` never raises for a damaged checkpoint: it returns a report listing
every problem with the file it concerns. It raises only when the storage itself fails.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import knobs
from .checksum import Crc32c
from .discovery import CheckpointStatus, checkpoint_info
from .errors import CorruptCheckpointError, StorageNotFoundError
from .layout import SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME
from .manifest import FileRecord, check_relpath
from .storage import Location

__all__ = ["Problem", "VerifyReport", "verify_checkpoint"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong: the file (relative to the checkpoint), a short kind, details."""

    path: str
    kind: str  # "missing" | "size" | "checksum" | "index" | "incomplete" | "manifest"
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    url: str
    status: str
    deep: bool
    files_checked: int = 0
    nbytes_checked: int = 0
    problems: tuple[Problem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.status == CheckpointStatus.COMPLETE.value and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "status": self.status,
            "ok": self.ok,
            "deep": self.deep,
            "files_checked": self.files_checked,
            "nbytes_checked": self.nbytes_checked,
            "problems": [p.__dict__ for p in self.problems],
        }


def _crc_of(loc: Location, nbytes: int) -> str:
    crc = Crc32c()
    step = knobs.READ_CHUNK_BYTES.get()
    for start in range(0, nbytes, step):
        crc.update(loc.read_range(start, min(nbytes, start + step)))
    return crc.hexdigest()


def _check_file(ckpt: Location, rec: FileRecord, deep: bool) -> Problem | None:
    loc = ckpt.join(rec.path)
    try:
        size = loc.size()
    except StorageNotFoundError:
        return Problem(
            rec.path, "missing", f"{loc.url} is listed in the manifest but does not exist"
        )
    if size != rec.nbytes:
        return Problem(
            rec.path, "size", f"{loc.url} has {size} bytes, the manifest says {rec.nbytes}"
        )
    if deep:
        got = _crc_of(loc, size)
        if got != rec.crc32c:
            return Problem(
                rec.path, "checksum", f"{loc.url} CRC-32C is {got}, the manifest says {rec.crc32c}"
            )
    return None


def _check_index(ckpt: Location, listed: set[str]) -> list[Problem]:
    problems = []
    for name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        if name not in listed:
            continue
        try:
            doc = json.loads(ckpt.join(name).read_bytes())
            files = {check_relpath(f, where=name) for f in doc["weight_map"].values()}
        except (ValueError, KeyError, TypeError, AttributeError, CorruptCheckpointError) as e:
            problems.append(Problem(name, "index", f"unreadable index: {e}"))
            continue
        for f in sorted(files - listed):
            problems.append(
                Problem(f, "index", f"{name} maps tensors to {f}, which the manifest does not list")
            )
    return problems


def verify_checkpoint(
    path: str | Location, *, deep: bool = True, storage_options: dict[str, Any] | None = None
) -> VerifyReport:
    """Verify one checkpoint. ``deep`` reads every byte and checks CRC-32C; otherwise only
    presence and sizes are checked. Files are checked in parallel."""
    ckpt = Location.parse(path, storage_options)
    info = checkpoint_info(ckpt)
    if info.status is not CheckpointStatus.COMPLETE or info.manifest is None:
        why = info.reason or {
            CheckpointStatus.LEGACY: "no manifest (legacy checkpoint): nothing to verify against",
        }.get(info.status, "not a checkpoint")
        kind = "incomplete" if info.status is CheckpointStatus.INCOMPLETE else "manifest"
        return VerifyReport(ckpt.url, info.status.value, deep, problems=(Problem("", kind, why),))
    files = info.manifest.files
    with ThreadPoolExecutor(max_workers=max(1, min(knobs.IO_THREADS.get(), len(files)))) as pool:
        found = list(pool.map(lambda r: _check_file(ckpt, r, deep), files))
    problems = [p for p in found if p is not None]
    problems += _check_index(ckpt, {f.path for f in files})
    return VerifyReport(
        url=ckpt.url,
        status=info.status.value,
        deep=deep,
        files_checked=len(files),
        nbytes_checked=sum(f.nbytes for f in files),
        problems=tuple(problems),
    )
