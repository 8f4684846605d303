"""The host-memory budget: how many arenas a checkpointer may hold, and piecewise staging.

``AsyncCheckpointer(memory_budget_bytes=B)`` bounds the shared-memory staging bytes of
one checkpointer (:class:`MemoryBudget`):

- ``B = 0`` (default, ``CKPTSVC_MEMORY_BUDGET_BYTES``): one state copy, one arena. A save
  while the previous one is still being written waits for it (back-pressure).
  An explicit ``arenas_per_rank=N`` without a budget allows N copies (double buffering).
- ``B > 0``: the arenas together never exceed ``B``; a second arena (double buffering, up
  to ``arenas_per_rank``, default 2) exists only when two copies fit.
- A state whose arena layout is larger than ``B`` is **staged and streamed in pieces**:
  one ring arena of ``B`` bytes, two slots of ``B / 2``. ``save`` returns once the last
  piece is staged: blocking time grows (up to the write time), memory does not.
  ``SaveTimings.pieces`` / ``streamed`` / ``piece_wait_s`` say so.

Call order of a streamed save (process / thread that runs each step):

1. training thread: acquire the ring arena, send the ``SaveJob`` (``stream`` set: its file
   offsets are those of the full layout) - ``AsyncCheckpointer``;
2. training thread, :meth:`PieceStreamer.run`, for each window ``seq`` of the layout:
   wait until the writer acknowledged piece ``seq - 2`` (its slot is free again), copy
   the tensors' byte ranges that fall in the window into slot ``seq % 2`` (CPU threads;
   CUDA: D2H on a side stream, synchronised per piece), send ``PieceReady``;
3. node writer, ``workers.piece_stream``: write the shards sequentially from the pieces,
   ``PieceDone`` once a piece's bytes were handed to storage (client reader thread:
   :meth:`PieceStreamer.on_piece_done`);
4. the outcome (``JobDone`` / ``JobFailed`` / writer death) is held by
   :meth:`PieceStreamer.deliver` until the training thread no longer touches the ring
   (:meth:`PieceStreamer.release`), then handled as for any save (arena released).

Pieces cut tensors anywhere on element boundaries (every window starts on a page, every
tensor on a multiple of its element size in a page-aligned data section). A
non-contiguous source is copied range by range through strided views of itself: no
temporary contiguous copy, so the budget holds for any layout. A failure while staging
(writer failed, writer died, an exception on the trainer) makes ``save`` raise; the job is
cancelled (``CancelJob``) and nothing is committed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from ckptsvc import knobs
from ckptsvc.errors import ConfigError, LifecycleError, SaveFailedError, WriterDiedError
from ckptsvc.format.checksum import Crc32c
from ckptsvc.stage.arena import ALIGN_BYTES, ArenaPlan, StagingArena
from ckptsvc.stage.parts import ComponentPlan, PartReport, StagedFile
from ckptsvc.stage.tensors import dtype_to_torch
from ckptsvc.workers.protocol import (
    CancelJob,
    JobDone,
    JobFailed,
    PieceDone,
    PieceReady,
    StreamSpec,
)

if TYPE_CHECKING:
    from ckptsvc.workers.client import WriterClient

__all__ = [
    "MIN_BUDGET_BYTES",
    "ComponentSegments",
    "MemoryBudget",
    "PieceStreamer",
    "Segment",
    "StreamStats",
    "component_segments",
    "flat_segments",
]

logger = logging.getLogger(__name__)

MIN_BUDGET_BYTES = 2 << 20
"""Smallest useful budget: two 1 MiB slots (a message round trip per MiB already costs
more than the copy)."""

_WAIT_TICK_S = 1.0


# ---- the budget ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBudget:
    """How many arenas of what total size one checkpointer may hold.

    ``budget_bytes`` is ``None`` for "one state copy per arena, ``max_arenas`` arenas".
    """

    budget_bytes: int | None
    max_arenas: int

    @classmethod
    def resolve(
        cls, *, memory_budget_bytes: int | None, arenas_per_rank: int | None
    ) -> MemoryBudget:
        """Explicit arguments, else ``CKPTSVC_MEMORY_BUDGET_BYTES`` / ``CKPTSVC_ARENAS_PER_RANK``.

        Raises ``ValueError`` for a negative value or a budget below
        :data:`MIN_BUDGET_BYTES`, naming the option.
        """
        budget = knobs.MEMORY_BUDGET_BYTES.get(memory_budget_bytes)
        arenas = knobs.ARENAS_PER_RANK.get(arenas_per_rank)
        if arenas < 0:
            raise ConfigError(f"arenas_per_rank must be >= 1 (or 0 for automatic), got {arenas}")
        if budget < 0:
            raise ConfigError(
                f"memory_budget_bytes must be >= 0 (0 = one state copy), got {budget}"
            )
        if budget == 0:
            return cls(None, arenas or 1)
        if budget < MIN_BUDGET_BYTES:
            raise ConfigError(
                f"memory_budget_bytes={budget} is too small to be useful: a streamed save needs "
                f"at least {MIN_BUDGET_BYTES} bytes (two 1 MiB slots); use a larger budget, or "
                "0 for one state copy"
            )
        return cls(budget, arenas or 2)

    def streams(self, layout_nbytes: int) -> bool:
        """True if a save whose arena layout takes ``layout_nbytes`` must go in pieces."""
        if self.budget_bytes is None:
            return False
        return -(-layout_nbytes // ALIGN_BYTES) * ALIGN_BYTES > self.budget_bytes

    @property
    def ring_nbytes(self) -> int:
        """Size of the ring arena of a streamed save (the budget, whole pages)."""
        if self.budget_bytes is None:
            raise LifecycleError("no memory budget: saves are never streamed")
        return self.budget_bytes // ALIGN_BYTES * ALIGN_BYTES

    @property
    def piece_nbytes(self) -> int:
        """Bytes per piece: half the ring, whole pages."""
        return self.ring_nbytes // 2 // ALIGN_BYTES * ALIGN_BYTES


# ---- what to stage ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One tensor of the layout: bytes ``[offset, offset + nbytes)`` come from ``source``."""

    offset: int
    dtype: torch.dtype
    source: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.source.numel() * self.dtype.itemsize


