"""Reading regions of stored tensors: :class:`RegionReader`.

Each rank asks for the region its *current* layout needs
(:func:`~ckptsvc.stage.sharded_plan.local_region` of the live DTensor, or the whole tensor
for a plain one), and reads exactly the intersecting byte ranges of the stored pieces -
ranged reads on object stores, ``preadv`` locally - straight into the destination tensor
when the bytes are contiguous there, else into a small buffer first. A different world
size, mesh or placement works the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ckptsvc import knobs
from ckptsvc.errors import CorruptCheckpointError
from ckptsvc.format.json_doc import parse_json_doc
from ckptsvc.format.manifest import Manifest
from ckptsvc.format.safetensors_stream import DTYPE_SIZES, ShardLayout
from ckptsvc.read.loading import check_inside, read_safetensors_header
from ckptsvc.read.node_cache import CachedFiles
from ckptsvc.read.shard_read import read_shard
from ckptsvc.stage.parts import DOC_META_KEY
from ckptsvc.stage.sharded_plan import Piece
from ckptsvc.stage.tensors import dtype_to_torch
from ckptsvc.storage import Location

__all__ = ["Piece", "RegionReader"]

_BAND_WASTE = 4  # read a whole contiguous band when it is at most this many times the box


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
        files: CachedFiles | None = None,
    ) -> None:
        self._ckpt = ckpt
        self._files = files  # the node cache's copies of replicated files (read.node_cache)
        self._manifest = manifest
        self._headers: dict[str, ShardLayout] = {} if headers is None else headers  # shared cache
        self._extents: dict[str, list[tuple[int, memoryview]]] = {}
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._keep: list[torch.Tensor] = []
        self._whole: dict[str, dict[str, torch.Tensor | None]] = {}

    @property
    def planned_nbytes(self) -> int:
        """Bytes the next ``run`` reads (before coalescing of nearby ranges)."""
        return sum(v.nbytes for extents in self._extents.values() for _, v in extents)

    def _source(self, file: str) -> Location:
        """Where ``file`` is read from: its node cache copy, else the checkpoint."""
        return self._files.location(file) if self._files is not None else self._ckpt.join(file)

    def header(self, file: str) -> ShardLayout:
        layout = self._headers.get(file)
        if layout is None:
            loc = self._ckpt.join(file)
            check_inside(self._ckpt, loc)  # as every loader does: never follow a link out
            loc = self._source(file)
            layout, size = read_safetensors_header(loc)
            record = self._manifest.file(file) if self._manifest is not None else None
            if record is not None and record.nbytes != size:
                raise CorruptCheckpointError(
                    f"{loc.url}: size {size} differs from the manifest's {record.nbytes} "
                    "(truncated or replaced file)"
                )
            self._headers[file] = layout
        return layout

    def document(self, file: str, *, what: str = "component document") -> Any:
        """The JSON document a tensor file carries in its header's
        ``__metadata__["ckptsvc_component"]`` (a per-rank instance's document; see
        :mod:`ckptsvc.stage.component_plan`), parsed with the bounds of every document.
        The header is kept for the reads that follow (no second request); the file's
        CRC-32C is checked when its tensors are read whole."""
        layout = self.header(file)
        text = (layout.metadata or {}).get(DOC_META_KEY)
        url = self._ckpt.join(file).url
        if text is None:
            raise CorruptCheckpointError(
                f"{url}: the manifest names this file as a {what}, but its safetensors "
                f"header has no __metadata__ {DOC_META_KEY!r}"
            )
        return parse_json_doc(text.encode("utf-8"), where=url, what=what)

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

    def want_whole(
        self,
        name: str,
        dtype: str,
        file: str,
        shape: Sequence[int],
        dest: torch.Tensor | None = None,
    ) -> None:
        """Ask for the whole stored tensor ``name`` of ``file``; ``run`` returns it, read
        into ``dest`` in place when it fits (:func:`~ckptsvc.read.shard_read.fits_in_place`)."""
        self._entry(name, dtype, Piece(file, (0,) * len(shape), tuple(shape)))
        self._whole.setdefault(file, {})[name] = dest

    def _read_whole(self, file: str) -> dict[str, torch.Tensor]:
        """One pass over ``file`` for its whole tensors (read_shard); the file's CRC-32C is
        checked beside the read unless regions of it are read separately."""
        layout = self.header(file)
        loc = self._source(file)
        record = self._manifest.file(file) if self._manifest is not None else None
        checked = self._files is not None and self._files.verified(file)  # on download
        wanted = self._whole[file]
        got = read_shard(
            loc, layout,
            file_nbytes=record.nbytes if record is not None else layout.file_nbytes,
            names=list(wanted),
            destinations={k: v for k, v in wanted.items() if v is not None},
            expected_crc32c=(
                record.crc32c
                if record is not None and file not in self._extents and not checked
                else None
            ),
        )  # fmt: skip
        return got.tensors

    def run(self) -> dict[str, torch.Tensor]:
        """Read everything asked for: fills the tensors ``want`` returned, and returns the
        tensors of ``want_whole`` by name."""
        jobs: list[tuple[str, bool]] = [(f, False) for f in sorted(self._extents)]
        jobs += [(f, True) for f in sorted(self._whole)]
        whole: dict[str, torch.Tensor] = {}

        def one(job: tuple[str, bool]) -> None:
            file, is_whole = job
            if is_whole:
                whole.update(self._read_whole(file))
            else:
                self._source(file).read_scattered(self._extents[file])

        threads = max(1, min(knobs.IO_THREADS.get(), len(jobs)))
        if threads == 1:
            for job in jobs:
                one(job)
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="ckptsvc-load") as pool:
                list(pool.map(one, jobs))
        for dest, src in self._copies:
            dest.copy_(src)
        self._extents.clear()
        self._copies.clear()
        self._keep.clear()
        self._whole.clear()
        return whole
