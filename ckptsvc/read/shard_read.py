"""One pass over a safetensors shard, straight into its destination tensors: :func:`read_shard`.

1. The header is parsed once (the caller passes the :class:`ShardLayout`).
2. Each wanted tensor gets its destination: the caller's tensor when one is given and
   fits (a module's own parameter: loading *in place*, no second copy), else a view of
   one flat buffer per shard, aligned so that the file's block boundaries fall on page
   boundaries. The views are built per run of same-dtype, same-shape tensors with one
   ``unbind`` (no per-tensor ``reshape``; 100,000 small tensors cost one call per run).
3. The bytes are read by parallel ranged requests (``Location.read_scattered``): locally
   ``preadv``, with ``O_DIRECT`` for the aligned flat buffer where
   ``CKPTSVC_DIRECT_IO_READS`` allows; on object stores ranged GETs, a big shard split
   into ``CKPTSVC_READ_RANGES_IN_FLIGHT`` ranges.
4. With an expected CRC-32C (the manifest's), every range is checksummed as soon as it is
   read, on helper threads, while the readers go on, and the ranges are joined in file
   order (``crc32c_combine``): one pass over each file. Bytes the caller did not ask for are read
   into scratch memory so the whole file is checked; a partial load whose unwanted bytes
   exceed ``CKPTSVC_READ_CHUNK_BYTES`` x 4 checks them in a second, streaming pass.

Tensors returned as views of one flat buffer share its memory: the buffer is freed when
the last of them is (``safetensors.load_file`` behaves the same with its mapping).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ckptsvc import knobs
from ckptsvc.errors import CorruptCheckpointError
from ckptsvc.format.checksum import crc32c_combine, crc32c_value
from ckptsvc.format.safetensors_stream import DTYPE_SIZES, ShardLayout, TensorEntry
from ckptsvc.stage.tensors import dtype_to_torch
from ckptsvc.storage import Location
from ckptsvc.storage.mapped import fault_in, map_private, want_mapped_read
from ckptsvc.storage.reads import RangeRead, want_direct_read

__all__ = ["Checksums", "ShardRead", "byte_view", "check_crc", "fits_in_place", "read_shard"]

logger = logging.getLogger(__name__)

_PAGE = 4096
_OWN_MIN_BYTES = 64 * 1024  # tensors this big share the read buffer's memory; smaller: copied
_CRC_THREADS = 2  # checksum helpers per shard read (CRC-32C runs at several GB/s each)


@dataclass(frozen=True)
class ShardRead:
    """What :func:`read_shard` read: every wanted tensor by name, and the names that were
    read straight into the caller's destination tensors."""

    tensors: dict[str, torch.Tensor]
    in_place: frozenset[str]


def byte_view(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as a writable flat byte view."""
    return t.detach().reshape(-1).view(torch.uint8).numpy().data.cast("B")


def fits_in_place(dest: torch.Tensor | None, entry: TensorEntry) -> bool:
    """Whether ``entry``'s bytes can be read straight into ``dest`` (CPU, contiguous, same
    dtype and shape, not a view of a smaller element type)."""
    return (
        dest is not None
        and dest.device.type == "cpu"
        and dest.dtype == dtype_to_torch(entry.dtype)
        and tuple(dest.shape) == entry.shape
        and dest.is_contiguous()
        and not dest.is_conj()
        and not dest.is_neg()
        and entry.nbytes > 0
    )


class Checksums:
    """CRC-32C of ranges as they complete, on helper threads (``crc32c`` releases the GIL),
    so a reader thread issues its next read at once; joined in file order at the end."""

    def __init__(self, pool: ThreadPoolExecutor | None = None) -> None:
        self._pool = pool  # None: every range is checksummed by ``add`` in its reader
        self._lock = threading.Lock()
        self._parts: list[tuple[int, int, int]] = []
        self._pending: list[Future[None]] = []

    def on_range(self, rr: RangeRead) -> None:
        if self._pool is None:
            self.add(rr)
            return
        fut = self._pool.submit(self.add, rr)
        with self._lock:
            self._pending.append(fut)

    def add(self, rr: RangeRead) -> None:
        """Checksum ``rr`` now, in the calling thread (a mapped range: reading it faults it in)."""
        crc = 0
        for v in rr.views:
            crc = crc32c_value(v, crc)
        with self._lock:
            self._parts.append((rr.offset, rr.nbytes, crc))

    def wait(self) -> None:
        """Wait for every checksum started (re-raising the first failure)."""
        with self._lock:
            pending = list(self._pending)
        for fut in pending:
            fut.result()

    def file_crc(self, header: bytes, file_nbytes: int, url: str) -> str:
        """The whole file's CRC-32C: the header's, then every range's in file order."""
        self.wait()
        crc = crc32c_value(header)
        cursor = len(header)
        for offset, nbytes, part in sorted(self._parts):
            if offset != cursor:
                raise CorruptCheckpointError(
                    f"{url}: internal error: checksummed ranges leave bytes {cursor}..{offset} out"
                )
            crc = crc32c_combine(crc, part, nbytes)
            cursor += nbytes
        if cursor != file_nbytes:
            raise CorruptCheckpointError(
                f"{url}: internal error: checksummed {cursor} of {file_nbytes} bytes"
            )
        return f"{crc:08x}"


