"""The workloads of ``ckptsvc bench``: one measurement per method, in its own process.

:mod:`ckptsvc.tools.bench` starts ``python -m ckptsvc.tools.bench_workloads CONFIG_JSON`` once per
measurement, so that peak memory is per measurement. In the worker:

1. :func:`run_worker_main` builds the synthetic state (not for loads);
2. the workload enters :class:`~ckptsvc.tools.bench_probes.PeakRss` (resets ``VmHWM``, reads the
   baseline RSS, so "extra RSS" excludes the state itself) and times itself:
   ``blocking_s`` until the call returns, ``durable_s`` until the bytes are on stable
   storage (fsync'd, upload completed) or, for loads, until every page of every loaded
   tensor has been touched;
3. the worker writes one JSON result (a :class:`~ckptsvc.tools.bench_probes.Sample`, or
   "unavailable"/"error" with the reason) and leaves with ``os._exit`` (DCP's background
   process sees its pipe close and stops by itself).

Cold reads are the parent's job: it drops the files from the page cache before a load.
Async methods make a warm-up save first (process start, arena allocation), then change
every value and measure a second save.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ckptsvc import knobs
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.sharded_checkpoint import load_checkpoint, save_checkpoint
from ckptsvc.storage import url_to_fs
from ckptsvc.tools import bench_reads, bench_remote_save
from ckptsvc.tools.bench_probes import (
    IO_CHUNK_BYTES,
    PeakRss,
    Sample,
    Unavailable,
    WorkerConfig,
    aligned_buffer,
    build_state,
    copy_into,
    fsync_tree,
    make_specs,
    proc_status_bytes,
    read_file,
    touch_pages,
    write_file,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARTIFACTS",
    "WORKLOADS",
    "Ctx",
    "Unavailable",
    "load_sample",
    "perturb",
    "require",
    "run_worker_main",
    "sample",
]

ARTIFACTS = {  # the file or directory a save leaves and the matching load reads
    "raw_write": "raw.bin",
    "raw_write_direct": "raw_direct.bin",
    "torch_save": "ckpt.pt",
    "safetensors_save": "ckpt.safetensors",
    "dcp_save": "dcp",
    "ckptsvc_dcp_save": "ckptsvc_dcp",
    "ckptsvc_save": "ckptsvc",
    **bench_reads.READ_ARTIFACTS,
}


def require(module: str, attr: str) -> Any:
    """``module.attr`` (``attr`` may be a submodule), or :class:`Unavailable` saying why not."""
    try:
        mod = __import__(module, fromlist=[attr])
        return getattr(mod, attr)
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"{module}.{attr}: {type(e).__name__}: {e}") from e


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class Ctx:
    """What a workload gets: the config, the state (None for loads) and path helpers. The
    object-store filesystem is created here, before any timing starts."""

    def __init__(self, cfg: WorkerConfig, state: dict[str, torch.Tensor] | None) -> None:
        self.cfg = cfg
        self.state = state
        self.nbytes = sum(s.nbytes for s in make_specs(cfg.total_nbytes, tensors=cfg.tensors))
        self.fs: Any = None
        if cfg.remote:
            self.fs, _ = url_to_fs(cfg.root, **cfg.storage_options)

    def path(self, name: str) -> str:
        """The artifact's local path or URL (what a library's save/load call is given)."""
        if self.cfg.remote:
            return f"{self.cfg.root.rstrip('/')}/{name}"
        return os.path.join(self.cfg.root, name)

    def fs_path(self, name: str) -> str:
        """The artifact's path in :attr:`fs` (object stores only)."""
        return str(self.fs._strip_protocol(self.path(name)))

    def storage_kwargs(self, fn: Callable[..., Any]) -> dict[str, Any]:
        if self.cfg.storage_options and _accepts(fn, "storage_options"):
            return {"storage_options": self.cfg.storage_options}
        return {}


Timed = tuple[float, float, dict[str, Any]]  # blocking_s, durable_s, extras
Workload = tuple[Callable[[Ctx], Sample], bool]  # the workload, whether it needs the state


