"""Shard planning: which tensor goes to which file, and the Hugging Face index.

Files follow the HF convention: ``model-00001-of-0000N.safetensors`` listed in
``model.safetensors.index.json`` (or ``pytorch_model-...bin`` and
``pytorch_model.bin.index.json`` for the legacy torch format). Shards are filled in the
caller's tensor order and cut when the next tensor would exceed ``max_shard_size``
counting *tensor* bytes (Forgather counted whole storages, so views inflated shards).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptsvc.errors import ConfigError, InvalidStateError
from ckptsvc.format.safetensors_stream import DTYPE_SIZES, ShardLayout, plan_shard

__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "FilePlan",
    "TensorSpec",
    "assign_shards",
    "encode_index",
    "frozen_groups",
    "index_file_name",
    "make_index",
    "plan_files",
    "shard_file_name",
]

WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def index_file_name(safetensors: bool) -> str:
    """The canonical index file name for the chosen format."""
    return SAFE_WEIGHTS_INDEX_NAME if safetensors else WEIGHTS_INDEX_NAME


def shard_file_name(number: int, count: int, *, safetensors: bool) -> str:
    """``model-00001-of-00003.safetensors`` / ``pytorch_model-00001-of-00003.bin`` (1-based)."""
    if safetensors:
        return f"model-{number:05}-of-{count:05}.safetensors"
    return f"pytorch_model-{number:05}-of-{count:05}.bin"


@dataclass(frozen=True)
class TensorSpec:
    """What the planner needs to know of a tensor: never its bytes."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class FilePlan:
    """One shard file to write: its name and its safetensors layout (header included)."""

    file_name: str
    layout: ShardLayout


def assign_shards(
    groups: Sequence[Sequence[tuple[str, int]]], *, max_shard_size: int, safetensors: bool
) -> dict[str, str]:
    """Map names to shard files. Each group (a state dict) gets shards of its own.

    ``groups`` holds ``(name, nbytes)`` pairs in order. A shard is closed before a tensor
    that would push it past ``max_shard_size`` (a tensor larger than the limit gets a shard
    to itself). Returns ``{name: file_name}`` in input order.
    """
    if max_shard_size <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {max_shard_size}")
    shards: list[list[str]] = []
    for group in groups:
        current: list[str] = []
        current_nbytes = 0
        for name, nbytes in group:
            if current and current_nbytes + nbytes > max_shard_size:
                shards.append(current)
                current, current_nbytes = [], 0
            current.append(name)
            current_nbytes += nbytes
        if current:
            shards.append(current)
    count = len(shards)
    return {
        name: shard_file_name(i + 1, count, safetensors=safetensors)
        for i, names in enumerate(shards)
        for name in names
    }


def plan_files(
    specs: Sequence[TensorSpec],
    *,
    max_shard_size: int,
    metadata: Mapping[str, str] | None = None,
    frozen: Collection[str] = (),
) -> tuple[FilePlan, ...]:
    """Plan the safetensors shard files for ``specs`` (in order), headers encoded.

    Every shard carries ``metadata`` (str -> str) in its ``__metadata__``, always with
    ``"format": "pt"``, which transformers requires. Tensors named in ``frozen`` get
    shards of their own, after the others' (so an incremental save finds them unchanged).
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InvalidStateError(f"duplicate tensor names: {dup[:5]}")
    weight_map = assign_shards(
        frozen_groups([(s.name, s.nbytes) for s in specs], frozen),
        max_shard_size=max_shard_size,
        safetensors=True,
    )
    by_file: dict[str, list[TensorSpec]] = {}
    for s in specs:
        by_file.setdefault(weight_map[s.name], []).append(s)
    meta = {"format": "pt", **(metadata or {})}
    return tuple(
        FilePlan(
            file_name=fname,
            layout=plan_shard(((s.name, s.dtype, s.shape) for s in members), metadata=meta),
        )
        for fname, members in by_file.items()
    )


def frozen_groups(
    items: Sequence[tuple[str, int]], frozen: Collection[str]
) -> list[list[tuple[str, int]]]:
    """Split ``(name, nbytes)`` pairs into [trainable, frozen] groups for
    :func:`assign_shards` (order kept within each; empty groups dropped)."""
    if not frozen:
        return [list(items)]
    names = frozenset(frozen)
    groups = [[i for i in items if i[0] not in names], [i for i in items if i[0] in names]]
    return [g for g in groups if g]


def make_index(
    weight_map: Mapping[str, str],
    *,
    total_size: int,
    metadata: Mapping[str, Any] | None = None,
    param_sharing: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The HF index document. ``metadata`` is copied, never mutated."""
    meta: dict[str, Any] = dict(metadata or {})
    meta["total_size"] = int(total_size)
    if param_sharing:
        meta["param_sharing"] = [list(g) for g in param_sharing]
    return {"metadata": meta, "weight_map": dict(weight_map)}


def encode_index(index: Mapping[str, Any]) -> bytes:
    """The bytes of an index document, as Hugging Face writes them (indent 4, ASCII): the
    one place an index is encoded."""
    return json.dumps(index, indent=4, ensure_ascii=True).encode("ascii")


def weight_map_of(plans: Sequence[FilePlan]) -> dict[str, str]:
    """``{tensor name: file name}`` for planned safetensors files, in name order."""
    return {
        e.name: p.file_name for p in plans for e in sorted(p.layout.entries, key=lambda e: e.name)
    }
