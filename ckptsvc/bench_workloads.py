"""The measurements behind ``ckptsvc bench``: synthetic state, one workload per method.

Each measurement runs in a fresh worker process (``python -m ckptsvc.bench_workloads
CONFIG_JSON``) started by :mod:`ckptsvc.bench`, so that its peak memory is its own:

1. the worker builds the synthetic state (:func:`make_specs`, :func:`build_state`);
2. :class:`PeakRss` resets the kernel's resident high-water mark (``VmHWM``) and reads the
   baseline RSS, so "extra RSS" excludes the state itself;
3. the workload runs and times itself: ``blocking_s`` until the call returns,
   ``durable_s`` until the bytes are on stable storage (fsync'd, upload completed) or, for
   loads, until every page of every loaded tensor has been touched;
4. the worker writes one JSON :class:`Sample` to the result file and exits with
   ``os._exit`` (background processes of DCP see their pipe close and stop by themselves).

Cold reads are the parent's job: it fsyncs the files and drops them from the page cache
(``POSIX_FADV_DONTNEED``, :func:`drop_page_cache`) before starting a load worker.
Torch is imported lazily so that the parent process stays light.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "WORKLOADS",
    "PeakRss",
    "Sample",
    "TensorSpec",
    "WorkerConfig",
    "build_state",
    "drop_page_cache",
    "fsync_tree",
    "make_specs",
    "run_worker_main",
]

KiB, MiB = 1 << 10, 1 << 20
IO_CHUNK_BYTES = 32 * MiB  # chunk of the raw write/read floors (same as the reference tool)
ARTIFACTS = {  # the file or directory a save leaves and the matching load reads
    "raw_write": "raw.bin",
    "torch_save": "ckpt.pt",
    "safetensors_save": "ckpt.safetensors",
    "dcp_save": "dcp",
    "ckptsvc_save": "ckptsvc",
}


# ---------------------------------------------------------------------------- the state
@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the synthetic state."""

    name: str
    dtype: str  # torch attribute name: "bfloat16" or "float32"
    shape: tuple[int, ...]
    nbytes: int


