"""What one rank contributes to one component, and the names of its files.

Shared by the planners (:mod:`ckptsvc.stage.component_plan` for plain state,
:mod:`ckptsvc.stage.sharded_plan` for DTensors), the commit (:mod:`ckptsvc.commit.reports`
merges the :class:`PartReport` of every rank) and the loader (document names and format).
File naming is described in :mod:`ckptsvc.stage.component_plan`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptsvc.format.layout import FilePlan
from ckptsvc.stage.components import SharingPattern, StateComponent
from ckptsvc.stage.flatten import FlatState

__all__ = [
    "DOC_FORMAT",
    "DOC_META_KEY",
    "DOC_VERSION",
    "MAX_FOLDED_DOC_BYTES",
    "MODEL_KEY",
    "SHARD_META",
    "ComponentPlan",
    "DocInputs",
    "OrderedSources",
    "PartReport",
    "StagedFile",
    "base_name",
    "component_doc",
    "doc_name",
    "instance_suffix",
    "json_bytes",
    "signature",
    "signature_of",
    "spec_digest",
]

MODEL_KEY = "model"
DOC_FORMAT = "ckptsvc-component"
DOC_VERSION = 1
SHARD_META = {"format": "pt"}
#: the ``__metadata__`` key of a per-rank instance's first shard that holds its document
DOC_META_KEY = "ckptsvc_component"
#: a larger document stays a file of its own (safetensors readers refuse headers over
#: 100 MB, ``CKPTSVC_MAX_HEADER_BYTES`` ours)
MAX_FOLDED_DOC_BYTES = 16 * 2**20


def base_name(key: str) -> str:
    return MODEL_KEY if key == MODEL_KEY else f"{key}_state"


def doc_name(key: str, suffix: str) -> str:
    """The instance document of component ``key``: ``<key>_state<suffix>.json``."""
    return f"{key}_state{suffix}.json"


def instance_suffix(
    pattern: SharingPattern,
    *,
    rank: int,
    node_index: int,
    group_name: str | None = None,
    group_leader: int | None = None,
) -> str:
    if pattern is SharingPattern.PER_RANK:
        return f"_rank_{rank}"
    if pattern is SharingPattern.PER_NODE:
        return f"_node_{node_index}"
    if pattern is SharingPattern.PER_GROUP:
        return f"_group_{group_name}_{group_leader}"
    return ""


@dataclass(frozen=True)
class PartReport:
    """What one rank contributes to one component (JSON-able; travels to rank 0).

    ``instance`` is the suffix of the instance this rank writes (``None``: nothing).
    ``crcs`` are per-tensor CRC-32C in plan order (``validate_replication`` only).
    ``sharded`` holds this rank's pieces of sharded tensors (rank 0 merges them).
    """

    key: str
    pattern: str
    group_name: str | None
    instance: str | None
    doc: str | None
    files: tuple[str, ...]
    nbytes: int
    signature: str
    replicas: tuple[int, ...] | None = None
    crcs: tuple[str, ...] | None = None
    sharded: Mapping[str, Any] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "pattern": self.pattern,
            "group_name": self.group_name,
            "instance": self.instance,
            "doc": self.doc,
            "files": list(self.files),
            "nbytes": self.nbytes,
            "signature": self.signature,
            "replicas": None if self.replicas is None else list(self.replicas),
            "crcs": None if self.crcs is None else list(self.crcs),
            "sharded": None if self.sharded is None else dict(self.sharded),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PartReport:
        return cls(
            key=str(d["key"]),
            pattern=str(d["pattern"]),
            group_name=d.get("group_name"),
            instance=d.get("instance"),
            doc=d.get("doc"),
            files=tuple(d.get("files") or ()),
            nbytes=int(d.get("nbytes") or 0),
            signature=str(d.get("signature", "")),
            replicas=None if d.get("replicas") is None else tuple(d["replicas"]),
            crcs=None if d.get("crcs") is None else tuple(d["crcs"]),
            sharded=d.get("sharded"),
            metadata=dict(d.get("metadata") or {}),
        )


class OrderedSources(Mapping[str, torch.Tensor]):
    """Source tensors by entry name, built from the names and the tensors in one order
    (the file's entries'): ``values_in_order`` gives them without a lookup per name, and
    the mapping itself is built only if someone asks by name."""

    def __init__(self, names: Sequence[str], values: Sequence[torch.Tensor]) -> None:
        if len(names) != len(values):
            raise ValueError(f"{len(names)} names for {len(values)} tensors")
        self.names = tuple(names)
        self.values_in_order = tuple(values)
        self._by_name: dict[str, torch.Tensor] | None = None

    def _mapping(self) -> dict[str, torch.Tensor]:
        if self._by_name is None:
            self._by_name = dict(zip(self.names, self.values_in_order, strict=True))
        return self._by_name

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._mapping()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True, eq=False)
class StagedFile:
    """A tensor file to stage in the arena: its plan, the source tensors by entry name,
    and whether this rank sends it to its writer (validation stages others' files too)."""

    plan: FilePlan
    sources: Mapping[str, torch.Tensor]
    write: bool
    #: the header before a document was folded into it (what the arena's layout depends
    #: on: the same for every save of one plan); None: ``plan.layout.header``
    arena_header: bytes | None = None

    @property
    def arena_key(self) -> tuple[str, bytes]:
        return (self.plan.file_name, self.arena_header or self.plan.layout.header)


@dataclass(frozen=True)
class DocInputs:
    """What a plain component's documents are built from besides its skeleton, kept so a
    reused plan (:mod:`ckptsvc.stage.plan_reuse`) re-encodes only what changes per save:
    the instance document's name and ``tensors``, and the HF index's weight map, total size
    and tied groups (``weight_map`` None: no index)."""

    doc_file: str
    tensors: Mapping[str, Any]
    weight_map: Mapping[str, str] | None = None
    total_size: int = 0
    param_sharing: tuple[tuple[str, ...], ...] = ()


@dataclass
class ComponentPlan:
    """One component as this rank saves it (built per save, on the training thread).

    ``docs`` are the small files this rank publishes itself (instance documents, the HF
    index); ``sharded_doc`` is the document rank 0 completes with every rank's pieces at
    commit; ``crc_names`` lists the tensors whose CRC-32C ``validate_replication``
    computes after the copy (into ``part.crcs``).
    """

    component: StateComponent
    part: PartReport
    files: list[StagedFile]
    docs: dict[str, bytes]
    sharded_doc: dict[str, Any] | None = None
    crc_names: tuple[str, ...] = ()
    frozen_files: frozenset[str] = frozenset()  # this rank's files of frozen tensors only
    doc_inputs: DocInputs | None = None  # plain components whose documents this rank writes


def spec_digest(flat_specs: Sequence[tuple[Any, ...]]) -> Any:
    """The running hash of a component's tensor specs (names, dtypes, shapes): the first
    half of :func:`signature`, kept by a reused plan."""
    return hashlib.sha256(json.dumps([list(s) for s in flat_specs]).encode())


def signature_of(digest: Any, skeleton_json: bytes) -> str:
    """A part's signature from :func:`spec_digest` and the skeleton's :func:`json_bytes`."""
    h = digest.copy()
    h.update(skeleton_json)
    return str(h.hexdigest()[:16])


def signature(flat_specs: Sequence[tuple[Any, ...]], skeleton: Mapping[str, Any]) -> str:
    """What replicas of a component compare: tensor specs and the whole skeleton (values
    included), hashed; a reused plan computes the same from its pre-encoded pieces."""
    return signature_of(spec_digest(flat_specs), json_bytes(skeleton))


def component_doc(
    component: StateComponent, flat: FlatState, tensors: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "format": DOC_FORMAT,
        "version": DOC_VERSION,
        "key": component.key,
        "sharing_pattern": component.sharing_pattern.value,
        "param_sharing": [list(g) for g in flat.param_sharing],
        "state": flat.skeleton["state"],
        "tensors": dict(tensors),
    }


def json_bytes(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=True, allow_nan=False).encode("ascii")
