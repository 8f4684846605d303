"""Holding Python's garbage collector off rank 0's commit window.

A generation-2 collection stops every thread of the process for as long as it walks the
heap: tens to hundreds of milliseconds in a process with a large heap (measured: up to
637 ms in ``ckptsvc simulate`` at 1,024 ranks, design.md section 14). Rank 0's commit
thread allocates while it decodes and merges the node reports, which can trigger one
right between the last report and the outcome. :func:`gc_held` disables automatic
collection for that CPU-bound step (milliseconds: it holds no wait and no storage
request) and restores it afterwards; the deferred collection runs at the next
allocation threshold after it. Nested and
concurrent holds (two saves in flight) share one hold; a collector the application
disabled stays disabled.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["gc_held"]

_lock = threading.Lock()
_holders = 0
_was_enabled = False


@contextmanager
def gc_held() -> Iterator[None]:
    """Automatic garbage collection off while the block runs (see the module docstring)."""
    global _holders, _was_enabled
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()
