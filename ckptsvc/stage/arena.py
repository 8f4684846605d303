"""Staging arenas: named POSIX shared memory that holds the snapshot of one save.

Ownership (who unlinks):

- The **trainer** creates its arenas (``ArenaPool``, one pool per ``AsyncCheckpointer``)
  and is their only owner: it unlinks them on ``close``, at ``atexit``, and when it replaces
  one. Arenas are created, fallocated and pre-faulted once, then reused for every save.
- The **node writer** only attaches (read-only, never through ``multiprocessing``'s
  resource tracker, which would unlink the segment when the writer exits).
- A trainer killed by SIGKILL cannot unlink: segment names carry the owner's pid and pid
  namespace (``ckptsvc-<node>-<pidns>-<pid>-<serial>``), and both the writer (when the
  trainer's connection closes, and periodically) and every new pool (at its first arena)
  unlink the segments of dead owners with ``reclaim_stale_segments`` (the writer those
  of its node id; a new pool those of every node id, since a plain process has a node id of
  its own and a dead one's writer may have died with it).

The segments themselves (naming, creation, read-only attach, reclaiming) are the
torch-free :mod:`ckptsvc.workers.shm`, which the writer imports; this module is the
trainer's half: the layout, the pool, the torch views and the copy.

Layout: :func:`plan_arena` puts each shard file's data section contiguously, in
``layout.entries`` order, at a page-aligned offset, so the writer streams a file with a
few large zero-copy slices of the mapping.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ckptsvc import hooks, knobs
from ckptsvc.errors import ConfigError, LifecycleError, SaveFailedError
from ckptsvc.stage.copy_program import CopyProgram, copy_program
from ckptsvc.workers.shm import ShmSegment, new_segment_name, reclaim_stale_segments

if TYPE_CHECKING:
    from ckptsvc.format.layout import FilePlan

__all__ = ["ALIGN_BYTES", "ArenaPlan", "ArenaPool", "StagingArena", "copy_into", "plan_arena"]

logger = logging.getLogger(__name__)

ALIGN_BYTES = 4096


# ---- layout --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArenaPlan:
    """Where every byte of one save lives in an arena (cached per state signature).

    ``file_offsets[i]`` is the arena offset of ``files[i]``'s data section; a tensor's
    bytes are at ``file_offsets[i] + entry.begin``. ``tensor_offsets`` maps FQN to that
    offset, ``nbytes`` is the arena size the plan needs.
    """

    files: tuple[FilePlan, ...]
    file_offsets: tuple[int, ...]
    tensor_offsets: dict[str, int]
    nbytes: int

    @functools.cached_property
    def program(self) -> CopyProgram:
        """How a save's tensors are copied into this layout (built once, on first use)."""
        return copy_program(self.files, self.file_offsets)


