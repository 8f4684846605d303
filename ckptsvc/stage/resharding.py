"""Sharded tensors (DTensor / FSDP2): save local shards with global offsets, load any layout.

Save (:func:`plan_sharded`, training thread of every rank): each DTensor of a component
contributes its rank's local shard, stored under its FQN in ``<base>-rank<r>.safetensors``
(``-<i>-of-<n>`` when it exceeds ``max_shard_size``), with the shard's global offsets and
shape reported to rank 0. Ranks that hold a *replica* of a shard (mesh dimensions with a
``Replicate`` placement, coordinate > 0) skip it, so every byte is stored once. Plain
tensors of the component are stored by rank 0 as single full pieces. Rank 0 merges the
pieces into the component's document (``<key>_state.json``)::

    "tensors": {"layers.0.w": {"dtype": "F32", "shape": [1024, 512],
                               "pieces": [{"file": "model-rank00000.safetensors",
                                           "offsets": [0, 0], "shape": [256, 512]}, ...]}}

Load (:class:`RegionReader`): each rank asks for the region its *current* layout needs
(``compute_local_shape_and_global_offset`` of the live DTensor, or the whole tensor for a
plain one), and reads exactly the intersecting byte ranges of the stored pieces - ranged
reads on object stores, ``preadv`` locally - straight into the destination tensor when
the bytes are contiguous there, else into a small buffer first. A different world size,
mesh or placement works the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ckptsvc import knobs
from ckptsvc.commit.coordinator import RankInfo
from ckptsvc.errors import CorruptCheckpointError, InvalidStateError
from ckptsvc.format.layout import FilePlan, assign_shards
from ckptsvc.format.manifest import Manifest
from ckptsvc.format.safetensors_stream import DTYPE_SIZES, ShardLayout, dtype_to_torch, plan_shard
from ckptsvc.read.loading import read_safetensors_header
from ckptsvc.stage.component_plan import (
    ComponentPlan,
    PartReport,
    StagedFile,
    _doc,
    _signature,
    base_name,
)
from ckptsvc.stage.components import StateComponent
from ckptsvc.stage.flatten import FlatState, is_dtensor
from ckptsvc.storage import Location

__all__ = ["Piece", "RegionReader", "local_region", "plan_sharded"]

_SHARD_META = {"format": "pt"}
_BAND_WASTE = 4  # read a whole contiguous band when it is at most this many times the box


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
        layout = plan_shard(((f, d, s) for f, d, s, _, _ in items), metadata=_SHARD_META)
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
        signature=_signature(sig_specs, flat.skeleton),
        sharded=pieces,
        metadata=dict(c.metadata),
    )
    doc = _doc(c, flat, tensors_doc) if info.rank == 0 else None
    return ComponentPlan(c, part, staged, {}, sharded_doc=doc)


# ---- reading regions ----------------------------------------------------------------------


def _strides(shape: Sequence[int]) -> list[int]:
    out = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        out[d] = out[d + 1] * shape[d + 1]
    return out


def _runs(p_shape: Sequence[int], lo: Sequence[int], ext: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous element runs ``(start, count)`` of box ``lo`` + ``ext`` inside a row-major
    block of ``p_shape``, in the box's row-major order."""
    nd = len(p_shape)
    j = nd - 1
    while j > 0 and ext[j] == p_shape[j]:
        j -= 1
    strides = _strides(p_shape)
    count = ext[j] * strides[j]
    outer = [range(lo[d], lo[d] + ext[d]) for d in range(j)]
    base = lo[j] * strides[j]
    runs = []
    for idx in _product(outer):
        runs.append((base + sum(i * strides[d] for d, i in enumerate(idx)), count))
    return runs