def check_crc(got: str, expected: str, url: str) -> None:
    """Raise :class:`CorruptCheckpointError` unless the file's CRC-32C is the manifest's."""
    if got != expected:
        raise CorruptCheckpointError(
            f"{url}: CRC-32C {got} differs from the manifest's {expected} (the file was "
            "damaged after it was written); resume from an older checkpoint"
        )


def _aligned_flat(nbytes: int, file_offset: int) -> torch.Tensor:
    """A uint8 buffer of ``nbytes`` whose address is congruent to ``file_offset`` modulo
    the page size (so block-aligned file ranges land in page-aligned memory)."""
    raw = torch.empty(nbytes + 2 * _PAGE, dtype=torch.uint8)
    shift = (file_offset - raw.data_ptr()) % _PAGE
    return raw[shift : shift + nbytes]


def _views(flat: torch.Tensor, base: int, entries: Sequence[TensorEntry]) -> list[torch.Tensor]:
    """Tensors of ``entries`` (consecutive in the file from data offset ``base``) as views of
    ``flat``: one ``unbind`` per run of equal dtype and shape."""
    out: list[torch.Tensor] = []
    i, n = 0, len(entries)
    while i < n:
        first = entries[i]
        j = i + 1
        while (
            j < n
            and entries[j].dtype == first.dtype
            and entries[j].shape == first.shape
            and entries[j].begin == entries[j - 1].end
        ):
            j += 1
        dtype = dtype_to_torch(first.dtype)
        block = flat[first.begin - base : entries[j - 1].end - base]
        if (block.data_ptr() % DTYPE_SIZES[first.dtype]) or first.nbytes == 0:
            # a foreign file with an unaligned tensor, or empty tensors: one by one
            for e in entries[i:j]:
                raw = flat[e.begin - base : e.end - base].clone()
                out.append(raw.view(dtype).reshape(e.shape))
        else:
            out.extend(block.view(dtype).view(j - i, *first.shape).unbind(0))
        i = j
    return out


