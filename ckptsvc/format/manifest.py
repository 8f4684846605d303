"""The checkpoint manifest: the commit record, written last.

``checkpoint_manifest.json`` keeps Forgather's top-level fields (``checkpoint_path``,
``world_size``, ``timestamp``, ``components`` with Forgather's eight per-component keys,
``training_args_hash``, ``forgather_version``, ``pytorch_version``, ``metadata``) so
Forgather can parse it. Everything ckptsvc adds lives under ``metadata["ckptsvc"]``:
format version, step, library version and every file with its size and CRC-32C.

A checkpoint directory is complete if and only if this file exists and parses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ckptsvc.errors import CorruptCheckpointError, LifecycleError
from ckptsvc.format import manifest_v3
from ckptsvc.format.json_doc import parse_json_doc
from ckptsvc.version import __version__

__all__ = [
    "FOLDED_FORMAT_VERSION",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MARKER_NAME",
    "PLAIN_FORMAT_VERSION",
    "ComponentRecord",
    "FileRecord",
    "Manifest",
    "check_relpath",
    "now_iso",
]

#: the newest manifest format this code reads. 1: every component document is a JSON
#: file; 2: some instance's document is in its first tensor file's safetensors header
#: (``instances[...]["doc"]`` names a ``.safetensors`` file); 3: the same records laid out
#: so that one rank reads only the head and its own region (``format/manifest_v3.py``),
#: written when more than one rank wrote ``per_rank`` instances. A save writes the lowest
#: version that describes it, so readers of version 1 still read what they can.
FORMAT_VERSION = manifest_v3.V3_FORMAT_VERSION
FOLDED_FORMAT_VERSION = 2
PLAIN_FORMAT_VERSION = 1
MANIFEST_NAME = "checkpoint_manifest.json"
#: written first by every save, removed after the manifest: "ours, and not finished"
MARKER_NAME = ".ckptsvc-in-progress"
_OURS = "ckptsvc"


def now_iso() -> str:
    """Current UTC time, ISO 8601 with microseconds (sortable, parseable by Forgather)."""
    return datetime.now(timezone.utc).isoformat()


def check_relpath(name: object, *, where: str) -> str:
    """Return ``name`` if it is a safe relative path inside a checkpoint, else raise.

    Rejects absolute paths, URLs, ``..``, backslashes, NUL and empty components: a
    manifest or index can never point a reader outside its checkpoint directory.
    """
    if not isinstance(name, str) or not name:
        raise CorruptCheckpointError(f"{where}: file name {name!r} is not a non-empty string")
    bad = (
        name.startswith("/")
        or "://" in name
        or "\\" in name
        or "\x00" in name
        or any(p in ("", ".", "..") for p in name.split("/"))
    )
    if bad:
        raise CorruptCheckpointError(
            f"{where}: unsafe file name {name!r} (must stay inside the checkpoint)"
        )
    return name


#: commit times outside these years are a damaged manifest (a clock or a hand edit gone wrong)
MIN_YEAR, MAX_YEAR = 1970, 2999


def _check_timestamp(text: str, *, where: str) -> None:
    """Refuse a commit time that does not parse or lies outside ``MIN_YEAR..MAX_YEAR`` (a
    year-9999 timestamp would otherwise make a checkpoint the newest forever)."""
    try:
        ts = datetime.fromisoformat(text)
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=timezone.utc)
        year = ts.astimezone(timezone.utc).year
    except (ValueError, OverflowError) as e:
        raise CorruptCheckpointError(
            f"{where}: manifest timestamp {text[:64]!r} is not an ISO 8601 time ({e})"
        ) from e
    if not MIN_YEAR <= year <= MAX_YEAR:
        raise CorruptCheckpointError(
            f"{where}: manifest timestamp {text[:64]!r} lies outside the years "
            f"{MIN_YEAR}..{MAX_YEAR} (damaged manifest)"
        )


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint: path relative to the checkpoint, size, CRC-32C hex."""

    path: str
    nbytes: int
    crc32c: str


