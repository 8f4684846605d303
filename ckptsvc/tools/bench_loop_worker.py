"""The worker of ``ckptsvc bench --loop``: one save mode's training loop, in its own process.

:mod:`ckptsvc.tools.bench_loop` starts ``python -m ckptsvc.tools.bench_loop_worker CONFIG_JSON`` once
per mode. In the worker (:func:`run_mode`):

1. build the model (an MLP of ``LAYERS`` square layers, as wide as ``model_mb`` MiB
   of fp32 parameters allow, :func:`mlp_width`), AdamW and one fixed batch from fixed seeds, so every mode computes the
   same values and its step-``k`` checkpoint holds the same tensors;
2. make the mode's saver (its constructor may say the mode is unavailable);
3. run ``warmup_steps + steps`` iterations on the main thread: zero_grad, forward,
   backward (timed as compute), ``optimizer.step`` (timed; in ``overlapped`` mode it
   includes the fence wait of ckptsvc's pre-hook, which each handle's
   ``timings.fence_wait_s`` reports), then ``saver.save(step)`` every ``every`` steps
   (timed as blocking);
4. after the loop, ``saver.finish()`` waits until every save is durable (the drain,
   outside the step times); then the best of 3 copies of the state into pre-touched
   memory (the copy the overlap hides);
5. write a :class:`ModeResult` as JSON and leave with ``os._exit`` (DCP's daemon stops
   when its pipe closes).

Savers: ``sync`` (:func:`~ckptsvc.sharded_checkpoint.save_checkpoint` of the flattened
model + optimizer tensors, durable before it returns), ``async``
(:meth:`AsyncCheckpointer.save`), ``overlapped`` (``AsyncCheckpointer.save(...,
overlap=True)``) and ``dcp_async`` (``torch.distributed.checkpoint.async_save`` of
``get_state_dict``, process-based where this torch has it, after waiting for the previous
save's future as DCP documents; a single-rank gloo process group).
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.sharded_checkpoint import save_checkpoint
from ckptsvc.stage.flatten import flatten_state

if TYPE_CHECKING:
    import torch

__all__ = [
    "LAYERS",
    "MODES",
    "LoopConfig",
    "ModeResult",
    "interval_means",
    "mlp_width",
    "run_mode",
    "trimmed_mean",
]

MODES: tuple[str, ...] = ("none", "sync", "async", "overlapped", "dcp_async")
LAYERS = 4  # Linear + GELU blocks of the MLP, each width x width fp32 (+ bias)


@dataclass(frozen=True)
class LoopConfig:
    """One worker's job: the mode and the loop's shape."""

    mode: str
    steps: int
    warmup_steps: int
    every: int
    model_mb: float
    batch: int
    root: str  # this mode's scratch directory (checkpoints go under it)
    result_path: str


@dataclass(frozen=True)
class ModeResult:
    """One mode's measurements over the measured steps (warm-up excluded)."""

    mode: str
    status: str  # "ok" | "unavailable" | "error"
    reason: str = ""
    state_nbytes: int = 0
    step_s_median: float | None = None
    step_s_trimmed_mean: float | None = None  # mean of the middle 80 %
    compute_s_median: float | None = None  # zero_grad + forward + backward
    opt_step_s_median: float | None = None  # optimizer.step, with any fence wait
    saves_started: int = 0
    saves_completed: int = 0
    blocking_s_mean: float | None = None  # per save, in the measured steps
    blocking_s_max: float | None = None
    fence_wait_s_mean: float | None = None  # overlapped: per save, in the optimizer pre-hook
    drain_s: float | None = None  # after the loop: until every save was durable
    copy_s: float | None = None  # baseline: copying the state into pre-touched memory
    checkpoints: tuple[str, ...] = ()
    step_s_samples: tuple[float, ...] = ()  # per save interval: its mean step time
    extras: dict[str, Any] = field(default_factory=dict)


class _Saver(Protocol):
    def save(self, step: int) -> None: ...

    def finish(self) -> tuple[int, list[str]]:
        """Wait for every save; return (saves completed, checkpoint paths)."""
        ...


class _Unavailable(Exception):
    """Internal: this mode cannot run with this ckptsvc / torch; the row says why."""


def _training_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model, "optimizer": opt}


