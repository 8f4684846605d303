"""Page-aligned bounce buffers for ``O_DIRECT`` writes, kept and reused across files.

:class:`~.direct_io.DirectFile` copies bytes that are not page aligned (a safetensors
header, a sync save's tensors on the heap) into bounce slots and writes those. Mapping
fresh slots for every file costs a page fault and a zeroed page per 4 KiB on first touch
(about as much as the copy itself); a process writes many files with the same slot
size, so the slots are kept here once released and handed to the next file, already
faulted in. Idle slots are capped at :data:`IDLE_BYTES_MAX` (the least recently used are
unmapped beyond it), so a process that wrote once keeps at most that much.

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

#: idle bytes kept for reuse per process (five 16 MiB slots: one direct file's set)
IDLE_BYTES_MAX = 80 * 2**20


class BounceSlot:
    """One page-aligned anonymous mapping of ``nbytes``: ``view`` to fill, ``address`` for
    ``memmove``. Owned by one writer between ``take`` and ``give``."""

    __slots__ = ("_map", "address", "nbytes", "view")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._map = mmap.mmap(-1, nbytes)
        self.view = memoryview(self._map)
        anchor = ctypes.c_char.from_buffer(self._map)
        self.address = ctypes.addressof(anchor)
        del anchor  # the address stays valid while the map lives; the export does not

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

    def take(self, nbytes: int) -> BounceSlot:
        """An idle slot of exactly ``nbytes`` (a multiple of the page size), else a new one."""
        with self._lock:
            for key, slot in reversed(self._idle.items()):
                if slot.nbytes == nbytes:
                    del self._idle[key]
                    self._idle_bytes -= nbytes
                    return slot
            self.mapped += 1
        return BounceSlot(nbytes)

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
