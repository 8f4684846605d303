"""Named hook points: places in a save where tests may stop or fail the process.

The library calls :func:`point` (a notification: an installed function may sleep, raise or
pause the process) and :func:`wrap` (an installed function may return a replacement for an
object, e.g. a sink whose writes it throttles) at a few fixed places. Nothing is installed
in production, so both are a dict lookup that finds nothing. The fault injection and crash
points of :mod:`ckptsvc.testing` install their behaviour here instead of patching library
attributes.

Points (``name``: the keyword arguments it passes):

- ``"publish.before"`` / ``"publish.after"``: ``name``, ``url`` - a small file written
  whole (``Location.publish``, and ``Location.create_exclusive``, a claim);
- ``"remove.before"`` / ``"remove.after"``: ``name``, ``url``, ``recursive`` -
  ``Location.remove``;
- ``"rename.before"``: ``path`` - the ``os.replace`` that publishes a local file;
- ``"unlink.after"``: ``path`` - an ``os.unlink`` of a local file by ``Location.remove``;
- ``"sink.open"`` (:func:`wrap`): the sink ``Location.open_sink`` returns; ``name``, ``url``;
- ``"snapshot.copy.before"`` / ``"snapshot.copy.after"``: the trainer's copy of a state into
  its shared-memory arena (no arguments);
- ``"job.submitted"``: ``url`` - a save job handed to the node writer;
- ``"plan.component"``: ``key``, ``reused`` - a component of a save planned (``reused``
  False) or its cached plan rebound (:mod:`ckptsvc.stage.plan_reuse`);
- ``"commit.phase"``: ``phase``, ``step``, ``wall_s``, ``cpu_s`` - rank 0's commit thread
  finished one phase of a distributed commit (``wake``, ``fetch``, ``decode``, ``merge``,
  ``previous``, ``storage``, ``outcome``; ``cpu_s``: that thread's CPU time in it);
- ``"store.connect"`` (no arguments): a checkpointer's coordination opened a store
  connection (``Store.clone``; :class:`ckptsvc.commit.channels.StorePool`).

Torch-free and importing nothing from ckptsvc but its errors: the node writer and the storage layer use it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ckptsvc.errors import ConfigError

__all__ = ["POINTS", "install", "installed", "point", "wrap"]

T = TypeVar("T")

#: every hook point the library calls; :func:`install` refuses other names (a typo would
#: otherwise install a hook that never runs)
POINTS = frozenset(
    {
        "publish.before",
        "publish.after",
        "remove.before",
        "remove.after",
        "rename.before",
        "unlink.after",
        "sink.open",
        "snapshot.copy.before",
        "snapshot.copy.after",
        "job.submitted",
        "plan.component",
        "commit.phase",
        "store.connect",
    }
)

_hooks: dict[str, tuple[Callable[..., Any], ...]] = {}
_lock = threading.Lock()


def point(name: str, /, **info: Any) -> None:
    """Run the functions installed at ``name`` with ``info``; nothing when none is."""
    fns = _hooks.get(name)
    if fns:
        for fn in fns:
            fn(**info)


def wrap(name: str, obj: T, /, **info: Any) -> T:
    """``obj`` passed through the functions installed at ``name`` (each returns the object
    to use: ``obj`` itself or a replacement); ``obj`` when none is installed."""
    fns = _hooks.get(name)
    if fns:
        for fn in fns:
            obj = fn(obj, **info)
    return obj


def install(name: str, fn: Callable[..., Any]) -> Callable[[], None]:
    """Install ``fn`` at the hook point ``name``; returns the function that removes it.

    Raises:
        ConfigError: ``name`` is not one of :data:`POINTS` (a ``ValueError``).
    """
    if name not in POINTS:
        raise ConfigError(f"unknown hook point {name!r}: use one of {sorted(POINTS)}")
    with _lock:
        _hooks[name] = (*_hooks.get(name, ()), fn)

    def remove() -> None:
        with _lock:
            rest = tuple(f for f in _hooks.get(name, ()) if f is not fn)
            if rest:
                _hooks[name] = rest
            else:
                _hooks.pop(name, None)

    return remove


def installed(name: str) -> bool:
    """Whether any function is installed at ``name``."""
    return bool(_hooks.get(name))
