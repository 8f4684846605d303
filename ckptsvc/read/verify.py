"""Check a checkpoint against its manifest, and find the newest checkpoint that passes.

``verify_checkpoint`` never raises for a damaged checkpoint: it returns a report listing
every problem with the file it concerns. It raises only when the storage itself fails
(permissions, an unreachable endpoint).

What is checked, in order:

1. the directory is a complete checkpoint (its manifest exists and parses);
2. every file the manifest lists exists, has the listed size (``shallow``), and, with
   ``deep``, the listed CRC-32C; on local disk a file that is a symlink resolving outside
   the checkpoint is refused and never read (a manifest without ckptsvc's file list, as
   Forgather writes it, only gets a check that the files its index names exist);
3. the weight index maps tensors only to files the manifest lists; with ``deep`` every
   safetensors header parses and holds every tensor the index maps to it (a stale index);
4. with ``deep``, the state skeleton of an async checkpoint parses and names only tensors
   the index holds.

``find_latest_verified`` walks checkpoints newest first and returns the first that passes:
it backs ``find_latest_checkpoint(model_dir, verify="shallow" | "deep")``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptsvc import knobs
from ckptsvc.errors import ConfigError, CorruptCheckpointError, StorageNotFoundError
from ckptsvc.format.checksum import Crc32c
from ckptsvc.format.json_doc import read_doc_bytes, read_json_doc
from ckptsvc.format.layout import SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME
from ckptsvc.format.manifest import FileRecord, Manifest, check_relpath
from ckptsvc.format.safetensors_stream import header_length, parse_header
from ckptsvc.format.skeleton import SKELETON_NAME, parse_skeleton
from ckptsvc.read.discovery import (
    CheckpointStatus,
    checkpoint_info,
)
from ckptsvc.read.regions import RegionReader
from ckptsvc.storage import Location

__all__ = ["Problem", "VerifyMode", "VerifyReport", "verify_checkpoint"]

logger = logging.getLogger(__name__)

VerifyMode = Literal["shallow", "deep"]
_HEADER_FIRST_READ = 64 * 1024
MAX_REPORTED_KEYS = 8


@dataclass(frozen=True)
class Problem:
    """One thing wrong: the file (relative to the checkpoint), a short kind, details.

    Kinds: ``missing``, ``size``, ``checksum``, ``symlink``, ``header``, ``index``,
    ``skeleton``, ``document``, ``incomplete``, ``manifest``.
    """

    path: str
    kind: str
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_checkpoint`; ``ok`` is the verdict."""

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


# ---- files -----------------------------------------------------------------------------------


def _escapes(ckpt: Location, loc: Location) -> bool:
    """True if the local file ``loc`` resolves (through symlinks) outside ``ckpt``."""
    if not ckpt.is_local:
        return False  # object stores have no symlinks
    base = os.path.realpath(ckpt.path)
    target = os.path.realpath(loc.path)
    return os.path.commonpath([base, target]) != base


_REMOTE_WINDOW_BYTES = 128 * 2**20


def _crc_of(loc: Location, nbytes: int) -> str:
    """CRC-32C of the file's first ``nbytes``. Local files are read sequentially; remote
    ones a window at a time, each window by parallel ranged reads (``read_scattered``)."""
    crc = Crc32c()
    if loc.is_local:
        step = knobs.READ_CHUNK_BYTES.get()
        for start in range(0, nbytes, step):
            crc.update(loc.read_range(start, min(nbytes, start + step)))
        return crc.hexdigest()
    window = bytearray(min(nbytes, _REMOTE_WINDOW_BYTES))
    for start in range(0, nbytes, len(window)):
        view = memoryview(window)[: min(len(window), nbytes - start)]
        loc.read_scattered([(start, view)])
        crc.update(view)
    return crc.hexdigest()


def _check_file(ckpt: Location, rec: FileRecord, deep: bool) -> Problem | None:
    loc = ckpt.join(rec.path)
    if _escapes(ckpt, loc):
        return Problem(
            rec.path,
            "symlink",
            f"{loc.url} resolves to {os.path.realpath(loc.path)}, outside the checkpoint; "
            "it was not read",
        )
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


# ---- index, headers, skeleton ----------------------------------------------------------------


def _read_weight_map(ckpt: Location, name: str) -> dict[str, str] | Problem:
    """The index's ``weight_map`` (every file name checked to stay inside), or the problem."""
    loc = ckpt.join(name)
    try:
        doc = read_json_doc(loc, what="index")
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("'weight_map' is not an object")
        for key, fname in weight_map.items():
            check_relpath(fname, where=f"{name} (key {key!r})")
    except (
        ValueError,  # JSONDecodeError, UnicodeDecodeError, CorruptCheckpointError
        KeyError,
        TypeError,
        RecursionError,
    ) as e:
        return Problem(name, "index", f"{loc.url}: unreadable index ({e})")
    return weight_map