def flat_segments(
    plan: ArenaPlan,
    views: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Sequence[tuple[str, torch.Tensor]],
) -> list[Segment]:
    """Segments of a ``save`` (``views`` and ``tensors`` in the same order)."""
    return [
        Segment(plan.tensor_offsets[name], dtype, t)
        for (name, dtype, _), (_, t) in zip(views, tensors, strict=True)
    ]


@dataclass(frozen=True)
class ComponentSegments:
    """What a streamed ``save_components`` stages: ``segments``, the indices of those whose
    CRC-32C ``validate_replication`` needs, and how to put those CRCs into the parts."""

    segments: list[Segment]
    crc_segments: frozenset[int]
    plans: Sequence[ComponentPlan]
    where: dict[tuple[int, str], int]

    def parts(self, crcs: Mapping[int, str]) -> tuple[PartReport, ...]:
        """Each component's part, with ``crcs`` (by segment index) where validated."""
        out = []
        for p in self.plans:
            if not p.crc_names:
                out.append(p.part)
                continue
            index = {name: self.where[(id(f), name)] for f in p.files for name in f.sources}
            out.append(replace(p.part, crcs=tuple(crcs[index[n]] for n in p.crc_names)))
        return tuple(out)


def component_segments(
    plans: Sequence[ComponentPlan], staged: Sequence[StagedFile], layout: ArenaPlan
) -> ComponentSegments:
    """Segments of a ``save_components`` (``staged`` in ``layout`` order)."""
    segments: list[Segment] = []
    where: dict[tuple[int, str], int] = {}
    for f, base in zip(staged, layout.file_offsets, strict=True):
        for e in f.plan.layout.entries:
            where[(id(f), e.name)] = len(segments)
            segments.append(Segment(base + e.begin, dtype_to_torch(e.dtype), f.sources[e.name]))
    crc = frozenset(
        where[(id(f), n)] for p in plans for f in p.files for n in p.crc_names if n in f.sources
    )
    return ComponentSegments(segments, crc, plans, where)