def _runs(entries: Sequence[TensorEntry]) -> list[list[TensorEntry]]:
    """``entries`` (sorted by offset) cut into runs of adjacent tensors."""
    runs: list[list[TensorEntry]] = []
    for e in entries:
        if runs and runs[-1][-1].end == e.begin:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def read_shard(
    loc: Location,
    layout: ShardLayout,
    *,
    file_nbytes: int,
    names: Collection[str] | None = None,
    destinations: Mapping[str, torch.Tensor] | None = None,
    expected_crc32c: str | None = None,
) -> ShardRead:
    """Read the tensors ``names`` (all if ``None``) of one shard in one pass (module doc).

    Every returned tensor has a storage of its own at offset 0 (:func:`_own_storages`).

    ``destinations``: tensors to fill in place where they fit (:func:`fits_in_place`); the
    others are allocated. ``expected_crc32c``: the whole file's CRC-32C from the manifest;
    a mismatch is :class:`CorruptCheckpointError`. Every name asked for must be in the
    shard (else :class:`CorruptCheckpointError`: a stale index).
    """
    wanted_set = None if names is None else set(names)
    wanted = [e for e in layout.entries if wanted_set is None or e.name in wanted_set]
    if wanted_set is not None and len(wanted) != len(wanted_set):
        absent = sorted(wanted_set - {e.name for e in wanted})
        raise CorruptCheckpointError(
            f"{loc.url}: the index maps {absent[:5]} to this file, which does not hold them "
            "(stale or mismatched index)"
        )
    dests = destinations or {}
    in_place = [e for e in wanted if fits_in_place(dests.get(e.name), e)]
    in_place_names = frozenset(e.name for e in in_place)
    fresh = [e for e in wanted if e.name not in in_place_names]

    tensors: dict[str, torch.Tensor] = {}
    extents: list[tuple[int, memoryview]] = []
    data = layout.data_offset
    flat_direct = False
    alone: list[TensorEntry] = []
    shared = fresh
    flat = None
    if shared:
        base, end = shared[0].begin, shared[-1].end
        mostly_wanted = 2 * sum(e.nbytes for e in shared) >= end - base
        if mostly_wanted and end > base and loc.is_local and want_mapped_read():
            return _read_mapped(loc, layout, file_nbytes, shared, in_place, dests, expected_crc32c)
        if mostly_wanted:  # one flat buffer
            flat = _aligned_flat(end - base, data + base)
            views = _views(flat, base, shared)
            tensors.update(zip((e.name for e in shared), views, strict=True))
            flat_bytes = flat.numpy().data.cast("B") if end > base else memoryview(b"")
            for run in _runs(shared):
                lo, hi = run[0].begin - base, run[-1].end - base
                if hi > lo:
                    extents.append((data + base + lo, flat_bytes[lo:hi]))
            flat_direct = True
        else:
            alone += shared
            shared = []
    for e in alone:
        t = torch.empty(e.shape, dtype=dtype_to_torch(e.dtype))
        tensors[e.name] = t
        if e.nbytes:
            extents.append((data + e.begin, byte_view(t)))
    for e in in_place:
        tensors[e.name] = dests[e.name]
        extents.append((data + e.begin, byte_view(dests[e.name])))

    gaps = _gaps(extents, start=data, end=file_nbytes) if expected_crc32c is not None else []
    streamed_check = sum(n for _, n in gaps) > 4 * knobs.READ_CHUNK_BYTES.get()
    if not streamed_check:  # bytes nobody asked for: read into scratch, checked the same way
        extents += [(off, memoryview(bytearray(n))) for off, n in gaps]
    direct = flat_direct and loc.is_local and want_direct_read(loc.path)
    with ThreadPoolExecutor(_CRC_THREADS, thread_name_prefix="ckptsvc-load-crc") as pool:
        checksums = Checksums(pool) if expected_crc32c is not None and not streamed_check else None
        try:
            loc.read_scattered(
                extents, on_range=checksums.on_range if checksums else None, direct=direct
            )
        finally:
            if checksums is not None:  # no checksum thread may outlive the read's memory
                with contextlib.suppress(Exception):
                    checksums.wait()
        if expected_crc32c is not None:
            got = (
                checksums.file_crc(layout.header, file_nbytes, loc.url)
                if checksums is not None
                else _streamed_crc(loc, layout, extents, file_nbytes)
            )
            check_crc(got, expected_crc32c, loc.url)
    if flat is not None:
        tensors.update(_own_storages(flat, shared[0].begin, shared, tensors))
    return ShardRead(tensors, in_place_names)


