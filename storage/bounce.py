"""Page-aligned bounce buffers for ``O_DIRECT`` writes, kept and reused across files.

:class:`~.direct_io.DirectFile` copies bytes that are not page aligned (a safetensors
header, a sync save's tensors on the heap) into bounce slots and writes those. Mapping
fresh slots for every file costs a page fault and a zeroed page per 4 KiB on first touch
(about as much as the copy itself); a process writes many files with the same slot
size, so the slots are kept here once released and handed to the next file, already
faulted in. Idle slots are capped at :data:`IDLE_BYTES_MAX` (the least recently used are
unmapped beyond it), so a process that wrote once keeps at most that much.

**Physically contiguous** (``huge`` slots, for writers that copy most of their bytes,
such as a sync save): a slot is private memory aligned to 2 MiB and advised as
transparent huge pages (``MADV_HUGEPAGE``; Linux, where THP is ``madvise`` or
``always``). Other slots (a header block, a tail) stay ordinary pages: touching a few
KiB of a huge page makes all 2 MiB resident. An ``O_DIRECT`` write hands the device the
physical pages of its buffer, and a block device takes a bounded number of segments per
request (a virtio disk: 254): from 4 KiB pages that the kernel handed out scattered - the
usual case for memory faulted while other threads allocate, or recycled from its per-CPU
free lists - a 4 MiB request shrinks to 1 MiB, and the same bytes need up to 4x the
requests. Measured on the development VM (1 GiB, 4 writes in flight): the same write
from fully scattered pages took 1.4-1.5x as long as from sequentially faulted ones, and
a sync save whose two first slots came out scattered 1.15-1.25x the floor; from
huge-page slots it is at the floor. Where huge pages are unavailable the slot is
ordinary memory (correct, possibly scattered).

Call order: ``take(nbytes)`` (any thread) returns a :class:`BounceSlot`; ``give(slot)``
(any thread, once) returns it. A forked child starts with an empty pool.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from collections import OrderedDict

__all__ = ["IDLE_BYTES_MAX", "POOL", "BouncePool", "BounceSlot"]

#: slots are aligned to (and advised as) transparent huge pages of this size
HUGE_PAGE_BYTES = 2 * 2**20
#: idle bytes kept for reuse per process (four direct files' sets of five 4 MiB slots)
IDLE_BYTES_MAX = 80 * 2**20


class BounceSlot:
    """``nbytes`` of private anonymous memory starting at a huge-page boundary (``huge``:
    huge pages advised where the platform has them): ``view`` to fill, ``address`` for
    ``memmove``. Owned by one writer between ``take`` and ``give``."""

    __slots__ = ("_map", "address", "huge", "nbytes", "view")

    def __init__(self, nbytes: int, *, huge: bool = False) -> None:
        self.nbytes = nbytes
        self.huge = huge
        # private (transparent huge pages are for private memory); the spare huge page
        # of address space lets the slot start on a boundary (only touched pages count)
        self._map = mmap.mmap(
            -1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        anchor = ctypes.c_char.from_buffer(self._map)
        base = ctypes.addressof(anchor)
        del anchor  # the address stays valid while the map lives; the export does not
        skip = -base % HUGE_PAGE_BYTES
        advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
        whole = nbytes // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
        if huge and advice is not None and whole:
            with contextlib.suppress(OSError):  # THP "never", or a kernel without THP
                self._map.madvise(advice, skip, whole)
        self.view = memoryview(self._map)[skip : skip + nbytes]
        self.address = base + skip

    def unmap(self) -> None:
        """Release the memory (the slot is unusable afterwards)."""
        self.view.release()
        with contextlib.suppress(BufferError):
            self._map.close()


class BouncePool:
    """Idle :class:`BounceSlot` s by size, most recently given last."""

    def __init__(self, *, idle_bytes_max: int = IDLE_BYTES_MAX) -> None:
        self._lock = threading.Lock()
        self._idle: OrderedDict[int, BounceSlot] = OrderedDict()  # id -> slot, LRU first
        self._idle_bytes = 0
        self._idle_bytes_max = idle_bytes_max
        self.mapped = 0  # slots ever mapped by this pool (tests check reuse)

    def take(self, nbytes: int, *, huge: bool = False) -> BounceSlot:
        """An idle slot of exactly ``nbytes`` (a multiple of the page size) and kind
        (``huge``), else a new one."""
        with self._lock:
            for key, slot in reversed(self._idle.items()):
                if slot.nbytes == nbytes and slot.huge == huge:
                    del self._idle[key]
                    self._idle_bytes -= nbytes
                    return slot
            self.mapped += 1
        return BounceSlot(nbytes, huge=huge)

    def give(self, slot: BounceSlot) -> None:
        """Keep ``slot`` for the next writer; unmap the oldest idle ones beyond the cap."""
        evicted = []
        with self._lock:
            self._idle[id(slot)] = slot
            self._idle_bytes += slot.nbytes
            while self._idle_bytes > self._idle_bytes_max and self._idle:
                _, old = self._idle.popitem(last=False)
                self._idle_bytes -= old.nbytes
                evicted.append(old)
        for old in evicted:
            old.unmap()

    @property
    def idle_bytes(self) -> int:
        """Bytes of idle slots kept now."""
        with self._lock:
            return self._idle_bytes


#: the process's pool (every :class:`~.direct_io.DirectFile` takes its slots here)
POOL = BouncePool()


def _fresh_pool_in_child() -> None:
    """A forked child must not share the parent's lock state; it maps its own slots."""
    global POOL
    POOL = BouncePool()


os.register_at_fork(after_in_child=_fresh_pool_in_child)
