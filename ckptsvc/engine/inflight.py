"""The saves of this process still in flight, by checkpoint URL: what a load in the same
process waits for.

An asynchronous save returns after a memory copy; its checkpoint is committed later. A
trainer that saves and then resumes in the same process (Forgather's synchronous save
would have found the checkpoint) must not be told "no checkpoint" meanwhile. So:

1. :class:`~ckptsvc.engine.async_checkpointer.AsyncCheckpointer` tracks every save's
   handle here (:func:`track`, training thread, before its job goes out); a handle that
   is done is forgotten at the next look;
2. the public loaders that take a root or a path call :func:`wait_for_saves` first:
   :func:`find_latest_checkpoint`, :func:`load_state`, :func:`load_components` and
   :func:`load_checkpoint` here (what ``ckptsvc.find_latest_checkpoint``,
   ``ckptsvc.load_state``, ``ckptsvc.load_components``, ``ckptsvc.load_checkpoint`` and
   ``ckptsvc.sharded_checkpoint``'s two are) and
   :class:`~ckptsvc.manager.CheckpointManager`'s load path. They wait for every save of
   this process to the path or under the root (any checkpointer's, not only their own),
   or, past ``wait_s``, raise :class:`~ckptsvc.errors.SaveInFlightError` (an
   ``IncompleteCheckpointError``) naming the step still in flight. Waiting does not
   consume a save's failure: its owner still raises it from ``wait``. A reader that did
   not wait (the read layer's own functions) and finds the checkpoint uncommitted says
   whose save it is (``workers.claim.describe_claim``): this process's, in flight.

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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ckptsvc.errors import SaveInFlightError
from ckptsvc.read import component_load, weights
from ckptsvc.read.latest import find_latest_checkpoint as _find_latest
from ckptsvc.stage.components import StateComponent
from ckptsvc.stage.save_handle import SaveHandle
from ckptsvc.storage import Location

__all__ = [
    "find_latest_checkpoint",
    "in_flight",
    "load_checkpoint",
    "load_components",
    "load_state",
    "track",
    "wait_for_saves",
]

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


def load_state(
    path: str,
    *,
    storage_options: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    rank: int | None = None,
    wait_s: float | None = None,
) -> Any:
    """:func:`ckptsvc.read.component_load.load_state` of ``path`` once no save of this
    process to it is in flight (up to ``wait_s`` seconds, ``None``: no limit; then
    :class:`~ckptsvc.errors.SaveInFlightError` names the step)."""
    _wait_unless_none(path, storage_options, wait_s)
    return component_load.load_state(
        path, storage_options=storage_options, device=device, rank=rank
    )


def load_components(
    path: str,
    components: Sequence[StateComponent],
    *,
    process_groups: Mapping[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    strict: bool = True,
    world_size_policy: str = "error",
    rank: int | None = None,
    wait_s: float | None = None,
) -> None:
    """:func:`ckptsvc.read.component_load.load_components`, after waiting for this
    process's saves to ``path`` as :func:`load_state` does."""
    _wait_unless_none(path, storage_options, wait_s)
    component_load.load_components(
        path, components, process_groups=process_groups, storage_options=storage_options,
        strict=strict, world_size_policy=world_size_policy, rank=rank,
    )  # fmt: skip


def load_checkpoint(
    model_dir: str,
    module: nn.Module | None = None,
    device: str = "cpu",
    strict: bool = True,
    assign: bool = False,
    keys: set[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    wait_s: float | None = None,
) -> dict[str, Tensor] | None:
    """:func:`ckptsvc.read.weights.load_checkpoint` (Forgather's signature), after waiting
    for this process's saves to ``model_dir`` (or under it) as :func:`load_state` does."""
    _wait_unless_none(model_dir, storage_options, wait_s)
    return weights.load_checkpoint(
        model_dir, module, device, strict, assign, keys, storage_options=storage_options
    )


def _wait_unless_none(
    path: str | None, storage_options: dict[str, Any] | None, wait_s: float | None
) -> None:
    """Wait for the saves to ``path``; ``None`` (no checkpoint found) is left to the loader,
    whose error says so."""
    if path is not None:
        wait_for_saves(path, storage_options=storage_options, timeout_s=wait_s)