@dataclass(frozen=True)
class ComponentRecord:
    """A saved state component, with Forgather's eight keys."""

    key: str
    sharing_pattern: str
    ranks: tuple[int, ...]
    replicated_across: tuple[int, ...] | None = None
    group_name: str | None = None
    size_bytes: int = 0
    checksum: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "sharing_pattern": self.sharing_pattern,
            "ranks": list(self.ranks),
            "replicated_across": None
            if self.replicated_across is None
            else list(self.replicated_across),
            "group_name": self.group_name,
            "size_bytes": self.size_bytes,
            "checksum": self.checksum,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: Any, *, where: str) -> ComponentRecord:
        if not isinstance(d, dict) or not isinstance(d.get("key"), str):
            raise CorruptCheckpointError(f"{where}: component entry is malformed")
        try:
            rep = d.get("replicated_across")
            return cls(
                key=d["key"],
                sharing_pattern=str(d.get("sharing_pattern", "global")),
                ranks=tuple(int(r) for r in d.get("ranks") or ()),
                replicated_across=None if rep is None else tuple(int(r) for r in rep),
                group_name=d.get("group_name"),
                size_bytes=int(d.get("size_bytes") or 0),
                checksum=d.get("checksum"),
                metadata=dict(d.get("metadata") or {}),
            )
        except (TypeError, ValueError, OverflowError) as e:
            raise CorruptCheckpointError(
                f"{where}: component {d.get('key')!r} is malformed ({e})"
            ) from e