def sample(ctx: Ctx, rss: PeakRss, timed: Timed) -> Sample:
    """The :class:`Sample` of one timed workload (``timed``: blocking, durable, extras)."""
    blocking_s, durable_s, extras = timed
    extras = {**extras, "rss_reset": rss.reset_ok}
    return Sample(
        ctx.cfg.method, ctx.nbytes, blocking_s, durable_s,
        rss.base_bytes, rss.peak_bytes, rss.child_peak_bytes, extras,
    )  # fmt: skip


# ---------------------------------------------------------------------------- floors
def w_memcpy(ctx: Ctx) -> Sample:
    """Copy the state into one pre-touched buffer, best of 3 (the floor); extras: the first
    copy into fresh heap pages, and best of 3 into pre-touched shared memory."""
    from multiprocessing import shared_memory

    import torch

    state = ctx.state or {}
    with PeakRss() as rss:
        buf = torch.empty(ctx.nbytes, dtype=torch.uint8)
        t0 = time.perf_counter()
        copy_into(state, buf)
        first_touch_s = time.perf_counter() - t0
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            copy_into(state, buf)
            runs.append(time.perf_counter() - t0)
        del buf
        shm = shared_memory.SharedMemory(create=True, size=ctx.nbytes)
        try:
            sbuf = torch.frombuffer(shm.buf, dtype=torch.uint8)
            copy_into(state, sbuf)
            shm_runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                copy_into(state, sbuf)
                shm_runs.append(time.perf_counter() - t0)
            del sbuf
        finally:
            shm.close()
            shm.unlink()
    extras = {
        "heap_first_touch_s": first_touch_s,
        "shm_pretouched_s": min(shm_runs),
        "runs_s": runs,
    }
    return sample(ctx, rss, (min(runs), min(runs), extras))


def _flat_copy(state: dict[str, torch.Tensor], nbytes: int) -> torch.Tensor:
    import torch

    buf = torch.empty(nbytes, dtype=torch.uint8)
    copy_into(state, buf)
    return buf


def w_raw_write(ctx: Ctx) -> Sample:
    """The state's bytes (one flat buffer) written to one new file in 32 MiB calls by
    ``IO_THREADS`` streams (the ckptsvc writer's parallelism), then fsync'd. Object
    stores: one streaming upload. One write per worker, like every other save: on virtual
    disks a second write into just-freed blocks is much faster than the first."""
    view = memoryview(_flat_copy(ctx.state or {}, ctx.nbytes).numpy())  # type: ignore[arg-type]
    streams = max(1, knobs.IO_THREADS.get())
    with PeakRss() as rss:
        if ctx.cfg.remote:
            t0 = time.perf_counter()
            with ctx.fs.open(ctx.fs_path(ARTIFACTS["raw_write"]), "wb") as f:
                for off in range(0, len(view), IO_CHUNK_BYTES):
                    f.write(view[off : off + IO_CHUNK_BYTES])
            written_s = durable_s = time.perf_counter() - t0
        else:
            written_s, durable_s = write_file(
                ctx.path(ARTIFACTS["raw_write"]), view, streams=streams
            )
    extras = {} if ctx.cfg.remote else {"streams": streams, "fsync_s": durable_s - written_s}
    return sample(ctx, rss, (written_s, durable_s, extras))


def w_raw_write_direct(ctx: Ctx) -> Sample:
    """The raw write floor without the page cache: the state's bytes in one page-aligned
    buffer, written with ``O_DIRECT`` by ``IO_THREADS`` streams, then fsync'd. Local only;
    "unavailable" where the filesystem refuses ``O_DIRECT``."""
    import errno

    import torch

    if ctx.cfg.remote:
        raise Unavailable("O_DIRECT applies to local files only")
    view = aligned_buffer(ctx.nbytes)
    copy_into(ctx.state or {}, torch.frombuffer(view, dtype=torch.uint8))
    streams = max(1, knobs.IO_THREADS.get())
    with PeakRss() as rss:
        try:
            written_s, durable_s = write_file(
                ctx.path(ARTIFACTS["raw_write_direct"]), view, streams=streams, direct=True
            )
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            raise Unavailable(f"the filesystem refuses O_DIRECT: {e}") from e
    extras = {"streams": streams, "fsync_s": durable_s - written_s, "mode": "O_DIRECT"}
    return sample(ctx, rss, (written_s, durable_s, extras))