def _header_names(ckpt: Location, rel_path: str) -> set[str] | Problem:
    """The tensor names of a safetensors file, after full header validation."""
    loc = ckpt.join(rel_path)
    try:
        nbytes = loc.size()
        head = loc.read_range(0, min(nbytes, _HEADER_FIRST_READ))
        n = header_length(head[:8], file_nbytes=nbytes, where=loc.url)
        if len(head) < 8 + n:
            head = loc.read_range(0, 8 + n)
        layout = parse_header(head, file_nbytes=nbytes, where=loc.url)
    except CorruptCheckpointError as e:
        return Problem(rel_path, "header", str(e))
    return {e.name for e in layout.entries}


def _check_index(
    ckpt: Location, manifest: Manifest, deep: bool, bad_files: set[str]
) -> tuple[list[Problem], set[str]]:
    """Index problems, and every tensor name the index maps (for the skeleton check)."""
    listed = {f.path for f in manifest.files}
    problems: list[Problem] = []
    mapped: set[str] = set()
    for name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        if name not in listed or name in bad_files:
            continue
        weight_map = _read_weight_map(ckpt, name)
        if isinstance(weight_map, Problem):
            problems.append(weight_map)
            continue
        mapped |= set(weight_map)
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
        for fname in sorted(set(by_file) - listed):
            problems.append(
                Problem(
                    fname,
                    "index",
                    f"{name} maps tensors to {fname}, which the manifest does not list",
                )
            )
        if not deep or name != SAFE_WEIGHTS_INDEX_NAME:
            continue
        for fname in sorted(set(by_file) & listed - bad_files):
            names = _header_names(ckpt, fname)
            if isinstance(names, Problem):
                problems.append(names)
                continue
            absent = sorted(set(by_file[fname]) - names)
            if absent:
                problems.append(
                    Problem(
                        fname,
                        "index",
                        f"{name} maps {len(absent)} tensor(s) to {fname} that it does not "
                        f"hold (stale index), e.g. {absent[:MAX_REPORTED_KEYS]}",
                    )
                )
    return problems, mapped


def _tensor_refs(node: Any) -> Iterator[Any]:
    """Every ``{"__tensor__": name}`` target in a skeleton (iterative: no recursion limit)."""
    stack = [node]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            if len(v) == 1 and "__tensor__" in v:
                yield v["__tensor__"]
            else:
                stack.extend(v.values())


def _check_skeleton(ckpt: Location, rel_path: str, mapped: set[str]) -> list[Problem]:
    loc = ckpt.join(rel_path)
    try:
        doc = parse_skeleton(read_doc_bytes(loc, what="state skeleton"), where=loc.url)
    except CorruptCheckpointError as e:
        return [Problem(rel_path, "skeleton", str(e))]
    aliases: set[str] = set()
    sharing = doc.get("param_sharing") or []
    if isinstance(sharing, list):
        for group in sharing:
            if isinstance(group, list) and any(n in mapped for n in group):
                aliases |= {n for n in group if isinstance(n, str)}
    known = mapped | aliases
    absent = sorted({repr(r) for r in _tensor_refs(doc.get("state")) if r not in known})
    if not absent:
        return []
    return [
        Problem(
            rel_path,
            "skeleton",
            f"{loc.url} names {len(absent)} tensor(s) the index does not hold, "
            f"e.g. {absent[:MAX_REPORTED_KEYS]}",
        )
    ]


def _doc_names(manifest: Manifest) -> list[str]:
    """Every component document the manifest's components list (component layout)."""
    out: list[str] = []
    for c in manifest.components:
        ours = c.metadata.get("ckptsvc")
        instances = ours.get("instances") if isinstance(ours, dict) else None
        for inst in (instances or {}).values():
            doc = inst.get("doc") if isinstance(inst, dict) else None
            if isinstance(doc, str) and doc not in out:
                out.append(doc)
    return out