@dataclass(frozen=True)
class Manifest:
    """The parsed commit record of one checkpoint."""

    checkpoint_path: str
    world_size: int
    timestamp: str
    step: int | None
    files: tuple[FileRecord, ...]
    components: tuple[ComponentRecord, ...] = ()
    training_args_hash: str | None = None
    forgather_version: str | None = None
    pytorch_version: str | None = None
    library_version: str = ""
    format_version: int = PLAIN_FORMAT_VERSION
    user_metadata: Mapping[str, Any] = field(default_factory=dict)
    #: set when this is one rank's view of a v3 manifest (the head and that rank's region,
    #: ``read.manifest_view``): ``files`` and the components' instances are the head's and
    #: that rank's only, and what needs every rank (``to_json``, ``total_nbytes``) refuses
    view_rank: int | None = None

    @classmethod
    def new(
        cls,
        *,
        checkpoint_path: str,
        world_size: int,
        step: int | None,
        files: Iterable[FileRecord],
        components: Iterable[ComponentRecord],
        pytorch_version: str | None,
        user_metadata: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """The manifest of a commit happening now: every save builds it here (the node
        writer, the synchronous save, the DCP plugin). Files are listed once each, by path;
        the library version is this one's."""
        by_path = {f.path: f for f in files}
        components = tuple(components)
        return cls(
            checkpoint_path=checkpoint_path,
            world_size=world_size,
            timestamp=now_iso(),
            step=step,
            files=tuple(by_path[p] for p in sorted(by_path)),
            components=components,
            pytorch_version=pytorch_version,
            library_version=__version__,
            format_version=_version_for(components, world_size=world_size),
            user_metadata=dict(user_metadata or {}),
        )

    def require_whole(self, what: str) -> None:
        """Refuse (:class:`LifecycleError`) when this is one rank's view: ``what`` needs
        every rank's records."""
        if self.view_rank is not None:
            raise LifecycleError(
                f"{self.checkpoint_path}: {what} needs the whole manifest, but this is rank "
                f"{self.view_rank}'s view of it (read_manifest_view); read it with "
                "read_manifest() instead"
            )

    @property
    def total_nbytes(self) -> int:
        self.require_whole("total_nbytes")
        return sum(f.nbytes for f in self.files)

    def file(self, path: str) -> FileRecord | None:
        for f in self.files:
            if f.path == path:
                return f
        return None

    def timestamp_s(self) -> float:
        """The commit time as epoch seconds (0.0 if unparseable)."""
        try:
            ts = datetime.fromisoformat(self.timestamp)
            if ts.tzinfo is None:
                ts = ts.replace(tzinfo=timezone.utc)
            return ts.timestamp()
        except (ValueError, OverflowError):
            return 0.0

    def to_json(self) -> bytes:
        """Deterministic JSON bytes (golden-tested: change only with FORMAT_VERSION); the
        v3 layout (``format/manifest_v3.py``) for format 3."""
        self.require_whole("to_json")
        metadata = dict(self.user_metadata)
        metadata[_OURS] = {
            "format_version": self.format_version,
            "library_version": self.library_version,
            "step": self.step,
            "files": {f.path: {"nbytes": f.nbytes, "crc32c": f.crc32c} for f in self.files},
        }
        doc = {
            "checkpoint_path": self.checkpoint_path,
            "world_size": self.world_size,
            "timestamp": self.timestamp,
            "components": {c.key: c.to_dict() for c in self.components},
            "training_args_hash": self.training_args_hash,
            "forgather_version": self.forgather_version,
            "pytorch_version": self.pytorch_version,
            "metadata": metadata,
        }
        if self.format_version >= manifest_v3.V3_FORMAT_VERSION:
            return manifest_v3.encode(doc)
        return (json.dumps(doc, indent=2, ensure_ascii=True) + "\n").encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> Manifest:
        """Parse and validate; :class:`CorruptCheckpointError` names ``where`` on any fault.
        A v3 manifest is read whole: every region merged back (the same ``Manifest`` as
        formats 1 and 2 give)."""

        doc = parse_json_doc(raw, where=where, what="manifest")
        if isinstance(doc, dict) and manifest_v3.LAYOUT_KEY in doc:
            doc = manifest_v3.decode(doc, raw=bytes(raw), where=where)
        return cls.from_doc(doc, where=where)

    @classmethod
    def from_doc(cls, doc: Any, *, where: str, view_rank: int | None = None) -> Manifest:
        """Validate a parsed v1-style manifest document (``view_rank``: it is that rank's
        view of a v3 manifest, see :attr:`view_rank`)."""
        if not isinstance(doc, dict):
            raise CorruptCheckpointError(f"{where}: manifest is not a JSON object")
        meta = doc.get("metadata") or {}
        if not isinstance(meta, dict):
            raise CorruptCheckpointError(f"{where}: manifest 'metadata' is not an object")
        meta = dict(meta)
        ours = meta.pop(_OURS, None) or {}
        if not isinstance(ours, dict):
            raise CorruptCheckpointError(f"{where}: manifest 'metadata.{_OURS}' is not an object")
        version = ours.get("format_version", 0)
        if type(version) is not int or version < 0:
            raise CorruptCheckpointError(f"{where}: manifest format version {version!r} is invalid")
        if version > FORMAT_VERSION:
            raise CorruptCheckpointError(
                f"{where}: manifest format version {version} is newer than this ckptsvc "
                f"understands ({FORMAT_VERSION}); upgrade ckptsvc"
            )
        files = []
        raw_files = ours.get("files") or {}
        if not isinstance(raw_files, dict):
            raise CorruptCheckpointError(f"{where}: manifest file list is not an object")
        for path, info in raw_files.items():
            check_relpath(path, where=where)
            if (
                not isinstance(info, dict)
                or type(info.get("nbytes")) is not int
                or info["nbytes"] < 0
                or not isinstance(info.get("crc32c"), str)
            ):
                raise CorruptCheckpointError(f"{where}: manifest entry for {path!r} is malformed")
            files.append(FileRecord(path, info["nbytes"], info["crc32c"]))
        comps = doc.get("components") or {}
        if not isinstance(comps, dict):
            raise CorruptCheckpointError(f"{where}: manifest 'components' is not an object")
        step = ours.get("step")
        timestamp = doc.get("timestamp")
        if not isinstance(timestamp, str):
            raise CorruptCheckpointError(f"{where}: manifest has no timestamp")
        _check_timestamp(timestamp, where=where)
        try:
            world_size = int(doc.get("world_size") or 1)
        except (TypeError, ValueError, OverflowError) as e:
            raise CorruptCheckpointError(f"{where}: manifest world_size is not an integer") from e
        return cls(
            checkpoint_path=str(doc.get("checkpoint_path", "")),
            world_size=world_size,
            timestamp=timestamp,
            step=step if type(step) is int else None,
            files=tuple(files),
            components=tuple(ComponentRecord.from_dict(c, where=where) for c in comps.values()),
            training_args_hash=doc.get("training_args_hash"),
            forgather_version=doc.get("forgather_version"),
            pytorch_version=doc.get("pytorch_version"),
            library_version=str(ours.get("library_version", "")),
            format_version=version,
            user_metadata=meta,
            view_rank=view_rank,
        )


def _version_for(components: Iterable[ComponentRecord], *, world_size: int) -> int:
    """3 when more than one rank wrote ``per_rank`` instances; else 2 when an instance's
    document is folded into a tensor file; else 1."""
    components = tuple(components)
    records = [c.to_dict() for c in components]
    if len(manifest_v3.regions_in(records, ranks=world_size)) > 1:
        return manifest_v3.V3_FORMAT_VERSION
    for c in components:
        ours = c.metadata.get(_OURS)
        instances = ours.get("instances") if isinstance(ours, dict) else None
        for inst in (instances or {}).values():
            if str(inst.get("doc") or "").endswith(".safetensors"):
                return FOLDED_FORMAT_VERSION
    return PLAIN_FORMAT_VERSION