def w_raw_read(ctx: Ctx) -> Sample:
    """The raw file read into a fresh buffer by ``IO_THREADS`` streams (cold: the parent
    dropped it from the page cache). Object stores: one GET."""
    name = ARTIFACTS["raw_write"]
    streams = max(1, knobs.IO_THREADS.get())
    with PeakRss() as rss:
        t0 = time.perf_counter()
        if ctx.cfg.remote:
            got = len(ctx.fs.cat_file(ctx.fs_path(name)))
        else:
            _, got = read_file(ctx.path(name), streams=streams)
        read_s = time.perf_counter() - t0
    if got != ctx.nbytes:
        raise RuntimeError(f"raw read got {got} bytes, expected {ctx.nbytes}")
    return sample(ctx, rss, (read_s, read_s, {} if ctx.cfg.remote else {"streams": streams}))


# ---------------------------------------------------------------------------- peers
def w_torch_save(ctx: Ctx) -> Sample:
    import torch

    with PeakRss() as rss:
        t0 = time.perf_counter()
        if ctx.cfg.remote:
            with ctx.fs.open(ctx.fs_path(ARTIFACTS["torch_save"]), "wb") as f:
                torch.save(ctx.state, f)
            t1 = t2 = time.perf_counter()
        else:
            torch.save(ctx.state, ctx.path(ARTIFACTS["torch_save"]))
            t1 = time.perf_counter()
            fsync_tree(ctx.path(ARTIFACTS["torch_save"]))
            t2 = time.perf_counter()
    return sample(ctx, rss, (t1 - t0, t2 - t0, {}))


def w_safetensors_save(ctx: Ctx) -> Sample:
    save_file = require("safetensors.torch", "save_file")
    with PeakRss() as rss:
        t0 = time.perf_counter()
        if ctx.cfg.remote:
            to_bytes = require("safetensors.torch", "save")
            ctx.fs.pipe_file(ctx.fs_path(ARTIFACTS["safetensors_save"]), to_bytes(ctx.state))
            t1 = t2 = time.perf_counter()
        else:
            save_file(ctx.state, ctx.path(ARTIFACTS["safetensors_save"]))
            t1 = time.perf_counter()
            fsync_tree(ctx.path(ARTIFACTS["safetensors_save"]))
            t2 = time.perf_counter()
    return sample(ctx, rss, (t1 - t0, t2 - t0, {}))


def load_sample(ctx: Ctx, load: Callable[[], Any]) -> Sample:
    """Time ``load()`` (blocking) and then touching every page of what it returned."""
    with PeakRss() as rss:
        t0 = time.perf_counter()
        loaded = load()
        t1 = time.perf_counter()
        values = list(loaded.values()) if isinstance(loaded, dict) else []
        covered = touch_pages(values)
        t2 = time.perf_counter()
    if covered != ctx.nbytes:
        raise RuntimeError(
            f"{ctx.cfg.method} returned {covered} tensor bytes, expected {ctx.nbytes}"
        )
    return sample(ctx, rss, (t1 - t0, t2 - t0, {"ntensors": len(values)}))


def w_torch_load(ctx: Ctx) -> Sample:
    import torch

    name = ARTIFACTS["torch_save"]
    if ctx.cfg.remote:
        return load_sample(
            ctx,
            lambda: torch.load(io.BytesIO(ctx.fs.cat_file(ctx.fs_path(name))), weights_only=True),
        )
    return load_sample(ctx, lambda: torch.load(ctx.path(name), weights_only=True))


def w_safetensors_load(ctx: Ctx) -> Sample:
    name = ARTIFACTS["safetensors_save"]
    if ctx.cfg.remote:
        from_bytes = require("safetensors.torch", "load")
        return load_sample(ctx, lambda: from_bytes(ctx.fs.cat_file(ctx.fs_path(name))))
    load_file = require("safetensors.torch", "load_file")
    return load_sample(ctx, lambda: load_file(ctx.path(name)))