def plan_arena(files: Sequence[FilePlan], *, align_bytes: int = ALIGN_BYTES) -> ArenaPlan:
    offsets = []
    tensor_offsets: dict[str, int] = {}
    cursor = 0
    for plan in files:
        offsets.append(cursor)
        for e in plan.layout.entries:
            tensor_offsets[e.name] = cursor + e.begin
        cursor += -(-plan.layout.data_nbytes // align_bytes) * align_bytes
    return ArenaPlan(tuple(files), tuple(offsets), tensor_offsets, max(cursor, align_bytes))


# ---- trainer side (torch) ------------------------------------------------------------------


class StagingArena:
    """A trainer-owned segment plus torch views into it (built once per plan, cached)."""

    def __init__(self, segment: ShmSegment) -> None:
        self.segment = segment
        self._base: torch.Tensor | None = torch.frombuffer(segment.buffer, dtype=torch.uint8)
        self._views: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._pinned_ptr: int | None = None

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def nbytes(self) -> int:
        return self.segment.nbytes

    def views(
        self, plan: ArenaPlan, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]
    ) -> list[torch.Tensor]:
        """Tensors over the arena, one per ``(fqn, dtype, shape)`` in ``specs`` order."""
        cached = self._views.get((id(plan), "entries"))
        if cached is not None:
            return cached
        return self.views_at(
            plan, [(plan.tensor_offsets[fqn], dtype, shape) for fqn, dtype, shape in specs]
        )

    def views_at(
        self,
        plan: ArenaPlan,
        specs: Sequence[tuple[int, torch.dtype, tuple[int, ...]]],
        *,
        kind: str = "entries",
    ) -> list[torch.Tensor]:
        """Tensors over the arena, one per ``(arena offset, dtype, shape)``; cached per plan
        and ``kind`` (one plan at a time: a new signature evicts the old one's views)."""
        cached = self._views.get((id(plan), kind))
        if cached is not None:
            return cached
        if self._base is None:
            raise LifecycleError(f"staging arena {self.name} is closed")
        out = []
        for start, dtype, shape in specs:
            nbytes = dtype.itemsize
            for d in shape:
                nbytes *= d
            out.append(self._base[start : start + nbytes].view(dtype).view(shape))
        self._views = {k: v for k, v in self._views.items() if k[0] == id(plan)}
        self._views[(id(plan), kind)] = out
        return out

    def bytes_at(self, start: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over arena bytes ``[start, start + nbytes)`` (not cached)."""
        if self._base is None:
            raise LifecycleError(f"staging arena {self.name} is closed")
        if start < 0 or start + nbytes > self.nbytes:
            raise SaveFailedError(
                f"staging arena {self.name}: bytes {start}+{nbytes} outside its {self.nbytes}"
            )
        return self._base[start : start + nbytes]

    def pin(self) -> None:
        """Register the mapping as page-locked CUDA host memory (once; best effort)."""
        if self._pinned_ptr is not None or self._base is None:
            return
        ptr = self._base.data_ptr()
        rc = torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 0)
        if int(rc) != 0:
            logger.warning(
                "cudaHostRegister of arena %s failed (%s); D2H copies will be slower", self.name, rc
            )
            return
        self._pinned_ptr = ptr

    def close(self, *, unlink: bool) -> None:
        """Drop the views, unpin, unmap; the owner unlinks."""
        self._views.clear()
        if self._pinned_ptr is not None:
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(self._pinned_ptr)
            self._pinned_ptr = None
        self._base = None
        self.segment.close()
        if unlink:
            self.segment.unlink()


class ArenaPool:
    """Up to ``max_arenas`` arenas of one trainer, handed out one save at a time.

    With ``budget_bytes`` the arenas together never hold more than that many bytes (a
    second arena exists only when two fit: double buffering within the budget).

    1. ``acquire`` (training thread) returns a free arena big enough for the save,
       creating one (up to ``max_arenas`` and the budget) or replacing too-small free
       ones, else waits until the writer reports a job durable (back-pressure). Returns
       the wait seconds.
    2. ``release`` (client reader thread) returns an arena when its job is durable or
       failed; ``discard`` drops one that must not be reused (its writer may still read it).
    3. ``close`` (any thread; also at exit) unlinks every arena.
    """

    def __init__(
        self,
        *,
        max_arenas: int,
        node: str,
        shm_dir: str | None = None,
        on_discard: Callable[[str], None] | None = None,
        budget_bytes: int | None = None,
    ) -> None:
        if max_arenas < 1:
            raise ConfigError(f"arenas_per_rank must be >= 1, got {max_arenas}")
        self._max = max_arenas
        self._budget = budget_bytes
        self._creating_nbytes = 0
        self._node = node
        self._shm_dir = knobs.SHM_DIR.get(shm_dir)
        self._on_discard = on_discard
        self._cond = threading.Condition()
        self._free: list[StagingArena] = []
        self._busy: set[str] = set()
        self._all: dict[str, StagingArena] = {}
        self._creating = 0
        self._closed = False
        self._swept = False
        self._warmups: list[threading.Thread] = []  # background reserve() threads

    @property
    def names(self) -> list[str]:
        with self._cond:
            return sorted(self._all)

    def acquire(self, nbytes: int, *, timeout_s: float | None = None) -> tuple[StagingArena, float]:
        size = -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
        if self._budget is not None and size > self._budget:
            raise ConfigError(f"an arena of {size} bytes exceeds the {self._budget}-byte budget")
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise LifecycleError("the checkpointer is closed")
                fits = [a for a in self._free if a.nbytes >= nbytes]
                if fits:
                    arena = min(fits, key=lambda a: a.nbytes)
                    self._free.remove(arena)
                    self._busy.add(arena.name)
                    return arena, time.monotonic() - start
                if self._free:  # free but too small for this state: replace one
                    self._drop(self._free.pop(0))
                while self._free and not self._room_for(size):  # (more, within a budget)
                    self._drop(self._free.pop(0))
                if self._room_for(size):
                    self._creating += 1
                    self._creating_nbytes += size
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no staging arena became free within {timeout_s} s")
                self._cond.wait(remaining)
        waited = time.monotonic() - start
        try:
            arena = self._create(nbytes)
        finally:
            with self._cond:
                self._creating -= 1
                self._creating_nbytes -= size
        with self._cond:
            self._all[arena.name] = arena
            self._busy.add(arena.name)
            if self._closed:
                self._drop(arena)
                raise LifecycleError("the checkpointer is closed")
        return arena, waited

    def reserve(self, nbytes: int, *, wait: bool = True) -> None:
        """Create free arenas of ``nbytes`` up to ``max_arenas`` now, replacing free ones that
        are too small (busy ones are left alone), so that no later save pays for creation.

        ``wait=False``: create them on a background thread (``ckptsvc-arena-warmup``) and
        return at once. A save that needs an arena meanwhile waits in :meth:`acquire` only
        for the rest of that creation (``timings.arena_wait_s``); if the background creation
        fails (``/dev/shm`` full, say), it is logged and the save creates its arena itself,
        raising the error there. :meth:`close` waits for a creation in progress."""
        if wait:
            self._reserve(nbytes)
            return
        thread = threading.Thread(
            target=self._reserve_logged, args=(nbytes,), name="ckptsvc-arena-warmup", daemon=True
        )
        with self._cond:
            if self._closed:
                return
            self._warmups = [t for t in self._warmups if t.is_alive()] + [thread]
            thread.start()

    def _reserve_logged(self, nbytes: int) -> None:
        try:
            self._reserve(nbytes)
        except Exception as e:  # the next acquire creates the arena and raises it there
            logger.warning(
                "creating a %d-byte staging arena in the background failed: %s", nbytes, e
            )

    def _reserve(self, nbytes: int) -> None:
        size = -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
        while True:
            with self._cond:
                for small in [a for a in self._free if a.nbytes < nbytes]:
                    self._free.remove(small)
                    self._drop(small)
                if self._closed or not self._room_for(size):
                    return
                self._creating += 1
                self._creating_nbytes += size
            try:
                arena = self._create(nbytes)
            finally:
                with self._cond:
                    self._creating -= 1
                    self._creating_nbytes -= size
                    self._cond.notify_all()  # an acquire waiting for this creation retries
            with self._cond:
                self._all[arena.name] = arena
                if self._closed:
                    self._drop(arena)
                    return
                self._free.append(arena)
                self._cond.notify_all()

    def _room_for(self, size: int) -> bool:  # lock held
        """One more arena of ``size`` bytes stays within ``max_arenas`` and the budget."""
        if len(self._all) + self._creating >= self._max:
            return False
        if self._budget is None:
            return True
        held = sum(a.nbytes for a in self._all.values()) + self._creating_nbytes
        return held + size <= self._budget

    def _create(self, nbytes: int) -> StagingArena:
        if not self._swept:
            self._swept = True
            # every node id's: a plain process's node id is its own (``p<pid>``), so no
            # later process shares the id of a dead one whose writer died with it
            reclaim_stale_segments(None, shm_dir=self._shm_dir)
        size = -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
        t0 = time.monotonic()
        seg = ShmSegment.create(new_segment_name(self._node), size, shm_dir=self._shm_dir)
        logger.info(
            "created staging arena %s (%d bytes) in %.3f s", seg.name, size, time.monotonic() - t0
        )
        return StagingArena(seg)

    def release(self, arena: StagingArena) -> None:
        with self._cond:
            if arena.name not in self._busy:
                return
            self._busy.discard(arena.name)
            if self._closed:
                self._drop(arena)
            else:
                self._free.append(arena)
            self._cond.notify_all()

    def discard(self, arena: StagingArena) -> None:
        with self._cond:
            self._busy.discard(arena.name)
            if arena in self._free:
                self._free.remove(arena)
            self._drop(arena)
            self._cond.notify_all()

    def _drop(self, arena: StagingArena) -> None:  # lock held
        if self._all.pop(arena.name, None) is None:
            return
        arena.close(unlink=True)
        if self._on_discard is not None:
            with contextlib.suppress(Exception):  # best effort: the writer may be gone
                self._on_discard(arena.name)

    def close(self) -> None:
        """Unlink every arena, after a background creation in progress (:meth:`reserve`)
        ended. Busy ones are unlinked too (their mapping lives on in the writer until it
        finishes); their views are dropped when released."""
        with self._cond:
            self._closed = True
            warmups, self._warmups = self._warmups, []
        for thread in warmups:
            if thread is not threading.current_thread():
                thread.join()
        with self._cond:
            for arena in list(self._all.values()):
                if arena.name in self._busy:
                    arena.segment.unlink()
                else:
                    self._drop(arena)
            self._free.clear()
            self._cond.notify_all()


# ---- the copy ------------------------------------------------------------------------------

_PIECE_BYTES = 8 << 20
_SINGLE_THREAD_COPY_BYTES = 32 << 20


def copy_into(
    dsts: Sequence[torch.Tensor],
    srcs: Sequence[torch.Tensor],
    *,
    threads: int,
    executor: Any | None = None,
    runs: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor]]] = (),
) -> None:
    """Copy each ``srcs[i]`` into ``dsts[i]`` (arena views); returns when all bytes landed.

    ``runs`` (CPU sources only, :mod:`ckptsvc.stage.copy_program`): ``(view, sources)``
    pairs, each copied first by one ``torch.cat(sources, out=view)``.

    CUDA sources: one side stream, non-blocking D2H copies into pinned memory, then a
    synchronize. CPU sources: big contiguous tensors are cut into pieces and all pieces are
    spread over ``threads`` threads (``copy_`` releases the GIL); below
    ``_SINGLE_THREAD_COPY_BYTES`` in all, the calling thread copies alone (handing work to
    threads would cost more than it saves). Hook points ``snapshot.copy.before``/``.after``
    (:mod:`ckptsvc.hooks`) surround the copy.
    """
    hooks.point("snapshot.copy.before")
    for view, sources in runs:
        try:
            torch.cat(list(sources), out=view)
        except (RuntimeError, NotImplementedError):  # a dtype without cat in this torch
            flat, at = view.reshape(-1), 0
            for s in sources:
                flat[at : at + s.numel()].view(s.shape).copy_(s)
                at += s.numel()
    cuda_pairs = [(d, s) for d, s in zip(dsts, srcs, strict=True) if s.device.type == "cuda"]
    cpu_pairs = [(d, s) for d, s in zip(dsts, srcs, strict=True) if s.device.type != "cuda"]
    streams: dict[torch.device, torch.cuda.Stream] = {}
    for d, s in cuda_pairs:  # one side stream per device, after the work queued so far
        stream = streams.get(s.device)
        if stream is None:
            with torch.cuda.device(s.device):
                stream = streams[s.device] = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            d.copy_(s, non_blocking=True)
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    cpu_nbytes = 0
    for d, s in cpu_pairs:
        nbytes = s.numel() * s.element_size()
        cpu_nbytes += nbytes
        if nbytes > 2 * _PIECE_BYTES and s.is_contiguous() and s.dim() > 0:
            fd, fs = d.reshape(-1), s.reshape(-1)
            step = max(1, _PIECE_BYTES // s.element_size())
            pieces.extend((fd[i : i + step], fs[i : i + step]) for i in range(0, fs.numel(), step))
        else:
            pieces.append((d, s))
    small = cpu_nbytes < _SINGLE_THREAD_COPY_BYTES
    if threads <= 1 or executor is None or len(pieces) < 2 or small:
        for d, s in pieces:
            d.copy_(s)
    else:
        groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(threads)]
        for i, pair in enumerate(pieces):
            groups[i % threads].append(pair)

        def _run(group: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            with torch.no_grad():
                for d, s in group:
                    d.copy_(s)

        for fut in [executor.submit(_run, g) for g in groups if g]:
            fut.result()
    for stream in streams.values():  # the snapshot is complete before save() returns
        stream.synchronize()
    hooks.point("snapshot.copy.after")