def make_specs(total_nbytes: int, *, seed: int = 0) -> list[TensorSpec]:
    """A realistic mix adding up to about ``total_nbytes``: 5 large tensors (62.5 % of the
    bytes), up to 140 tiny ones (4-64 KiB: norms, biases; at most 5 % of the bytes) and
    the rest 1-4 MiB (scaled down for small totals). Every third tensor is a bf16 model
    weight, the others fp32 optimizer state (``exp_avg``/``exp_avg_sq``)."""
    rng = random.Random(seed)
    sizes = [int(total_nbytes * f) // 4096 * 4096 for f in (0.25, 0.125, 0.125, 0.0625, 0.0625)]
    rest = total_nbytes - sum(sizes)
    tiny_budget = total_nbytes // 20
    for _ in range(140):
        nbytes = int(4096 * 2 ** rng.uniform(0, 4)) // 4096 * 4096
        if nbytes > tiny_budget:
            break
        sizes.append(nbytes)
        tiny_budget -= nbytes
        rest -= nbytes
    hi_pages = max(1, min(4 * MiB, total_nbytes // 128) // 4096)
    lo_pages = max(1, hi_pages // 4)
    while rest > hi_pages * 4096:
        nbytes = rng.randint(lo_pages, hi_pages) * 4096
        sizes.append(nbytes)
        rest -= nbytes
    if rest >= 4096:
        sizes.append(rest // 4096 * 4096)
    specs = []
    for i, nbytes in enumerate(s for s in sizes if s > 0):
        if i % 3 == 0:
            name, dtype, elem = f"model.layers.{i}.weight", "bfloat16", 2
        else:
            suffix = "_sq" if i % 3 == 2 else ""
            name, dtype, elem = f"optim.state.{i}.exp_avg{suffix}", "float32", 4
        numel = nbytes // elem
        shape = (numel // 256, 256) if numel % 256 == 0 and numel >= 256 else (numel,)
        specs.append(TensorSpec(name, dtype, shape, nbytes))
    return specs


def build_state(specs: Iterable[TensorSpec], *, fill: bool = True) -> dict[str, torch.Tensor]:
    """The state dict for ``specs``: random values, or zeros (pages touched either way, so
    the baseline RSS already holds the whole state)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    state = {}
    for s in specs:
        t = torch.empty(s.shape, dtype=getattr(torch, s.dtype))
        if fill:
            t.uniform_(-1, 1, generator=gen)
        else:
            t.view(torch.uint8).zero_()
        state[s.name] = t
    return state


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.reshape(-1).view(torch.uint8)


def _copy_into(state: dict[str, torch.Tensor], buf: torch.Tensor) -> None:
    offset = 0
    for t in state.values():
        n = t.numel() * t.element_size()
        buf[offset : offset + n].copy_(_as_bytes(t))
        offset += n


def _touch_pages(values: Iterable[Any]) -> int:
    """Read one byte per 4 KiB page of every tensor (faults lazily mapped data in);
    returns the bytes covered."""
    import torch

    covered = 0
    for t in values:
        if isinstance(t, torch.Tensor) and t.numel():
            u = _as_bytes(t.contiguous())
            int(u[::4096].sum())
            covered += u.numel()
    return covered


# ---------------------------------------------------------------------------- measuring
def _proc_status_bytes(pid: int | str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> Iterator[int]:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        for kid in kids:
            yield kid
            yield from _descendants(kid)


class PeakRss:
    """Peak resident memory of this process over a ``with`` block, via the kernel
    high-water mark: ``VmHWM`` is reset (``/proc/self/clear_refs`` = 5) on entry and read
    on exit, so sampling costs nothing during the block. Live child processes (a DCP
    daemon, the ckptsvc writer) are reported separately with their lifetime peak.

    1. ``__enter__`` (measuring thread): reset, read ``base_bytes``;
    2. ``__exit__`` (same thread, before children are shut down): read the peaks.
    """

    def __init__(self) -> None:
        self.base_bytes = 0
        self.peak_bytes = 0
        self.child_peak_bytes = 0
        self.reset_ok = False

    def __enter__(self) -> PeakRss:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = True
        except OSError:  # no permission: VmHWM then is the lifetime peak
            self.reset_ok = False
        self.base_bytes = _proc_status_bytes("self", "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_bytes = max(_proc_status_bytes("self", "VmHWM"), self.base_bytes)
        self.child_peak_bytes = sum(
            _proc_status_bytes(pid, "VmHWM") for pid in set(_descendants(os.getpid()))
        )


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]


def fsync_tree(path: str) -> None:
    """fsync every file below ``path`` (or the file itself) and its directory."""
    for p in _files_under(path):
        _fsync_path(p)
    _fsync_path(path if os.path.isdir(path) else os.path.dirname(path) or ".")


def drop_page_cache(path: str) -> None:
    """Make the next read of ``path`` cold: fsync, then ``POSIX_FADV_DONTNEED``."""
    for p in _files_under(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- config/result
@dataclass(frozen=True)
class WorkerConfig:
    """What one worker measures. ``root`` is a local directory or a storage URL; ``local_dir``
    is always a local scratch directory (result file, logs)."""

    method: str
    total_nbytes: int
    root: str
    local_dir: str
    result_path: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    remote: bool = False
    dcp_threads: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Sample:
    """One measurement. Times in seconds; ``nbytes`` is the state's tensor bytes."""

    method: str
    nbytes: int
    blocking_s: float
    durable_s: float
    rss_base_bytes: int
    rss_peak_bytes: int
    child_rss_peak_bytes: int
    extras: dict[str, Any] = field(default_factory=dict)


class _Unavailable(Exception):
    """Internal: the method's library is missing or too old; the row says why."""


def _require(module: str, attr: str) -> Any:
    try:
        mod = __import__(module, fromlist=[attr])
        return getattr(mod, attr)
    except (ImportError, AttributeError) as e:
        raise _Unavailable(f"{module}.{attr}: {type(e).__name__}: {e}") from e


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class _Ctx:
    """What a workload gets: the config, the state (None for loads) and path helpers."""

    def __init__(self, cfg: WorkerConfig, state: dict[str, torch.Tensor] | None) -> None:
        self.cfg = cfg
        self.state = state
        self.nbytes = sum(s.nbytes for s in make_specs(cfg.total_nbytes))
        self._fs: Any = None

    def path(self, name: str) -> str:
        return (
            f"{self.cfg.root.rstrip('/')}/{name}"
            if self.cfg.remote
            else os.path.join(self.cfg.root, name)
        )

    @property
    def fs(self) -> Any:
        if self._fs is None:
            from ckptsvc.storage import url_to_fs

            self._fs, _ = url_to_fs(self.cfg.root, **self.cfg.storage_options)
        return self._fs

    def fs_path(self, name: str) -> str:
        from ckptsvc.storage import url_to_fs

        return str(url_to_fs(self.path(name), **self.cfg.storage_options)[1])

    def storage_kwargs(self, fn: Callable[..., Any]) -> dict[str, Any]:
        if self.cfg.storage_options and _accepts(fn, "storage_options"):
            return {"storage_options": self.cfg.storage_options}
        return {}


Timed = tuple[float, float, dict[str, Any]]  # blocking_s, durable_s, extras


def _sample(ctx: _Ctx, rss: PeakRss, timed: Timed) -> Sample:
    blocking_s, durable_s, extras = timed
    extras = {**extras, "rss_reset": rss.reset_ok}
    return Sample(
        ctx.cfg.method, ctx.nbytes, blocking_s, durable_s,
        rss.base_bytes, rss.peak_bytes, rss.child_peak_bytes, extras,
    )  # fmt: skip


# ---------------------------------------------------------------------------- floors
def w_memcpy(ctx: _Ctx) -> Sample:
    """Copy the state into one pre-touched buffer: best of 3 (the floor), plus first-touch
    heap and pre-touched shared memory as extras."""
    import torch
    from multiprocessing import shared_memory

    state = ctx.state or {}
    with PeakRss() as rss:
        buf = torch.empty(ctx.nbytes, dtype=torch.uint8)
        t0 = time.perf_counter()
        _copy_into(state, buf)
        first_touch_s = time.perf_counter() - t0
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            _copy_into(state, buf)
            runs.append(time.perf_counter() - t0)
        del buf
        shm = shared_memory.SharedMemory(create=True, size=ctx.nbytes)
        try:
            sbuf = torch.frombuffer(shm.buf, dtype=torch.uint8)
            _copy_into(state, sbuf)
            t0 = time.perf_counter()
            _copy_into(state, sbuf)
            shm_s = time.perf_counter() - t0
            del sbuf
        finally:
            shm.close()
            shm.unlink()
    extras = {"heap_first_touch_s": first_touch_s, "shm_pretouched_s": shm_s, "runs_s": runs}
    return _sample(ctx, rss, (min(runs), min(runs), extras))


def _flat_copy(state: dict[str, torch.Tensor], nbytes: int) -> torch.Tensor:
    import torch

    buf = torch.empty(nbytes, dtype=torch.uint8)
    _copy_into(state, buf)
    return buf


def w_raw_write(ctx: _Ctx) -> Sample:
    """Sequential write of the state's bytes (one flat buffer, 32 MiB writes), then fsync;
    on an object store one streaming upload of the same bytes."""
    view = memoryview(_flat_copy(ctx.state or {}, ctx.nbytes).numpy())
    with PeakRss() as rss:
        t0 = time.perf_counter()
        if ctx.cfg.remote:
            with ctx.fs.open(ctx.fs_path(ARTIFACTS["raw_write"]), "wb") as f:
                for off in range(0, len(view), IO_CHUNK_BYTES):
                    f.write(view[off : off + IO_CHUNK_BYTES])
            t1 = t2 = time.perf_counter()
        else:
            fd = os.open(
                ctx.path(ARTIFACTS["raw_write"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644
            )
            try:
                off = 0
                while off < len(view):
                    off += os.write(fd, view[off : off + IO_CHUNK_BYTES])
                t1 = time.perf_counter()
                os.fsync(fd)
            finally:
                os.close(fd)
            t2 = time.perf_counter()
    return _sample(ctx, rss, (t1 - t0, t2 - t0, {"fsync_s": t2 - t1}))


def w_raw_read(ctx: _Ctx) -> Sample:
    """Sequential read of the raw file into a fresh buffer (cold: the parent dropped it
    from the page cache); on an object store one GET."""
    import torch

    name = ARTIFACTS["raw_write"]
    with PeakRss() as rss:
        t0 = time.perf_counter()
        if ctx.cfg.remote:
            data = ctx.fs.cat_file(ctx.fs_path(name))
            got = len(data)
        else:
            size = os.path.getsize(ctx.path(name))
            buf = torch.empty(size, dtype=torch.uint8)
            view = memoryview(buf.numpy())
            fd = os.open(ctx.path(name), os.O_RDONLY)
            try:
                got = 0
                while got < size:
                    n = os.readv(fd, [view[got : got + IO_CHUNK_BYTES]])
                    if n == 0:
                        break
                    got += n
            finally:
                os.close(fd)
        t1 = time.perf_counter()
    if got != ctx.nbytes:
        raise RuntimeError(f"raw read got {got} bytes, expected {ctx.nbytes}")
    return _sample(ctx, rss, (t1 - t0, t1 - t0, {}))


# ---------------------------------------------------------------------------- peers
def w_torch_save(ctx: _Ctx) -> Sample:
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
    return _sample(ctx, rss, (t1 - t0, t2 - t0, {}))


def w_safetensors_save(ctx: _Ctx) -> Sample:
    save_file = _require("safetensors.torch", "save_file")
    with PeakRss() as rss:
        t0 = time.perf_counter()
        if ctx.cfg.remote:
            to_bytes = _require("safetensors.torch", "save")
            ctx.fs.pipe_file(ctx.fs_path(ARTIFACTS["safetensors_save"]), to_bytes(ctx.state))
            t1 = t2 = time.perf_counter()
        else:
            save_file(ctx.state, ctx.path(ARTIFACTS["safetensors_save"]))
            t1 = time.perf_counter()
            fsync_tree(ctx.path(ARTIFACTS["safetensors_save"]))
            t2 = time.perf_counter()
    return _sample(ctx, rss, (t1 - t0, t2 - t0, {}))


def _load_sample(ctx: _Ctx, load: Callable[[], Any]) -> Sample:
    """Time ``load()`` (blocking) and then touching every page of what it returned."""
    with PeakRss() as rss:
        t0 = time.perf_counter()
        loaded = load()
        t1 = time.perf_counter()
        values = list(loaded.values()) if isinstance(loaded, dict) else []
        covered = _touch_pages(values)
        t2 = time.perf_counter()
    if covered != ctx.nbytes:
        raise RuntimeError(
            f"{ctx.cfg.method} returned {covered} tensor bytes, expected {ctx.nbytes}"
        )
    return _sample(ctx, rss, (t1 - t0, t2 - t0, {"ntensors": len(values)}))


def w_torch_load(ctx: _Ctx) -> Sample:
    import torch

    name = ARTIFACTS["torch_save"]
    if ctx.cfg.remote:
        return _load_sample(
            ctx,
            lambda: torch.load(io.BytesIO(ctx.fs.cat_file(ctx.fs_path(name))), weights_only=True),
        )
    return _load_sample(ctx, lambda: torch.load(ctx.path(name), weights_only=True))


def w_safetensors_load(ctx: _Ctx) -> Sample:
    name = ARTIFACTS["safetensors_save"]
    if ctx.cfg.remote:
        from_bytes = _require("safetensors.torch", "load")
        return _load_sample(ctx, lambda: from_bytes(ctx.fs.cat_file(ctx.fs_path(name))))
    load_file = _require("safetensors.torch", "load_file")
    return _load_sample(ctx, lambda: load_file(ctx.path(name)))


def _dcp_init() -> Any:
    dcp = _require("torch.distributed", "checkpoint")
    import torch.distributed as dist

    if not dist.is_available():
        raise _Unavailable("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dcp


def _dcp_writer(ctx: _Ctx, name: str) -> Any:
    dcp = _dcp_init()
    if ctx.cfg.remote:
        writer = _require("torch.distributed.checkpoint._fsspec_filesystem", "FsspecWriter")
        return writer(ctx.path(name), thread_count=ctx.cfg.dcp_threads, **ctx.cfg.storage_options)
    return dcp.FileSystemWriter(ctx.path(name), thread_count=ctx.cfg.dcp_threads)


def w_dcp_save(ctx: _Ctx) -> Sample:
    dcp = _dcp_init()
    writer = _dcp_writer(ctx, ARTIFACTS["dcp_save"])
    with PeakRss() as rss:
        t0 = time.perf_counter()
        dcp.save(ctx.state, storage_writer=writer)  # FileSystemWriter fsyncs (sync_files=True)
        t1 = time.perf_counter()
    return _sample(ctx, rss, (t1 - t0, t1 - t0, {}))


def w_dcp_load(ctx: _Ctx) -> Sample:
    dcp = _dcp_init()
    target = build_state(make_specs(ctx.cfg.total_nbytes), fill=False)  # in-place load target
    if ctx.cfg.remote:
        reader = _require("torch.distributed.checkpoint._fsspec_filesystem", "FsspecReader")(
            ctx.path(ARTIFACTS["dcp_save"]), **ctx.cfg.storage_options
        )
    else:
        reader = dcp.FileSystemReader(ctx.path(ARTIFACTS["dcp_save"]))

    def load() -> dict[str, Any]:
        dcp.load(target, storage_reader=reader)
        return target

    return _load_sample(ctx, load)


def _perturb(state: dict[str, torch.Tensor]) -> None:
    """Change every value between the warm-up and the measured save (as a step would)."""
    for t in state.values():
        t.neg_()


def w_dcp_async(ctx: _Ctx) -> Sample:
    """``dcp.async_save``, process-based where this torch has it: a warm-up save (pays the
    daemon start), then the measured save with changed values. Blocking = until
    ``async_save`` returns; durable = until its future completes."""
    dcp = _dcp_init()
    state = ctx.state or {}
    kinds = _require("torch.distributed.checkpoint.state_dict_saver", "AsyncCheckpointerType")
    kind = getattr(kinds, "PROCESS", None) or kinds.THREAD

    def one(name: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        fut = dcp.async_save(
            state, storage_writer=_dcp_writer(ctx, name), async_checkpointer_type=kind
        )
        t1 = time.perf_counter()
        (getattr(fut, "upload_completion", None) or fut).result()
        return t1 - t0, time.perf_counter() - t0

    with PeakRss() as rss:
        first = one("dcp_async_warmup")
        _perturb(state)
        blocking_s, durable_s = one("dcp_async")
    extras = {"mode": kind.value, "first_blocking_s": first[0], "first_durable_s": first[1]}
    return _sample(ctx, rss, (blocking_s, durable_s, extras))


# ---------------------------------------------------------------------------- ckptsvc
def w_ckptsvc_save(ctx: _Ctx) -> Sample:
    save_checkpoint = _require("ckptsvc.sharded_checkpoint", "save_checkpoint")
    path = ctx.path(ARTIFACTS["ckptsvc_save"])
    kwargs = ctx.storage_kwargs(save_checkpoint)
    with PeakRss() as rss:
        t0 = time.perf_counter()
        save_checkpoint(path, ctx.state, safetensors=True, **kwargs)
        t1 = time.perf_counter()
        if not ctx.cfg.remote:
            fsync_tree(path)  # no-op cost if the library already made it durable
        t2 = time.perf_counter()
    return _sample(ctx, rss, (t1 - t0, t2 - t0, {"extra_fsync_s": t2 - t1}))


def w_ckptsvc_load(ctx: _Ctx) -> Sample:
    load_checkpoint = _require("ckptsvc.sharded_checkpoint", "load_checkpoint")
    path = ctx.path(ARTIFACTS["ckptsvc_save"])
    kwargs = ctx.storage_kwargs(load_checkpoint)
    return _load_sample(ctx, lambda: load_checkpoint(path, **kwargs))


def _shm_sizes(shm_dir: str) -> dict[str, int]:
    try:
        with os.scandir(shm_dir) as it:
            return {e.name: e.stat().st_size for e in it if e.is_file()}
    except OSError:
        return {}


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


def w_ckptsvc_async(ctx: _Ctx) -> Sample:
    """``AsyncCheckpointer.save``: a warm-up save (allocates the arena, starts the writer),
    then the measured save with changed values. Blocking = until ``save`` returns;
    durable = until ``handle.wait()`` returns (committed). Extra RSS spans both saves,
    from the built state, i.e. it includes the arena."""
    checkpointer_cls = _require("ckptsvc.async_checkpointer", "AsyncCheckpointer")
    from ckptsvc import knobs

    state = ctx.state or {}
    shm_dir = knobs.SHM_DIR.get()
    shm_before = _shm_sizes(shm_dir)
    kwargs = ctx.storage_kwargs(checkpointer_cls)
    ckpt = checkpointer_cls(root=ctx.path("ckptsvc_async"), **kwargs)
    try:
        with PeakRss() as rss:
            t0 = time.perf_counter()
            handle = ckpt.save(0, state)
            t1 = time.perf_counter()
            handle.wait()
            first = (t1 - t0, time.perf_counter() - t0)
            rss_after_first = _proc_status_bytes("self", "VmRSS")
            _perturb(state)
            t0 = time.perf_counter()
            handle = ckpt.save(1, state)
            t1 = time.perf_counter()
            handle.wait()
            t2 = time.perf_counter()
        arenas = {k: v for k, v in _shm_sizes(shm_dir).items() if shm_before.get(k) != v}
    finally:
        ckpt.close()
    leaked = {k: v for k, v in _shm_sizes(shm_dir).items() if shm_before.get(k) != v}
    extras: dict[str, Any] = {
        "first_blocking_s": first[0],
        "first_durable_s": first[1],
        "rss_after_first_bytes": rss_after_first,
        "arena_nbytes": sum(arenas.values()),
        "arena_count": len(arenas),
        "shm_leaked_nbytes": sum(leaked.values()),
    }
    extras.update({f"handle_{k}": v for k, v in _timings(handle).items()})
    return _sample(ctx, rss, (t1 - t0, t2 - t0, extras))


# ---------------------------------------------------------------------------- registry
#: method -> (workload, needs the state built)
WORKLOADS: dict[str, tuple[Callable[[_Ctx], Sample], bool]] = {
    "memcpy": (w_memcpy, True),
    "raw_write": (w_raw_write, True),
    "raw_read": (w_raw_read, False),
    "torch_save": (w_torch_save, True),
    "torch_load": (w_torch_load, False),
    "safetensors_save": (w_safetensors_save, True),
    "safetensors_load": (w_safetensors_load, False),
    "dcp_save": (w_dcp_save, True),
    "dcp_load": (w_dcp_load, False),
    "dcp_async": (w_dcp_async, True),
    "ckptsvc_save": (w_ckptsvc_save, True),
    "ckptsvc_load": (w_ckptsvc_load, False),
    "ckptsvc_async": (w_ckptsvc_async, True),
}


def _measure(cfg: WorkerConfig) -> dict[str, Any]:
    workload, needs_state = WORKLOADS[cfg.method]
    state = build_state(make_specs(cfg.total_nbytes)) if needs_state else None
    ctx = _Ctx(cfg, state)
    try:
        return {"status": "ok", "sample": asdict(workload(ctx))}
    except _Unavailable as e:
        return {"status": "unavailable", "reason": str(e)}


def run_worker_main(argv: list[str]) -> None:
    """Worker entry: measure, write the result JSON, leave without teardown."""
    cfg = WorkerConfig.from_json(argv[0])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # DCP's process daemon needs one
    try:
        result = _measure(cfg)
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