def perturb(state: dict[str, torch.Tensor]) -> None:
    """Change every value between the warm-up and the measured save (as a step would)."""
    for t in state.values():
        t.neg_()


# ---------------------------------------------------------------------------- ckptsvc
def w_ckptsvc_save(ctx: Ctx) -> Sample:
    path = ctx.path(ARTIFACTS["ckptsvc_save"])
    kwargs = ctx.storage_kwargs(save_checkpoint)
    with PeakRss() as rss:
        t0 = time.perf_counter()
        save_checkpoint(path, ctx.state or {}, safetensors=True, **kwargs)
        t1 = time.perf_counter()
        if not ctx.cfg.remote:
            fsync_tree(path)  # no-op cost if the library already made it durable
        t2 = time.perf_counter()
    return sample(ctx, rss, (t1 - t0, t2 - t0, {"extra_fsync_s": t2 - t1}))


def w_ckptsvc_load(ctx: Ctx) -> Sample:
    path = ctx.path(ARTIFACTS["ckptsvc_save"])
    kwargs = ctx.storage_kwargs(load_checkpoint)
    return load_sample(ctx, lambda: load_checkpoint(path, **kwargs))


def _mapped_shm(shm_dir: str) -> dict[str, int]:
    """Shared memory segments this process has mapped (its arenas), name -> bytes; other
    processes' segments in the same directory are not counted."""
    found: dict[str, int] = {}
    prefix = shm_dir.rstrip("/") + "/"
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.rstrip("\n").split(maxsplit=5)  # addr perms offset dev inode [path]
            path = fields[5] if len(fields) == 6 else ""
            if path.startswith(prefix) and not path.endswith(" (deleted)"):
                with contextlib.suppress(OSError):
                    found[path[len(prefix) :]] = os.stat(path).st_size
    return found


def _timings(handle: Any) -> dict[str, Any]:
    raw = getattr(handle, "timings", None)
    if raw is None:
        return {}
    if callable(raw):
        raw = raw()
    try:
        items = asdict(raw) if hasattr(raw, "__dataclass_fields__") else dict(raw)
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in items.items() if isinstance(v, (int, float, str, bool))}


def w_ckptsvc_async(ctx: Ctx) -> Sample:
    """``AsyncCheckpointer.save``: a warm-up save (allocates the arena, starts the writer),
    then the measured save with changed values. Blocking = until ``save`` returns;
    durable = until ``handle.wait()`` returns (committed). Extra RSS spans both saves,
    from the built state, i.e. it includes the arena."""
    return _async_saves(ctx, "ckptsvc_async", reserve=False)


def w_ckptsvc_async_reserved(ctx: Ctx) -> Sample:
    """As :func:`w_ckptsvc_async`, after ``reserve(state)``: its blocking part (the plan)
    is ``reserve_blocking_s``; then the arena is created on its background thread while
    nothing else runs (``warmup_s``, until that thread ended: the cost moved off the first
    save), and the first save is timed as usual."""
    return _async_saves(ctx, "ckptsvc_async_reserved", reserve=True)


