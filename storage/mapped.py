"""Local files mapped privately and faulted in by parallel threads: the local load path
for fresh tensors (``CKPTSVC_MAPPED_READS``).

:func:`map_private` maps a whole file ``MAP_PRIVATE`` with read and write access: the
file's page-cache pages become the tensors' memory (no anonymous pages to zero, no copy
from the page cache), and a write to a tensor copies that page for this process only,
never touching the file. :func:`fault_in` then brings the mapped bytes in by
``threads`` parallel passes of ``chunk_nbytes`` each: with ``on_range`` (the loaders'
CRC-32C) the chunk's readahead is asked for at once (``MADV_WILLNEED``) and the callback
reads the range, which faults it in; without, the kernel populates
it (``MADV_POPULATE_READ``, Linux 5.14; older kernels get ``MADV_WILLNEED``).

Writers never truncate a published file in place (the local sink unlinks before it
creates), so a mapping stays valid while a later save replaces the file; a file cut short
by something else makes the pages past its end raise ``SIGBUS`` when touched, as with
any mapping (``safetensors.load_file`` maps files the same way).
"""

from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

from ckptsvc import knobs
from ckptsvc.errors import ConfigError, CorruptCheckpointError

from .errors import storage_errors
from .reads import OnRange, RangeRead

__all__ = ["fault_in", "map_private", "want_mapped_read"]

_MADV_POPULATE_READ = 22  # Linux 5.14 (not in Python 3.11's mmap module)
_ON = {"on": True, "1": True, "true": True, "yes": True,
       "off": False, "0": False, "false": False, "no": False}  # fmt: skip


def want_mapped_read(mode: str | None = None) -> bool:
    """Whether local loads map shards (``mode``, else ``CKPTSVC_MAPPED_READS``)."""
    raw = knobs.MAPPED_READS.get(mode).strip().lower()
    if raw not in _ON:
        raise ConfigError(f"mapped_reads={raw!r}: use 'on' or 'off'")
    return _ON[raw]


def map_private(path: str, *, nbytes: int, url: str) -> mmap.mmap:
    """The first ``nbytes`` of the local file ``path``, mapped copy-on-write (module doc).

    Raises ``CorruptCheckpointError`` if the file is shorter than ``nbytes``.
    """
    with storage_errors(url, "read"):
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < nbytes:
                raise CorruptCheckpointError(
                    f"{url}: file is truncated ({size} bytes, the checkpoint says {nbytes}); "
                    "resume from an older checkpoint"
                )
            return mmap.mmap(
                fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            os.close(fd)


def _populate(mapping: mmap.mmap, lo: int, hi: int) -> None:
    start = lo - lo % mmap.PAGESIZE
    try:
        mapping.madvise(_MADV_POPULATE_READ, start, hi - start)
    except OSError as e:
        if e.errno != errno.EINVAL:  # an older kernel: ask for readahead instead
            raise
        mapping.madvise(mmap.MADV_WILLNEED, start, hi - start)


def fault_in(
    mapping: mmap.mmap,
    start: int,
    end: int,
    *,
    threads: int,
    chunk_nbytes: int,
    on_range: OnRange | None = None,
) -> None:
    """Bring bytes ``[start, end)`` of ``mapping`` into memory by ``threads`` parallel
    passes of ``chunk_nbytes`` (module doc); ``on_range`` gets each range as a
    :class:`RangeRead` of one view of the mapping, in the thread that reads it."""
    view = memoryview(mapping)
    step = max(1, chunk_nbytes)
    ranges = [(lo, min(end, lo + step)) for lo in range(start, end, step)]

    def one(span: tuple[int, int]) -> None:
        lo, hi = span
        if on_range is None:
            _populate(mapping, lo, hi)
        else:  # the whole chunk's readahead at once, then read it as it arrives
            start = lo - lo % mmap.PAGESIZE
            mapping.madvise(mmap.MADV_WILLNEED, start, hi - start)
            on_range(RangeRead(lo, (view[lo:hi],)))

    if len(ranges) <= 1 or threads <= 1:
        for span in ranges:
            one(span)
        return
    with ThreadPoolExecutor(min(threads, len(ranges)), thread_name_prefix="ckptsvc-fault") as pool:
        list(pool.map(one, ranges))