def _check_document(ckpt: Location, rel_path: str, listed: set[str]) -> list[Problem]:
    """A component document parses, every tensor its state names is in its ``tensors``
    (or tied to one), and every tensor is held by a listed file whose header has it."""
    loc = ckpt.join(rel_path)
    try:
        if rel_path.endswith(".safetensors"):  # folded into that file's header
            doc = RegionReader(ckpt).document(rel_path)
        else:
            doc = read_json_doc(loc, what="component document")
    except CorruptCheckpointError as e:
        return [Problem(rel_path, "document", str(e))]
    tensors = doc.get("tensors") if isinstance(doc, dict) else None
    if not isinstance(tensors, dict):
        return [Problem(rel_path, "document", f"{loc.url}: no 'tensors' object")]
    known = set(tensors)
    for group in doc.get("param_sharing") or []:
        if isinstance(group, list) and known & set(group):
            known |= {n for n in group if isinstance(n, str)}
    problems: list[Problem] = []
    absent = sorted({repr(r) for r in _tensor_refs(doc.get("state")) if r not in known})
    if absent:
        problems.append(
            Problem(
                rel_path,
                "document",
                f"{loc.url} names {len(absent)} tensor(s) it does not describe, "
                f"e.g. {absent[:MAX_REPORTED_KEYS]}",
            )
        )
    by_file: dict[str, set[str]] = {}  # file -> names its header must hold
    for fqn, info in tensors.items():
        if not isinstance(info, dict):
            problems.append(Problem(rel_path, "document", f"{loc.url}: tensor {fqn!r} malformed"))
            continue
        if isinstance(info.get("pieces"), list):  # sharded state: pieces are named per rank
            for p in info["pieces"]:
                by_file.setdefault(str(p.get("file") if isinstance(p, dict) else None), set())
        else:
            by_file.setdefault(str(info.get("file")), set()).add(fqn)
    for fname, names in sorted(by_file.items()):
        if fname not in listed:
            problems.append(
                Problem(rel_path, "document", f"{loc.url} places tensors in {fname!r}, "
                        "which the manifest does not list")
            )  # fmt: skip
            continue
        held = _header_names(ckpt, fname) if names else set()
        if isinstance(held, Problem):
            problems.append(held)
            continue
        missing = sorted(names - held)
        if missing:
            problems.append(
                Problem(
                    fname,
                    "document",
                    f"{rel_path} places {len(missing)} tensor(s) in {fname} that it does not "
                    f"hold, e.g. {missing[:MAX_REPORTED_KEYS]}",
                )
            )
    return problems


# ---- the public functions --------------------------------------------------------------------


def verify_checkpoint(
    path: str | Location, *, deep: bool = True, storage_options: dict[str, Any] | None = None
) -> VerifyReport:
    """Verify one checkpoint (see the module docstring). ``deep`` reads every byte and
    checks CRC-32C, headers and the skeleton; otherwise only presence and sizes are
    checked. Files are checked in parallel."""
    ckpt = Location.parse(path, storage_options)
    info = checkpoint_info(ckpt, check_files=False)  # each file is checked below, by name
    if info.status is not CheckpointStatus.COMPLETE or info.manifest is None:
        why = info.reason or {
            CheckpointStatus.LEGACY: "no manifest (legacy checkpoint): nothing to verify against",
        }.get(info.status, "not a checkpoint")
        kind = "incomplete" if info.status is CheckpointStatus.INCOMPLETE else "manifest"
        return VerifyReport(ckpt.url, info.status.value, deep, problems=(Problem("", kind, why),))
    manifest = info.manifest
    files = manifest.files
    if not files:  # a manifest without ckptsvc's file list (Forgather writes these)
        return VerifyReport(
            ckpt.url, info.status.value, deep, problems=tuple(unlisted_problems(ckpt))
        )
    with ThreadPoolExecutor(max_workers=max(1, min(knobs.IO_THREADS.get(), len(files)))) as pool:
        found = list(pool.map(lambda r: _check_file(ckpt, r, deep), files))
    problems = [p for p in found if p is not None]
    bad_files = {p.path for p in problems}
    index_problems, mapped = _check_index(ckpt, manifest, deep, bad_files)
    problems += index_problems
    if deep and SKELETON_NAME in {f.path for f in files} and SKELETON_NAME not in bad_files:
        problems += _check_skeleton(ckpt, SKELETON_NAME, mapped)
    if deep:
        listed = {f.path for f in files}
        for name in _doc_names(manifest):
            if name in listed and name not in bad_files:
                problems += _check_document(ckpt, name, listed - bad_files)
    return VerifyReport(
        url=ckpt.url,
        status=info.status.value,
        deep=deep,
        files_checked=len(files),
        nbytes_checked=sum(f.nbytes for f in files),
        problems=tuple(problems),
    )


def unlisted_problems(ckpt: Location) -> list[Problem]:
    """Without a file list (a legacy checkpoint, or a manifest written by Forgather) nothing
    can be checksummed: check that every file the index names exists."""
    names = {c.name for c in ckpt.list_children()}
    problems: list[Problem] = []
    for index in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        if index not in names:
            continue
        weight_map = _read_weight_map(ckpt, index)
        if isinstance(weight_map, Problem):
            problems.append(weight_map)
            continue
        problems += [
            Problem(
                f, "missing", f"{index} maps tensors to {ckpt.join(f).url}, which does not exist"
            )
            for f in sorted(set(weight_map.values()) - names)
        ]
    return problems


def normalise_mode(verify: bool | str) -> VerifyMode:
    if verify is True or verify == "deep":
        return "deep"
    if verify == "shallow":
        return "shallow"
    raise ConfigError(f"verify must be False, True, 'shallow' or 'deep', not {verify!r}")