def _async_saves(ctx: Ctx, name: str, *, reserve: bool) -> Sample:
    import threading

    checkpointer_cls = AsyncCheckpointer
    tensors = ctx.state or {}
    state: Any = {"model": tensors} if ctx.cfg.tensors else tensors  # --tensors: one component
    shm_dir = knobs.SHM_DIR.get()
    kwargs = ctx.storage_kwargs(checkpointer_cls)
    ckpt = checkpointer_cls(root=ctx.path(name), **kwargs)
    extras: dict[str, Any] = {}
    try:
        with PeakRss() as rss:
            if reserve:
                t0 = time.perf_counter()
                ckpt.reserve(state)
                t1 = time.perf_counter()
                for thread in threading.enumerate():
                    if thread.name == "ckptsvc-arena-warmup":
                        thread.join()
                extras["reserve_blocking_s"] = t1 - t0
                extras["warmup_s"] = time.perf_counter() - t1
            t0 = time.perf_counter()
            handle = ckpt.save(0, state)
            t1 = time.perf_counter()
            handle.wait()
            first = (t1 - t0, time.perf_counter() - t0)
            rss_after_first = proc_status_bytes("self", "VmRSS")
            perturb(tensors)
            t0 = time.perf_counter()
            handle = ckpt.save(1, state)
            t1 = time.perf_counter()
            handle.wait()
            t2 = time.perf_counter()
        arenas = _mapped_shm(shm_dir)
    finally:
        ckpt.close()
    leaked = [n for n in arenas if os.path.exists(os.path.join(shm_dir, n))]
    extras.update({
        "first_blocking_s": first[0],
        "first_durable_s": first[1],
        "rss_after_first_bytes": rss_after_first,
        "arena_nbytes": sum(arenas.values()),
        "arena_count": len(arenas),
        "shm_leaked_nbytes": sum(arenas[n] for n in leaked),
    })  # fmt: skip
    extras.update({f"handle_{k}": v for k, v in _timings(handle).items()})
    return sample(ctx, rss, (t1 - t0, t2 - t0, extras))


def _floor(fn: Callable[[Any], tuple[PeakRss, Timed]]) -> Callable[[Ctx], Sample]:
    """A read floor of :mod:`ckptsvc.tools.bench_reads` as a workload."""
    return lambda ctx: sample(ctx, *fn(ctx))


# ---------------------------------------------------------------------------- registry
#: method -> (workload, needs the state built)
WORKLOADS: dict[str, Workload] = {
    "memcpy": (w_memcpy, True),
    "raw_write": (w_raw_write, True),
    "raw_write_direct": (w_raw_write_direct, True),
    "raw_read": (w_raw_read, False),
    "torch_save": (w_torch_save, True),
    "torch_load": (w_torch_load, False),
    "safetensors_save": (w_safetensors_save, True),
    "safetensors_load": (w_safetensors_load, False),
    "ckptsvc_save": (w_ckptsvc_save, True),
    "ckptsvc_load": (w_ckptsvc_load, False),
    "ckptsvc_async": (w_ckptsvc_async, True),
    "ckptsvc_async_reserved": (w_ckptsvc_async_reserved, True),
    "s3fs_put": (_floor(bench_remote_save.s3fs_put), True),
    "raw_read_direct": (_floor(bench_reads.raw_read_direct), False),
    "raw_read_mapped": (_floor(bench_reads.raw_read_mapped), False),
    "raw_write_objects": (_floor(bench_reads.raw_write_objects), True),
    "raw_read_objects": (_floor(bench_reads.raw_read_objects), False),
}


def _measure(cfg: WorkerConfig, workloads: dict[str, Workload]) -> dict[str, Any]:
    import torch  # noqa: F401  (imported before any timing, for loads too)

    workload, needs_state = workloads[cfg.method]
    state = build_state(make_specs(cfg.total_nbytes, tensors=cfg.tensors)) if needs_state else None
    ctx = Ctx(cfg, state)
    try:
        return {"status": "ok", "sample": asdict(workload(ctx))}
    except Unavailable as e:
        return {"status": "unavailable", "reason": str(e)}


def run_worker_main(argv: list[str], *, workloads: dict[str, Workload] | None = None) -> None:
    """Worker entry: measure with ``workloads`` (default :data:`WORKLOADS`; the DCP ones
    are :data:`ckptsvc.tools.bench_dcp.DCP_WORKLOADS`), write the result JSON, leave
    without teardown."""
    cfg = WorkerConfig.from_json(argv[0])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # DCP's process daemon needs one
    try:
        result = _measure(cfg, WORKLOADS if workloads is None else workloads)
    except Exception as e:  # reported as the row's error; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    with open(cfg.result_path, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip teardown: DCP leaves threads and a daemon that stop on pipe EOF


if __name__ == "__main__":
    run_worker_main(sys.argv[1:])