def _read_mapped(
    loc: Location,
    layout: ShardLayout,
    file_nbytes: int,
    fresh: Sequence[TensorEntry],
    in_place: Sequence[TensorEntry],
    dests: Mapping[str, torch.Tensor],
    expected_crc32c: str | None,
) -> ShardRead:
    """:func:`read_shard` for a local file: fresh tensors are views of a private mapping of
    the file (``storage.mapped``), faulted in by ``CKPTSVC_IO_THREADS`` threads that
    checksum each range as they go (the whole file when a CRC is expected, else only the
    wanted bytes are populated); in-place destinations are copied from the mapping."""
    data = layout.data_offset
    mapping = map_private(loc.path, nbytes=file_nbytes, url=loc.url)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    if bytes(whole[:data].numpy()) != layout.header:
        raise CorruptCheckpointError(
            f"{loc.url}: the file's header changed while it was being loaded (replaced "
            "during the load?); load again"
        )
    threads = max(1, knobs.IO_THREADS.get())
    chunk = knobs.READ_CHUNK_BYTES.get()
    if expected_crc32c is not None:
        checksums = Checksums()  # in the faulting threads: reading a range faults it in
        fault_in(
            mapping, data, file_nbytes, threads=threads, chunk_nbytes=chunk,
            on_range=checksums.on_range,
        )  # fmt: skip
        check_crc(checksums.file_crc(layout.header, file_nbytes, loc.url), expected_crc32c, loc.url)
    else:
        lo = data + min(e.begin for e in (*fresh, *in_place))
        hi = data + max(e.end for e in (*fresh, *in_place))
        fault_in(mapping, lo, hi, threads=threads, chunk_nbytes=chunk)
    base, end = fresh[0].begin, fresh[-1].end
    flat = whole[data + base : data + end]
    views = dict(zip((e.name for e in fresh), _views(flat, base, fresh), strict=True))
    tensors = _own_storages(flat, base, fresh, views)
    for e in in_place:
        dest = dests[e.name]
        dest.detach().view(-1).view(torch.uint8).copy_(whole[data + e.begin : data + e.end])
        tensors[e.name] = dest
    return ShardRead(tensors, frozenset(e.name for e in in_place))


def _own_storages(
    flat: torch.Tensor, base: int, entries: Sequence[TensorEntry], views: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Each tensor with a storage of its own at offset 0, as ``safetensors.load_file``
    returns them (``torch.save`` of one tensor writes its bytes only, and code that ignores
    a storage offset, such as ``torch.set_rng_state``, sees the right bytes): big tensors
    get a slice of the flat buffer's storage (no copy; the buffer lives while any does),
    small ones are copied out (a few microseconds each)."""
    storage = flat.untyped_storage()
    shift = flat.storage_offset()
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        if e.nbytes >= _OWN_MIN_BYTES and not (shift + e.begin - base) % DTYPE_SIZES[e.dtype]:
            lo = shift + e.begin - base
            raw = torch.empty(0, dtype=torch.uint8).set_(storage[lo : lo + e.nbytes])
            out[e.name] = raw.view(dtype_to_torch(e.dtype)).view(e.shape)
        else:
            out[e.name] = views[e.name].clone()
    return out


def _gaps(
    extents: Sequence[tuple[int, memoryview]], *, start: int, end: int
) -> list[tuple[int, int]]:
    """``(offset, nbytes)`` of the bytes in ``[start, end)`` no extent covers."""
    gaps = []
    cursor = start
    for off, v in sorted(extents, key=lambda x: x[0]):
        if off > cursor:
            gaps.append((cursor, off - cursor))
        cursor = max(cursor, off + v.nbytes)
    if cursor < end:
        gaps.append((cursor, end - cursor))
    return gaps


def _streamed_crc(
    loc: Location,
    layout: ShardLayout,
    extents: Sequence[tuple[int, memoryview]],
    file_nbytes: int,
) -> str:
    """CRC-32C of the whole file: bytes already read from memory, the rest streamed from
    the file in ``CKPTSVC_READ_CHUNK_BYTES`` reads (a partial load of a big shard)."""
    crc = crc32c_value(layout.header)
    cursor = len(layout.header)
    step = max(1, knobs.READ_CHUNK_BYTES.get())

    def read_up_to(stop: int) -> None:
        nonlocal crc, cursor
        while cursor < stop:
            chunk = loc.read_range(cursor, min(stop, cursor + step))
            if not chunk:
                raise CorruptCheckpointError(
                    f"{loc.url}: file ends at byte {cursor}, before {stop} (truncated)"
                )
            crc = crc32c_value(chunk, crc)
            cursor += len(chunk)

    for off, v in sorted(extents, key=lambda x: x[0]):
        read_up_to(off)
        crc = crc32c_value(v, crc)
        cursor = off + v.nbytes
    read_up_to(file_nbytes)
    return f"{crc:08x}"