def _row_major_views(src: torch.Tensor, i0: int, i1: int) -> list[tuple[int, torch.Tensor]]:
    """Views of ``src`` (no copy) covering its row-major elements ``[i0, i1)``, each as
    ``(first element, view)``; a view's elements are consecutive in row-major order."""
    n = src.numel()
    if i0 >= i1:
        return []
    if i0 == 0 and i1 == n:
        return [(0, src)]
    if src.dim() <= 1 or src.is_contiguous():
        return [(i0, src.reshape(-1)[i0:i1])]  # a view for 0/1-D and contiguous tensors
    row = n // src.shape[0]
    first, last = i0 // row, (i1 - 1) // row
    if first == last:
        return [
            (first * row + a, v)
            for a, v in _row_major_views(src[first], i0 - first * row, i1 - first * row)
        ]
    out: list[tuple[int, torch.Tensor]] = []
    full_from, full_to = first, last + 1
    if i0 % row:
        out += [(first * row + a, v) for a, v in _row_major_views(src[first], i0 % row, row)]
        full_from += 1
    tail = i1 - last * row
    if tail != row:
        full_to = last
    if full_to > full_from:
        out.append((full_from * row, src[full_from:full_to]))
    if tail != row:
        out += [(last * row + a, v) for a, v in _row_major_views(src[last], 0, tail)]
    return out


# ---- the streamer ----------------------------------------------------------------------------


@dataclass
class StreamStats:
    """What one streamed save cost the training thread, and the CRCs it computed."""

    pieces: int = 0
    copy_s: float = 0.0
    piece_wait_s: float = 0.0
    crcs: dict[int, str] = field(default_factory=dict)


