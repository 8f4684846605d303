"""The saves of this process still in flight, by checkpoint URL: what a load in the same
process waits for.

An asynchronous save returns after a memory copy; its checkpoint is committed later. A
trainer that saves and then resumes in the same process (Forgather's synchronous save
would have found the checkpoint) must not be told "no checkpoint" meanwhile. So:

1. :class:`~ckptsvc.engine.async_checkpointer.AsyncCheckpointer` tracks every save's
   handle here (:func:`track`, training thread, before its job goes out); a handle that
   is done is forgotten at the next look;
2. the public loaders that take a root or a path call :func:`wait_for_saves` first:
   :func:`find_latest_checkpoint` here (``ckptsvc.find_latest_checkpoint`` and
   ``ckptsvc.sharded_checkpoint.find_latest_checkpoint``) and
   :class:`~ckptsvc.manager.CheckpointManager`'s load path. They wait for every save of
   this process to the path or under the root (any checkpointer's, not only their own),
   or, past ``timeout_s``, raise :class:`~ckptsvc.errors.SaveInFlightError` naming the
   step still in flight. Waiting does not consume a save's failure: its owner still
   raises it from ``wait``.

Why here: the registry is the engine's bookkeeping, and the read layer (below the
engine) cannot import it. The read layer's functions stay pure readers of the store; the
waiting sits in the engine-level and facade entry points, which is also why an internal
caller (retention, tiering, a handle's completion callback on the writer link's reader
thread) never blocks on a save that only that thread can complete.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from ckptsvc.errors import SaveInFlightError
from ckptsvc.read.latest import find_latest_checkpoint as _find_latest
from ckptsvc.stage.save_handle import SaveHandle
from ckptsvc.storage import Location

__all__ = ["find_latest_checkpoint", "in_flight", "track", "wait_for_saves"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_saves: list[tuple[str, SaveHandle]] = []  # (checkpoint URL, handle), oldest first


def track(handle: SaveHandle, *, storage_options: dict[str, Any] | None = None) -> None:
    """Remember ``handle`` (a save to ``handle.path``) until it is done."""
    url = Location.parse(handle.path, storage_options).url.rstrip("/")
    with _lock:
        _saves[:] = [(u, h) for u, h in _saves if not h.done()]
        _saves.append((url, handle))


def in_flight(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> list[SaveHandle]:
    """The saves of this process not yet done whose checkpoint is ``path`` or lies under
    it (a run's root), by step."""
    url = Location.parse(os.fspath(path), storage_options).url.rstrip("/")
    with _lock:
        _saves[:] = [(u, h) for u, h in _saves if not h.done()]
        found = [h for u, h in _saves if u == url or u.startswith(url + "/")]
    return sorted(found, key=lambda h: h.step)


def wait_for_saves(
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    timeout_s: float | None = None,
) -> list[SaveHandle]:
    """Wait until no save of this process to ``path`` (or under it) is in flight; return
    the saves waited for. Their outcome is left to their owners (a failed one is simply
    not there to load). Past ``timeout_s`` (``None``: no limit) raise
    :class:`~ckptsvc.errors.SaveInFlightError` naming the step and path still in flight.
    """
    handles = in_flight(path, storage_options=storage_options)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for h in handles:
        logger.info(
            "waiting for the save of step %s to %s (this process) before loading", h.step, h.path
        )
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not h.settled(remaining):
            raise SaveInFlightError(
                f"the save of step {h.step} to {h.path} (this process) is still in flight "
                f"after {timeout_s} s: wait for it (its handle's wait(), or the manager's "
                "wait()) before loading from "
                f"{os.fspath(path)}, or pass a longer timeout"
            )
    return handles


def find_latest_checkpoint(
    model_dir: str,
    *,
    verify: bool | str = False,
    storage_options: dict[str, Any] | None = None,
    wait_s: float | None = None,
) -> str | None:
    """The newest complete checkpoint under ``<model_dir>/checkpoints``, as
    :func:`ckptsvc.read.latest.find_latest_checkpoint` finds it, after waiting for this
    process's saves in flight under ``model_dir`` (up to ``wait_s`` seconds, ``None``: no
    limit; then :class:`~ckptsvc.errors.SaveInFlightError`): a checkpoint saved
    asynchronously a moment ago is found, as Forgather's synchronous save would have been.

    ``None`` when there is no complete checkpoint.
    """
    wait_for_saves(model_dir, storage_options=storage_options, timeout_s=wait_s)
    return _find_latest(model_dir, verify=verify, storage_options=storage_options)