def _product(ranges: Sequence[range]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for r in ranges:
        out = [(*prefix, i) for prefix in out for i in r]
    return out


class RegionReader:
    """Collects wanted regions of stored tensors, then reads them all (files in parallel).

    1. ``want(name, dtype, pieces, offsets, shape)`` allocates and returns the destination
       tensor (CPU) and records, per file, the byte extents that fill it;
    2. ``run()`` reads every file's extents (coalesced, parallel ranged reads), then copies
       the boxes that could not land in place.
    """

    def __init__(
        self,
        ckpt: Location,
        *,
        manifest: Manifest | None = None,
        headers: dict[str, ShardLayout] | None = None,
    ) -> None:
        self._ckpt = ckpt
        self._manifest = manifest
        self._headers: dict[str, ShardLayout] = {} if headers is None else headers  # shared cache
        self._extents: dict[str, list[tuple[int, memoryview]]] = {}
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._keep: list[torch.Tensor] = []

    @property
    def planned_nbytes(self) -> int:
        """Bytes the next ``run`` reads (before coalescing of nearby ranges)."""
        return sum(v.nbytes for extents in self._extents.values() for _, v in extents)

    def header(self, file: str) -> ShardLayout:
        layout = self._headers.get(file)
        if layout is None:
            loc = self._ckpt.join(file)
            layout, size = read_safetensors_header(loc)
            record = self._manifest.file(file) if self._manifest is not None else None
            if record is not None and record.nbytes != size:
                raise CorruptCheckpointError(
                    f"{loc.url}: size {size} differs from the manifest's {record.nbytes} "
                    "(truncated or replaced file)"
                )
            self._headers[file] = layout
        return layout

    def want(
        self,
        name: str,
        dtype: str,
        pieces: Sequence[Piece],
        offsets: Sequence[int],
        shape: Sequence[int],
    ) -> torch.Tensor:
        out = torch.empty(tuple(shape), dtype=dtype_to_torch(dtype))
        if out.numel() == 0:
            return out
        covered = 0
        for piece in pieces:
            covered += self._add_piece(name, dtype, piece, out, offsets)
        if covered != out.numel():
            raise CorruptCheckpointError(
                f"{self._ckpt.url}: tensor {name!r}: the stored pieces cover {covered} of the "
                f"{out.numel()} elements of region offsets={list(offsets)} shape={list(shape)}"
            )
        return out

    def _add_piece(
        self, name: str, dtype: str, piece: Piece, out: torch.Tensor, r_off: Sequence[int]
    ) -> int:
        nd = out.dim()
        if len(piece.offsets) != nd or len(piece.shape) != nd:
            raise CorruptCheckpointError(f"{self._ckpt.url}: tensor {name!r}: piece rank mismatch")
        lo = [max(piece.offsets[d], r_off[d]) for d in range(nd)]
        hi = [min(piece.offsets[d] + piece.shape[d], r_off[d] + out.shape[d]) for d in range(nd)]
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            return 0
        ext = [h - low for low, h in zip(lo, hi, strict=True)]
        entry = self._entry(name, dtype, piece)
        itemsize = DTYPE_SIZES[dtype]
        file_base = self.header(piece.file).data_offset + entry.begin
        src_lo = [lo[d] - piece.offsets[d] for d in range(nd)]
        dest = out[tuple(slice(lo[d] - r_off[d], hi[d] - r_off[d]) for d in range(nd))]
        if nd == 0:
            self._extent(piece.file, file_base, out)
            return 1
        box_n = math.prod(ext)
        band_rows = ext[0]
        band_n = band_rows * math.prod(piece.shape[1:])
        if band_n <= _BAND_WASTE * box_n and band_n != box_n:  # one contiguous band, sliced after
            band = torch.empty((band_rows, *piece.shape[1:]), dtype=out.dtype)
            self._extent(
                piece.file, file_base + src_lo[0] * math.prod(piece.shape[1:]) * itemsize, band
            )
            box = band[(slice(None), *(slice(src_lo[d], src_lo[d] + ext[d]) for d in range(1, nd)))]
            self._copies.append((dest, box))
            return box_n
        target = dest if dest.is_contiguous() else torch.empty(ext, dtype=out.dtype)
        flat = target.reshape(-1)
        done = 0
        for start, count in _runs(piece.shape, src_lo, ext):
            self._extent(piece.file, file_base + start * itemsize, flat[done : done + count])
            done += count
        if target is not dest:
            self._copies.append((dest, target))
        return box_n

    def _entry(self, name: str, dtype: str, piece: Piece) -> Any:
        layout = self.header(piece.file)
        try:
            entry = layout.entry(name)
        except KeyError as e:
            raise CorruptCheckpointError(
                f"{self._ckpt.join(piece.file).url}: tensor {name!r} is listed in the component "
                "document but not in the file"
            ) from e
        if entry.dtype != dtype or tuple(entry.shape) != tuple(piece.shape):
            raise CorruptCheckpointError(
                f"{self._ckpt.join(piece.file).url}: tensor {name!r} is {entry.dtype}{list(entry.shape)} "
                f"but the document says {dtype}{list(piece.shape)}"
            )
        return entry

    def _extent(self, file: str, offset: int, t: torch.Tensor) -> None:
        self._keep.append(t)
        view = t.reshape(-1).view(torch.uint8).numpy().data.cast("B")
        self._extents.setdefault(file, []).append((offset, view))

    def run(self) -> None:
        files = sorted(self._extents)

        def one(file: str) -> None:
            self._ckpt.join(file).read_scattered(self._extents[file])

        threads = max(1, min(knobs.IO_THREADS.get(), len(files)))
        if threads == 1:
            for f in files:
                one(f)
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="ckptsvc-load") as pool:
                list(pool.map(one, files))
        for dest, src in self._copies:
            dest.copy_(src)
        self._extents.clear()
        self._copies.clear()
        self._keep.clear()