class PieceStreamer:
    """One streamed save on the trainer (see the module docstring for the call order).

    ``segments`` lie in a layout of ``layout_nbytes`` bytes; ``crc_segments`` are indices
    of segments whose CRC-32C is computed from the staged bytes (``validate_replication``).
    ``on_outcome`` handles the writer's outcome once :meth:`release` was called.
    """

    def __init__(
        self,
        *,
        ring: StagingArena,
        piece_nbytes: int,
        layout_nbytes: int,
        segments: Sequence[Segment],
        on_outcome: Callable[[Any], None],
        copy: Callable[..., None],
        threads: int,
        executor: Executor | None,
        what: str,
        crc_segments: Collection[int] = (),
    ) -> None:
        if piece_nbytes <= 0 or piece_nbytes % ALIGN_BYTES or 2 * piece_nbytes > ring.nbytes:
            raise ConfigError(
                f"{what}: pieces of {piece_nbytes} bytes do not fit twice in the "
                f"{ring.nbytes}-byte ring arena"
            )
        self.spec = StreamSpec(nbytes=layout_nbytes, piece_nbytes=piece_nbytes)
        self._ring = ring
        self._segments = sorted(
            ((i, s) for i, s in enumerate(segments) if s.nbytes), key=lambda p: p[1].offset
        )
        self._on_outcome = on_outcome
        self._copy = copy
        self._threads = threads
        self._executor = executor
        self._what = what
        self._crcs = {i: Crc32c() for i in crc_segments}
        self._cond = threading.Condition()
        self._acked = -1
        self._outcome: Any = None
        self._holding = True
        self._cursor = 0  # index of the first segment not entirely before the next piece

    # ---- client reader thread ----

    def on_piece_done(self, message: PieceDone) -> None:
        """A piece's bytes were handed to storage: its slot may be refilled."""
        with self._cond:
            self._acked = max(self._acked, message.seq)
            self._cond.notify_all()

    def deliver(self, outcome: Any) -> None:
        """The job's outcome: handled now, or once :meth:`release` is called."""
        with self._cond:
            if self._holding:
                self._outcome = outcome
                self._cond.notify_all()
                return
        self._on_outcome(outcome)

    # ---- training thread ----

    def release(self) -> None:
        """The training thread is done with the ring: hand over a held outcome."""
        with self._cond:
            self._holding = False
            outcome, self._outcome = self._outcome, None
        if outcome is not None:
            self._on_outcome(outcome)

    def run(self, client: WriterClient, job_id: int) -> StreamStats:
        """Stage and send every piece; return after the last one is staged. Raises the
        writer's error (``SaveFailedError``, ``WriterDiedError``) or the trainer's own;
        then the job is cancelled and nothing is committed. Call :meth:`release` after."""
        stats = StreamStats()
        client.watch_pieces(job_id, self.on_piece_done)
        if any(s.source.device.type == "cuda" for _, s in self._segments):
            self._ring.pin()
        try:
            for seq in range(self.spec.npieces):
                waited = time.perf_counter()
                self._wait_for_slot(seq)
                copied = time.perf_counter()
                stats.piece_wait_s += copied - waited
                begin = seq * self.spec.piece_nbytes
                end = min(begin + self.spec.piece_nbytes, self.spec.nbytes)
                slot = (seq % 2) * self.spec.piece_nbytes
                self._stage(begin, end, slot)
                stats.copy_s += time.perf_counter() - copied
                client.send(PieceReady(job_id, seq, begin, slot, end - begin))
                stats.pieces += 1
        except BaseException as e:
            with self._cond:
                finished = self._outcome is not None
            if not finished:  # the writer still waits for pieces: stop it
                with contextlib.suppress(WriterDiedError):
                    client.send(CancelJob(job_id, f"{type(e).__name__}: {e}"))
            raise
        stats.crcs = {i: c.hexdigest() for i, c in self._crcs.items()}
        return stats

    def _wait_for_slot(self, seq: int) -> None:
        with self._cond:
            while True:
                outcome = self._outcome
                if outcome is not None:
                    raise self._error(outcome)
                if self._acked >= seq - 2:
                    return
                self._cond.wait(_WAIT_TICK_S)

    def _error(self, outcome: Any) -> BaseException:
        if isinstance(outcome, JobFailed):
            cause = outcome.error.to_exception()
            error = SaveFailedError(f"{self._what} failed while streaming: {cause}")
            error.__cause__ = cause
            return error
        if isinstance(outcome, JobDone):  # cannot happen: the writer needs every piece
            return SaveFailedError(f"{self._what}: the writer finished before the last piece")
        return WriterDiedError(f"{self._what}: {outcome}")

    def _stage(self, begin: int, end: int, slot: int) -> None:
        """Copy layout bytes ``[begin, end)`` into the ring at ``slot``; then CRCs."""
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        crc_ranges: list[tuple[int, int, int]] = []
        for index, seg in self._overlapping(begin, end):
            lo, hi = max(begin, seg.offset), min(end, seg.offset + seg.nbytes)
            size = seg.dtype.itemsize
            if (lo - seg.offset) % size or (hi - seg.offset) % size or (slot + lo - begin) % size:
                raise SaveFailedError(
                    f"{self._what}: a piece boundary cuts an element of a {seg.dtype} tensor "
                    f"at layout offset {seg.offset} (layout not aligned)"
                )
            typed = self._ring.bytes_at(slot + lo - begin, hi - lo).view(seg.dtype)
            i0 = (lo - seg.offset) // size
            for first, view in _row_major_views(seg.source, i0, (hi - seg.offset) // size):
                at = first - i0
                dsts.append(typed[at : at + view.numel()].view(view.shape))
                srcs.append(view)
            if index in self._crcs:
                crc_ranges.append((index, slot + lo - begin, hi - lo))
        with torch.no_grad():
            self._copy(dsts, srcs, threads=self._threads, executor=self._executor)
        if crc_ranges:
            ring = memoryview(self._ring.segment.buffer)
            try:
                for index, at, size in crc_ranges:
                    self._crcs[index].update(ring[at : at + size])
            finally:
                ring.release()

    def _overlapping(self, begin: int, end: int) -> list[tuple[int, Segment]]:
        """Segments meeting ``[begin, end)``; pieces come in order, so the cursor only moves on."""
        out = []
        segs = self._segments
        while (
            self._cursor < len(segs)
            and segs[self._cursor][1].offset + segs[self._cursor][1].nbytes <= begin
        ):
            self._cursor += 1
        i = self._cursor
        while i < len(segs) and segs[i][1].offset < end:
            out.append(segs[i])
            i += 1
        return out
