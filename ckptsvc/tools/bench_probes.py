"""Measuring tools of ``ckptsvc bench``: the synthetic state, peak RSS, cold page cache,
the raw-floor file I/O, and the worker's config and result records.

Shared by the parent (:mod:`ckptsvc.tools.bench`) and the worker processes
(:mod:`ckptsvc.tools.bench_workloads`). Torch is imported lazily so the parent stays light.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

__all__ = [
    "IO_CHUNK_BYTES",
    "PeakRss",
    "Sample",
    "TensorSpec",
    "Unavailable",
    "WorkerConfig",
    "aligned_buffer",
    "build_state",
    "cached_bytes",
    "copy_into",
    "drop_page_cache",
    "fsync_tree",
    "make_specs",
    "proc_status_bytes",
    "read_file",
    "recycle_memory",
    "stream_read",
    "touch_pages",
    "write_all_at",
    "write_file",
]

T = TypeVar("T")
MiB = 1 << 20
IO_CHUNK_BYTES = 32 * MiB  # one write/read call of the raw floors (as the reference tool)


class Unavailable(Exception):
    """A method or floor does not apply or cannot run here; its row says why (not a failure)."""


# ---------------------------------------------------------------------------- the state
@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the synthetic state."""

    name: str
    dtype: str  # torch attribute name: "bfloat16" or "float32"
    shape: tuple[int, ...]
    nbytes: int


def make_specs(total_nbytes: int, *, seed: int = 0, tensors: int = 0) -> list[TensorSpec]:
    """A realistic mix adding up to about ``total_nbytes``: 5 large tensors (62.5 % of the
    bytes), up to 140 tiny ones (4-64 KiB: norms, biases; at most 5 % of the bytes) and
    the rest 1-4 MiB (scaled down for small totals). Every third tensor is a bf16 model
    weight, the others fp32 optimizer state (``exp_avg``/``exp_avg_sq``).

    With ``tensors`` (``bench --tensors N``): N tensors of 16 floats instead, the
    per-tensor costs' workload (``total_nbytes`` is ignored)."""
    if tensors > 0:
        return [TensorSpec(f"layers.{i}.weight", "float32", (16,), 64) for i in range(tensors)]
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


def copy_into(state: dict[str, torch.Tensor], buf: torch.Tensor) -> None:
    offset = 0
    for t in state.values():
        n = t.numel() * t.element_size()
        buf[offset : offset + n].copy_(_as_bytes(t))
        offset += n


