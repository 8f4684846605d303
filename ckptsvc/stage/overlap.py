"""Overlapped snapshots: ``save(..., overlap=True)`` returns before the copy into the arena.

Parameters and optimizer state do not change between the end of one ``optimizer.step()``
and the start of the next, so their copy into the staging arena can run while the next
forward/backward runs. An optimizer step pre-hook (and :meth:`OverlappedSnapshots.fence`
for custom loops) blocks only if that copy has not finished yet.

Call order of one overlapped save (the thread that runs each step):

1. :meth:`~OverlappedSnapshots.prepare` (training thread, inside ``save`` /
   ``save_components`` after the arena is acquired): find the optimizers (and modules)
   reachable from the state and register, once per optimizer, a step pre-hook that calls
   ``fence``; split the source tensors into *guarded* ones - the parameters and state of
   those optimizers and the frozen parameters of those modules, which nothing but
   ``optimizer.step()`` changes - whose version counters are recorded, and the rest
   (buffers such as BatchNorm statistics, which forward changes, plain tensors, counters),
   which are cloned now on their device (no GPU synchronisation); on CUDA record an event
   on each device's current stream. With nothing guarded it returns ``None`` and the save
   copies synchronously, as without ``overlap``.
2. :meth:`~OverlappedSnapshots.start` (training thread): queue the snapshot; ``save``
   returns its handle.
3. the snapshot thread (one per checkpointer, first in first out): side streams wait for
   the events, the engine's copy runs (D2H into the pinned arena on CUDA, the copy threads
   on CPU), then every guarded tensor's version counter is compared with the recorded one.
   A changed counter means the snapshot may be torn: the save fails with
   :class:`~ckptsvc.errors.TornSnapshotError` (arena released, nothing sent to the writer,
   so nothing is written and no manifest appears). Otherwise waiting fences are released,
   and the job goes to the node writer as in a synchronous save.
4. :meth:`~OverlappedSnapshots.fence` (training thread, from the optimizer pre-hook or the
   user): waits until every queued snapshot has finished copying; the wait is added to the
   newest such save's ``timings.fence_wait_s``.

Limits: version counters see in-place changes made through torch operators. Writes through
``.data``, ``numpy()`` views or raw pointers, and some native kernels (fused optimizer
steps, BatchNorm's running statistics) bypass them, so the check cannot catch those - the
fence is what keeps a snapshot consistent; the check catches a forgotten one.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ckptsvc.errors import CheckpointError, LifecycleError, SaveFailedError, TornSnapshotError
from ckptsvc.stage.flatten import is_dtensor

if TYPE_CHECKING:
    from ckptsvc.stage.parts import ComponentPlan
    from ckptsvc.stage.save_handle import SaveHandle

__all__ = ["OverlappedSnapshots", "PreparedSnapshot", "component_sources"]

logger = logging.getLogger(__name__)

_StorageKey = tuple[str, int, int]
_MAX_WALK = 100_000  # objects visited when looking for optimizers in a state


@dataclass(frozen=True)
class _Guarded:
    name: str
    tensor: torch.Tensor
    version: int


@dataclass(frozen=True, eq=False)
class PreparedSnapshot:
    """What the training thread fixed at save time (step 1 of the module docstring)."""

    step: int
    guarded: tuple[_Guarded, ...]
    clones: dict[int, torch.Tensor]  # id(source tensor) -> its clone taken at save time
    events: tuple[tuple[torch.device, Any], ...]  # (device, torch.cuda.Event) per device

    def source(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor to copy into the arena for source ``t`` (its clone, if it has one)."""
        return self.clones.get(id(t), t)

    def sources(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.source(t) for t in tensors]


@dataclass(frozen=True, eq=False)
class _Task:
    prepared: PreparedSnapshot
    handle: SaveHandle
    copy: Callable[[], None]
    submit: Callable[[], object]
    fail: Callable[[BaseException], None]
    seq: int


@dataclass
class _Owners:
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    modules: list[torch.nn.Module] = field(default_factory=list)


def component_sources(plans: Sequence[ComponentPlan]) -> list[tuple[str, torch.Tensor]]:
    """``(component key.tensor name, tensor)`` of every tensor ``save_components`` stages."""
    return [
        (f"{p.component.key}.{name}", t)
        for p in plans
        for f in p.files
        for name, t in f.sources.items()
    ]