class _SyncSaver:
    def __init__(self, root: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        self._flatten, self._save = flatten_state, save_checkpoint
        self._root, self._state = root, _training_state(model, opt)
        self._paths: list[str] = []

    def save(self, step: int) -> None:
        path = os.path.join(self._root, f"checkpoint-{step}")
        tensors = dict(self._flatten(self._state).tensors)
        self._save(path, tensors, safetensors=True, step=step)
        self._paths.append(path)

    def finish(self) -> tuple[int, list[str]]:
        return len(self._paths), list(self._paths)


class _AsyncSaver:
    """``AsyncCheckpointer.save`` with its own node writer (a fresh ``node`` id), so a
    writer shared with other processes on the machine does not take part. With
    ``overlap`` ckptsvc registers its fence as the optimizer's step pre-hook at the first
    save; each handle's ``timings.fence_wait_s`` says how long that hook waited."""

    def __init__(
        self, root: str, model: torch.nn.Module, opt: torch.optim.Optimizer, *, overlap: bool
    ) -> None:
        if overlap and "overlap" not in inspect.signature(AsyncCheckpointer.save).parameters:
            raise _Unavailable(
                "AsyncCheckpointer.save has no overlap= parameter in this ckptsvc build"
            )
        self._ckpt = AsyncCheckpointer(root, node=f"bench-loop-{uuid.uuid4().hex[:8]}")
        self._state, self._overlap = _training_state(model, opt), overlap
        self.handles: list[Any] = []

    def save(self, step: int) -> None:
        if self._overlap:
            self.handles.append(self._ckpt.save(step, self._state, overlap=True))
        else:
            self.handles.append(self._ckpt.save(step, self._state))

    def finish(self) -> tuple[int, list[str]]:
        try:
            self._ckpt.wait_all()
        finally:
            self._ckpt.close()
        done = [h for h in self.handles if h.done() and h.exception(0) is None]
        return len(done), [h.path for h in done]

    def timing_means(self, *, after_step: int) -> dict[str, float]:
        """Mean ``arena_wait_s`` (back-pressure, part of the blocking time), and with
        ``overlap`` ``fence_wait_s`` and ``snapshot_s`` (the background copy), of the saves
        after ``after_step`` (the measured steps)."""
        names = (
            ("arena_wait_s", "fence_wait_s", "snapshot_s") if self._overlap else ("arena_wait_s",)
        )
        means = {}
        for name in names:
            values = [getattr(h.timings, name, None) for h in self.handles if h.step > after_step]
            present = [float(v) for v in values if v is not None]
            if present:
                means[name] = statistics.fmean(present)
        return means


class _DcpSaver:
    """``dcp.async_save`` (process-based where this torch has it) of ``get_state_dict``;
    waits for the previous save's future first, as DCP's documentation does."""

    def __init__(self, root: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        try:
            import torch.distributed as dist
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict
            from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
        except ImportError as e:
            raise _Unavailable(f"torch.distributed.checkpoint: {e}") from e
        if not dist.is_available():
            raise _Unavailable("torch.distributed is not available in this torch build")
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        self._dcp, self._get = dcp, get_state_dict
        self.kind = getattr(AsyncCheckpointerType, "PROCESS", None) or AsyncCheckpointerType.THREAD
        self._root, self._model, self._opt = root, model, opt
        self._pending: tuple[Any, str] | None = None
        self._paths: list[str] = []

    def _settle(self) -> None:
        if self._pending is not None:
            fut, path = self._pending
            self._pending = None
            (getattr(fut, "upload_completion", None) or fut).result()
            self._paths.append(path)

    def save(self, step: int) -> None:
        self._settle()
        path = os.path.join(self._root, f"checkpoint-{step}")
        model_sd, optim_sd = self._get(self._model, self._opt)
        writer = self._dcp.FileSystemWriter(path)
        fut = self._dcp.async_save(
            {"model": model_sd, "optim": optim_sd},
            storage_writer=writer,
            async_checkpointer_type=self.kind,
        )
        self._pending = (fut, path)

    def finish(self) -> tuple[int, list[str]]:
        self._settle()
        return len(self._paths), list(self._paths)


def mlp_width(model_mb: float) -> int:
    """The MLP's width for ``model_mb`` MiB of fp32 weights: a multiple of 64, at least 64
    (16 MiB -> 1024)."""
    per_layer = model_mb * (1 << 20) / (4 * LAYERS)
    return max(64, round(per_layer**0.5 / 64) * 64)


def _build(cfg: LoopConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    import torch

    torch.manual_seed(0)
    width = mlp_width(cfg.model_mb)
    model = torch.nn.Sequential(
        *(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())
            for _ in range(LAYERS)
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randn(cfg.batch, width, generator=torch.Generator().manual_seed(1))
    return model, opt, batch


def _make_saver(cfg: LoopConfig, model: torch.nn.Module, opt: torch.optim.Optimizer) -> _Saver:
    if cfg.mode == "sync":
        return _SyncSaver(cfg.root, model, opt)
    if cfg.mode in ("async", "overlapped"):
        return _AsyncSaver(cfg.root, model, opt, overlap=cfg.mode == "overlapped")
    if cfg.mode == "dcp_async":
        return _DcpSaver(cfg.root, model, opt)
    raise ValueError(f"unknown loop mode {cfg.mode!r}; choose from {', '.join(MODES)}")


def _state_nbytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, float]:
    """Bytes of model + optimizer tensors, and the best of 3 copies into pre-touched memory."""
    import torch

    tensors = [p.detach() for p in model.parameters()]
    tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    buffers = [torch.empty_like(t).copy_(t) for t in tensors]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for b, t in zip(buffers, tensors, strict=True):
            b.copy_(t)
        best = min(best, time.perf_counter() - t0)
    return sum(t.numel() * t.element_size() for t in tensors), best


def interval_means(steps: Sequence[tuple[int, float]], *, every: int) -> list[float]:
    """Mean step time of each complete save interval: the ``every`` consecutive steps
    (by 0-based index) that end with a save. With ``every=1``, the step times."""
    intervals: dict[int, list[float]] = {}
    for index, step_s in steps:
        intervals.setdefault(index // every, []).append(step_s)
    return [statistics.fmean(v) for v in intervals.values() if len(v) == every]


def trimmed_mean(values: Sequence[float], cut: float = 0.1) -> float:
    """The mean of ``values`` without the lowest and highest ``cut`` fraction."""
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    kept = ordered[k : len(ordered) - k] or ordered
    return statistics.fmean(kept)


def run_mode(cfg: LoopConfig) -> ModeResult:
    """Run the loop of one mode in this process and measure it (the worker's job)."""
    import torch

    model, opt, batch = _build(cfg)
    try:
        saver = None if cfg.mode == "none" else _make_saver(cfg, model, opt)
    except _Unavailable as e:
        return ModeResult(cfg.mode, "unavailable", reason=str(e))
    steps: list[tuple[int, float, float, float]] = []  # index, step, compute, optimizer.step
    blocking: list[float] = []
    started = 0
    for i in range(cfg.warmup_steps + cfg.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(batch), batch)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if saver is not None and (i + 1) % cfg.every == 0:
            saver.save(i + 1)
            started += 1
            if i >= cfg.warmup_steps:
                blocking.append(time.perf_counter() - t2)
        if i >= cfg.warmup_steps:
            steps.append((i, time.perf_counter() - t0, t1 - t0, t2 - t1))
    t_drain = time.perf_counter()
    completed, paths = saver.finish() if saver is not None else (0, [])
    drain_s = time.perf_counter() - t_drain
    nbytes, copy_s = _state_nbytes(model, opt)
    step_times = interval_means([(i, t) for i, t, _, _ in steps], every=cfg.every)
    timings = (
        saver.timing_means(after_step=cfg.warmup_steps) if isinstance(saver, _AsyncSaver) else {}
    )
    extras: dict[str, Any] = {
        "layers": LAYERS,
        "width": mlp_width(cfg.model_mb),
        "threads": torch.get_num_threads(),
        "every": cfg.every,
    }
    if isinstance(saver, _DcpSaver):
        extras["dcp_kind"] = saver.kind.value
    for name in ("arena_wait_s", "snapshot_s"):
        if name in timings:
            extras[f"{name}_mean"] = timings[name]
    return ModeResult(
        cfg.mode, "ok",
        state_nbytes=nbytes,
        step_s_median=statistics.median(step_times),
        step_s_trimmed_mean=trimmed_mean(step_times),
        compute_s_median=statistics.median(s[2] for s in steps),
        opt_step_s_median=statistics.median(s[3] for s in steps),
        saves_started=started,
        saves_completed=completed,
        blocking_s_mean=statistics.fmean(blocking) if blocking else None,
        blocking_s_max=max(blocking) if blocking else None,
        fence_wait_s_mean=timings.get("fence_wait_s"),
        drain_s=drain_s if saver is not None else None,
        copy_s=copy_s,
        checkpoints=tuple(paths),
        step_s_samples=tuple(step_times),
        extras=extras,
    )  # fmt: skip


def _worker_main(argv: list[str]) -> None:
    """Worker entry: run one mode, write the result JSON, leave without teardown (DCP's
    daemon stops when its pipe closes)."""
    cfg = LoopConfig(**json.loads(argv[0]))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    try:
        result = asdict(run_mode(cfg))
    except Exception as e:  # reported as the mode's error; the traceback goes to the log
        import traceback

        traceback.print_exc()
        result = asdict(ModeResult(cfg.mode, "error", reason=f"{type(e).__name__}: {e}"))
    with open(cfg.result_path, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
