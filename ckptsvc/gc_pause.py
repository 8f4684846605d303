"""The cyclic garbage collector paused while a load builds its objects (stdlib only).

A load of 100,000 small tensors creates about a million Python objects (the header's
dicts and lists, the entries, the tensors): each 700 allocations start a collection of
the young generation, and the old generation is walked again and again as it grows. On
the development machine that was half of ``load_checkpoint``'s time at 100k tensors
(1.57 s with the collector, 0.86 s without; ``docs/benchmarks.md``). Nothing a load
creates is cyclic garbage, so the collector finds nothing.

:func:`gc_paused` turns the collector off for a ``with`` block and back on when the last
overlapping block ends (a count, so nested and concurrent loads compose); a collector the
caller had disabled stays disabled. Objects of other threads are not freed by the
collector meanwhile; reference counting still frees everything acyclic.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

__all__ = ["gc_paused", "with_gc_paused"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_lock = threading.Lock()
_depth = 0
_resume = False  # whether the outermost block found the collector enabled


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run the block with the cyclic collector off (module doc)."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()


def with_gc_paused(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate ``fn`` to run inside :func:`gc_paused`."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with gc_paused():
            return fn(*args, **kwargs)

    return wrapper