def _find_owners(roots: Iterable[Any]) -> _Owners:
    """Optimizers and modules reachable from the state: directly, inside dicts, lists and
    tuples, or as the ``optimizer`` attribute of an object (LR schedulers, wrappers)."""
    found = _Owners()
    seen: set[int] = set()
    stack = list(roots)
    while stack and len(seen) < _MAX_WALK:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (str, bytes, int)):
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.optim.Optimizer):
            found.optimizers.append(obj)
        elif isinstance(obj, torch.nn.Module):
            found.modules.append(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        else:
            inner = getattr(obj, "optimizer", None)
            if isinstance(inner, torch.optim.Optimizer):
                stack.append(inner)
    return found


def _storage_key(t: torch.Tensor) -> _StorageKey | None:
    if is_dtensor(t):
        t = t.to_local()  # type: ignore[attr-defined]
    if t.numel() == 0:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (t.device.type, -1 if t.device.index is None else t.device.index, ptr)


def _guarded_storages(owners: _Owners) -> set[_StorageKey]:
    """Storages only ``optimizer.step()`` changes: the parameters and state of the
    optimizers, and the frozen parameters (``requires_grad=False``) of the modules."""
    tensors: list[torch.Tensor] = []
    for opt in owners.optimizers:
        for group in opt.param_groups:
            tensors.extend(p for p in group["params"] if isinstance(p, torch.Tensor))
        for per_param in opt.state.values():
            if isinstance(per_param, dict):
                tensors.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
    for module in owners.modules:
        tensors.extend(p for p in module.parameters() if not p.requires_grad)
    return {key for key in map(_storage_key, tensors) if key is not None}


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter
        return None


class OverlappedSnapshots:
    """The overlapped snapshots of one ``AsyncCheckpointer`` (see the module docstring for
    the call order and which thread runs each step)."""

    def __init__(self, *, name: str = "ckptsvc-snapshot") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._queued_seq = 0  # last snapshot queued
        self._copied_seq = 0  # last snapshot whose copy ended (copied, torn or failed)
        self._copying: list[SaveHandle] = []  # queued, not yet copied, oldest first
        self._hooks: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._closed = False
        self._warned_nothing_guarded = False

    @property
    def in_flight(self) -> int:
        """Snapshots queued whose copy has not finished."""
        with self._cond:
            return self._queued_seq - self._copied_seq

    # ---- training thread ------------------------------------------------------------------

    def prepare(
        self, step: int, owners: Iterable[Any], tensors: Sequence[tuple[str, torch.Tensor]]
    ) -> PreparedSnapshot | None:
        """Step 1: hooks, guarded tensors' versions, clones of the rest, CUDA events.

        ``owners`` are the objects handed to ``save`` (the state, or the components'
        statefuls); ``tensors`` the sources the engine will copy, named for messages.
        Returns ``None`` when nothing is guarded (the caller then copies synchronously).
        """
        if self._closed:
            raise LifecycleError("overlapped save on a closed AsyncCheckpointer")
        found = _find_owners(owners)
        for opt in found.optimizers:
            self._watch(opt)
        guarded_keys = _guarded_storages(found)
        guarded: list[_Guarded] = []
        rest: list[torch.Tensor] = []
        for name, t in tensors:
            key = _storage_key(t) if guarded_keys else None
            version = _version(t) if key in guarded_keys else None
            if version is None:
                rest.append(t)
            else:
                guarded.append(_Guarded(name, t, version))
        if not guarded:
            if not self._warned_nothing_guarded:
                self._warned_nothing_guarded = True
                logger.warning(
                    "save(overlap=True): no optimizer (or frozen module parameter) found in the "
                    "state, so nothing can be copied after save returns; the snapshot is copied "
                    "synchronously. Pass the optimizer object itself, not its state_dict()"
                )
            return None
        with torch.no_grad():
            clones = {id(t): t.clone() for t in rest if t.numel() > 0}
        devices = {t.device for _, t in tensors if t.device.type == "cuda"}
        events = []
        for device in sorted(devices, key=str):
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append((device, event))
        return PreparedSnapshot(step, tuple(guarded), clones, tuple(events))

    def start(
        self,
        prepared: PreparedSnapshot,
        *,
        handle: SaveHandle,
        copy: Callable[[], None],
        submit: Callable[[], object],
        fail: Callable[[BaseException], None],
    ) -> None:
        """Step 2: queue the snapshot. ``copy`` fills the arena from ``prepared.source``s,
        ``submit`` sends the job to the writer, ``fail`` releases the arena and fails the
        save (all three run on the snapshot thread; the arena now belongs to it)."""
        with self._cond:
            if self._closed:
                raise LifecycleError("overlapped save on a closed AsyncCheckpointer")
            self._queued_seq += 1
            task = _Task(prepared, handle, copy, submit, fail, self._queued_seq)
            self._copying.append(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put(task)

    def fence(self, timeout_s: float | None = None) -> float:
        """Step 4: block until every snapshot queued so far has finished copying (not
        writing); return the seconds waited. Raises ``TimeoutError`` after ``timeout_s``."""
        with self._cond:
            target = self._queued_seq
            if self._copied_seq >= target:
                return 0.0
            newest = self._copying[-1]
            started = time.perf_counter()
            finished = self._cond.wait_for(lambda: self._copied_seq >= target, timeout_s)
        waited = time.perf_counter() - started
        newest._add_fence_wait(waited)
        if not finished:
            raise TimeoutError(
                f"overlapped snapshot of step {newest.step} still copying after {timeout_s} s"
            )
        return waited

    def close(self, timeout_s: float | None = None) -> None:
        """Finish the queued snapshots (they are submitted to the writer), stop the thread,
        remove the optimizer hooks."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        for hook in list(self._hooks.values()):
            hook.remove()
        self._hooks.clear()
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning("closing with an overlapped snapshot still copying")

    def _watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Register the fence as ``optimizer``'s step pre-hook (once; weak both ways)."""
        if optimizer in self._hooks:
            return
        self._hooks[optimizer] = optimizer.register_step_pre_hook(_FenceHook(weakref.ref(self)))

    # ---- snapshot thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            try:
                ok = self._copy(task)
            except BaseException as e:  # never let the thread die: fail this save only
                ok = False
                self._safe_fail(task, e)
            if ok:
                try:
                    task.submit()
                except BaseException as e:
                    self._safe_fail(task, e)

    def _copy(self, task: _Task) -> bool:
        """Copy, check versions, release the fences; False (save failed) if torn."""
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            with self._side_streams(task.prepared):
                task.copy()
            error = _torn(task.prepared)
        except BaseException as e:
            error = (
                e
                if isinstance(e, CheckpointError)
                else SaveFailedError(
                    f"overlapped snapshot of step {task.prepared.step} failed: "
                    f"{type(e).__name__}: {e}"
                )
            )
            if error is not e:
                error.__cause__ = e
        finally:
            task.handle._set_snapshot(time.perf_counter() - started)
            with self._cond:
                self._copied_seq = task.seq
                self._copying.remove(task.handle)
                self._cond.notify_all()
        if error is not None:
            self._safe_fail(task, error)
            return False
        return True

    @staticmethod
    @contextlib.contextmanager
    def _side_streams(prepared: PreparedSnapshot) -> Iterator[None]:
        """Make the current stream of each device a side stream that waits for the work
        queued before ``save`` returned (the copy's own streams then wait for it)."""
        with contextlib.ExitStack() as stack:
            for device, event in prepared.events:
                stream = torch.cuda.Stream(device=device)
                stream.wait_event(event)
                stack.enter_context(torch.cuda.stream(stream))
            yield

    @staticmethod
    def _safe_fail(task: _Task, error: BaseException) -> None:
        try:
            task.fail(error)
        except BaseException:
            logger.exception("failing the overlapped save of step %s", task.prepared.step)


class _FenceHook:
    """``optimizer.register_step_pre_hook`` callable: fence before the step (weak ref)."""

    def __init__(self, ref: weakref.ReferenceType[OverlappedSnapshots]) -> None:
        self._ref = ref

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        snapshots = self._ref()
        if snapshots is not None:
            snapshots.fence()


def _torn(prepared: PreparedSnapshot) -> TornSnapshotError | None:
    for g in prepared.guarded:
        now = _version(g.tensor)
        if now != g.version:
            return TornSnapshotError(
                f"step {prepared.step}: tensor {g.name!r} was modified in place while its "
                f"overlapped snapshot was being copied (version {g.version} -> {now}); the save "
                "was abandoned and nothing was written. Call ckpt.fence() before changing saved "
                "tensors in place outside optimizer.step() (EMA updates, clipping, zero_())",
                tensor=g.name,
                step=prepared.step,
            )
    return None