def touch_pages(values: Iterable[Any]) -> int:
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
def proc_status_bytes(pid: int | str, key: str) -> int:
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
        self.base_bytes = proc_status_bytes("self", "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_bytes = max(proc_status_bytes("self", "VmHWM"), self.base_bytes)
        self.child_peak_bytes = sum(
            proc_status_bytes(pid, "VmHWM") for pid in set(_descendants(os.getpid()))
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


def stream_read(path: str, *, streams: int) -> int:
    """Read every byte of ``path`` (a file, or every file below a directory) with
    ``streams`` threads of ``IO_CHUNK_BYTES`` reads into one reused buffer per thread,
    keeping nothing; returns the bytes read (the bench's settling read)."""
    jobs = [
        (p, lo, hi) for p in _files_under(path) for lo, hi in _parts(os.path.getsize(p), streams)
    ]
    if not jobs:
        return 0

    def read(job: tuple[str, int, int]) -> int:
        p, lo, hi = job
        buf = bytearray(min(IO_CHUNK_BYTES, hi - lo))
        fd = os.open(p, os.O_RDONLY)
        try:
            done = 0
            while lo + done < hi:
                n = os.preadv(fd, [memoryview(buf)[: hi - lo - done]], lo + done)
                if n == 0:
                    break
                done += n
            return done
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max(1, streams)) as pool:
        return sum(pool.map(read, jobs))


def recycle_memory(path: str, *, nbytes: int) -> None:
    """Read a file of ``nbytes`` at ``path`` (written on first use) through the page cache
    and drop it: the bench does this before every cold read, so that each starts with as
    much memory just freed.

    On a virtual machine that returns free memory to its host (free page reporting, the
    development VM), a page free for a while costs a host fault when it is used again: a
    load that came right after a read of its own file dropped from the cache ran 1.3-1.4x
    faster than one that came after an ``O_DIRECT`` save, which leaves nothing to drop
    (docs/benchmarks.md, *Produce the table*). The read is not timed."""
    if not os.path.exists(path):
        chunk = os.urandom(IO_CHUNK_BYTES)
        with open(path, "wb") as f:
            for lo in range(0, nbytes, len(chunk)):
                f.write(chunk[: nbytes - lo])
            f.flush()
            os.fsync(f.fileno())
    drop_page_cache(path)
    stream_read(path, streams=4)
    drop_page_cache(path)


def cached_bytes(path: str) -> int | None:
    """Bytes of ``path`` in the page cache (``fincore``), or None without the tool."""
    tool = shutil.which("fincore")
    if tool is None:
        return None
    files = (
        [path]
        if os.path.isfile(path)
        else [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    )
    total = 0
    for f in files:
        out = subprocess.run(
            [tool, "-b", "-n", "-o", "RES", f], capture_output=True, text=True, check=False
        )
        words = out.stdout.split()
        if out.returncode != 0 or not words:
            return None
        total += int(words[0])
    return total


def _parts(nbytes: int, streams: int) -> list[tuple[int, int]]:
    """At most ``streams`` contiguous, chunk-aligned byte ranges covering ``[0, nbytes)``."""
    step = max(1, -(-nbytes // streams // IO_CHUNK_BYTES) * IO_CHUNK_BYTES)
    return [(lo, min(lo + step, nbytes)) for lo in range(0, nbytes, step)]


def _in_threads(fn: Callable[[int, int], T], ranges: list[tuple[int, int]]) -> list[T]:
    """``fn(lo, hi)`` for every range, one thread each; results in range order."""
    if len(ranges) <= 1:
        return [fn(lo, hi) for lo, hi in ranges]
    with ThreadPoolExecutor(len(ranges)) as pool:
        return [f.result() for f in [pool.submit(fn, lo, hi) for lo, hi in ranges]]


def aligned_buffer(nbytes: int) -> memoryview:
    """A page-aligned, pre-touched anonymous buffer of ``nbytes`` (what ``O_DIRECT`` needs)."""
    buf = mmap.mmap(-1, max(nbytes, 1))
    view = memoryview(buf)[:nbytes]
    for off in range(0, nbytes, mmap.PAGESIZE):
        view[off] = 0
    return view


def write_file(
    path: str, view: memoryview, *, streams: int, direct: bool = False
) -> tuple[float, float]:
    """Write ``view`` to a new file with ``streams`` threads of pwrite, then fsync.
    Returns (seconds until written, seconds until durable).

    ``direct``: open with ``O_DIRECT`` (``view`` must be page-aligned, e.g. from
    :func:`aligned_buffer`); a tail that is not a whole 4 KiB block goes through a second,
    buffered descriptor. OSError (EINVAL) where the filesystem refuses ``O_DIRECT``."""
    block = 4096
    t0 = time.perf_counter()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        body = len(view) // block * block if direct else len(view)

        def write(lo: int, hi: int) -> None:
            while lo < hi:
                lo += os.pwrite(fd, view[lo : min(lo + IO_CHUNK_BYTES, hi)], lo)

        _in_threads(write, _parts(body, streams))
        if body < len(view):
            tail = os.open(path, os.O_WRONLY)
            try:
                write_all_at(tail, view[body:], body)
            finally:
                os.close(tail)
        t1 = time.perf_counter()
        os.fsync(fd)
    finally:
        os.close(fd)
    return t1 - t0, time.perf_counter() - t0


def write_all_at(fd: int, view: memoryview, offset: int) -> None:
    """``pwrite`` all of ``view`` at ``offset``."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def read_file(path: str, *, streams: int, direct: bool = False) -> tuple[float, int]:
    """Read the file into a fresh buffer with ``streams`` threads of pread: (seconds, bytes).

    ``direct``: with ``O_DIRECT`` into fresh page-aligned memory (an untouched anonymous
    mapping: the read pays the page faults, as into a fresh tensor); the tail that is not
    a whole 4 KiB block is read buffered. OSError (EINVAL) where the filesystem refuses it.
    """
    import torch

    t0 = time.perf_counter()
    size = os.path.getsize(path)
    if direct:
        view = memoryview(mmap.mmap(-1, max(size, 1)))[:size]
    else:
        buf = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buf.numpy())  # type: ignore[arg-type]
    body = size // 4096 * 4096 if direct else size
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:

        def read(lo: int, hi: int) -> int:
            start = lo
            while lo < hi:
                n = os.preadv(fd, [view[lo : min(lo + IO_CHUNK_BYTES, hi)]], lo)
                if n == 0:
                    break
                lo += n
            return lo - start

        got = sum(_in_threads(read, _parts(body, streams)))
    finally:
        os.close(fd)
    if body < size:
        with open(path, "rb") as f:
            f.seek(body)
            got += f.readinto(view[body:]) or 0
    return time.perf_counter() - t0, got


# ---------------------------------------------------------------------------- worker I/O
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
    tensors: int = 0  # N tensors of 16 floats instead of the size mix (make_specs)

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
