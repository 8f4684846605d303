"""Sharded tensors (DTensor / FSDP2): this rank's part of a component, saved as local
shards with global offsets.

:func:`plan_sharded` (training thread of every rank): each DTensor of a component
contributes its rank's local shard, stored under its FQN in ``<base>-rank<r>.safetensors``
(``-<i>-of-<n>`` when it exceeds ``max_shard_size``), with the shard's global offsets and
shape reported to rank 0. Ranks that hold a *replica* of a shard (mesh dimensions with a
``Replicate`` placement, coordinate > 0) skip it, so every byte is stored once. Plain
tensors of the component are stored by rank 0 as single full pieces. Rank 0 merges the
pieces into the component's document (``<key>_state.json``)::

    "tensors": {"layers.0.w": {"dtype": "F32", "shape": [1024, 512],
                               "pieces": [{"file": "model-rank00000.safetensors",
                                           "offsets": [0, 0], "shape": [256, 512]}, ...]}}

Any layout loads back through :class:`ckptsvc.read.regions.RegionReader`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckptsvc.errors import CorruptCheckpointError, InvalidStateError
from ckptsvc.format.layout import FilePlan, assign_shards
from ckptsvc.format.safetensors_stream import DTYPE_SIZES, plan_shard
from ckptsvc.ranks import RankInfo
from ckptsvc.stage.components import StateComponent
from ckptsvc.stage.flatten import FlatState, is_dtensor
from ckptsvc.stage.parts import (
    SHARD_META,
    ComponentPlan,
    PartReport,
    StagedFile,
    base_name,
    component_doc,
    signature,
)

__all__ = ["Piece", "local_region", "plan_sharded"]


@dataclass(frozen=True)
class Piece:
    """A stored block of a tensor: file, global offsets, shape (row-major in the file)."""

    file: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str) -> Piece:
        try:
            return cls(
                str(d["file"]),
                tuple(int(x) for x in d["offsets"]),
                tuple(int(x) for x in d["shape"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{where}: malformed piece {d!r}") from e


def _check_placements(fqn: str, t: Any) -> None:
    for p in t.placements:
        name = type(p).__name__
        if name not in ("Shard", "Replicate"):
            raise InvalidStateError(
                f"tensor {fqn!r}: DTensor placement {p} cannot be checkpointed (only Shard and "
                "Replicate); redistribute it first (e.g. full_tensor() or Replicate)"
            )


def local_region(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offsets, local shape) of this rank's shard of DTensor ``t``."""
    # imported here: torch.distributed.tensor pulls sympy (~1.5 s per process); a DTensor
    # exists only once its module was imported, so this costs nothing when it is needed
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(int(x) for x in offsets), tuple(int(x) for x in shape)


def _stores_shard(t: Any) -> bool:
    """False on ranks holding a replica (coordinate > 0 on a Replicate mesh dimension)."""
    coord = t.device_mesh.get_coordinate()
    if coord is None:
        return False
    return all(c == 0 for c, p in zip(coord, t.placements, strict=True) if p.is_replicate())


def _dt(t: Any) -> Any:
    """A DTensor seen as ``Any`` (its attributes are not in torch.Tensor's type)."""
    return t


def plan_sharded(
    c: StateComponent, flat: FlatState, *, info: RankInfo, max_shard_size: int
) -> ComponentPlan:
    """This rank's part of a component that holds DTensors (see the module docstring)."""
    mine: list[tuple[str, str, tuple[int, ...], tuple[int, ...], torch.Tensor]] = []
    tensors_doc: dict[str, dict[str, Any]] = {}
    sig_specs = []
    for (fqn, t), dtype in zip(flat.tensors, flat.dtypes, strict=True):
        if is_dtensor(t):
            _check_placements(fqn, t)
            offsets, shape = local_region(t)
            local = t.to_local()  # type: ignore[attr-defined]
            if tuple(local.shape) != shape:
                raise InvalidStateError(
                    f"tensor {fqn!r}: local shard has shape {tuple(local.shape)} but its "
                    f"placements imply {shape}; uneven or padded shards are not supported"
                )
            writes = _stores_shard(t)
            sig_specs.append((fqn, dtype, tuple(t.shape), str(tuple(_dt(t).placements))))
        else:
            local, shape, offsets = t, tuple(t.shape), (0,) * t.dim()
            writes = info.rank == 0
            sig_specs.append((fqn, dtype, shape, "plain"))
        tensors_doc[fqn] = {"dtype": dtype, "shape": list(t.shape), "pieces": []}
        if writes and math.prod(shape) > 0:
            mine.append((fqn, dtype, shape, offsets, local))
    assigned = assign_shards(
        [[(f, math.prod(s) * DTYPE_SIZES[d]) for f, d, s, _, _ in mine]],
        max_shard_size=max_shard_size,
        safetensors=True,
    )
    numbers = sorted(set(assigned.values()))
    base = f"{base_name(c.key)}-rank{info.rank:05}"
    rename = {
        old: f"{base}.safetensors"
        if len(numbers) == 1
        else f"{base}-{i + 1:05}-of-{len(numbers):05}.safetensors"
        for i, old in enumerate(numbers)
    }
    by_file: dict[str, list[tuple[str, str, tuple[int, ...], tuple[int, ...], torch.Tensor]]] = {}
    for item in mine:
        by_file.setdefault(rename[assigned[item[0]]], []).append(item)
    staged = []
    pieces: dict[str, list[dict[str, Any]]] = {}
    for name, items in by_file.items():
        layout = plan_shard(((f, d, s) for f, d, s, _, _ in items), metadata=SHARD_META)
        staged.append(
            StagedFile(FilePlan(name, layout), {f: t for f, _, _, _, t in items}, write=True)
        )
        for f, _, s, o, _ in items:
            pieces.setdefault(f, []).append({"file": name, "offsets": list(o), "shape": list(s)})
    files = tuple(sorted(by_file))
    part = PartReport(
        key=c.key,
        pattern=c.sharing_pattern.value,
        group_name=c.process_group_name,
        instance="" if files or info.rank == 0 else None,
        doc=None,
        files=files,
        nbytes=sum(f.plan.layout.file_nbytes for f in staged),
        signature=signature(sig_specs, flat.skeleton),
        sharded=pieces,
        metadata=dict(c.metadata),
    )
    doc = component_doc(c, flat, tensors_doc) if info.rank == 0 else None
    return ComponentPlan(c, part, staged, {}, sharded_doc=doc)
