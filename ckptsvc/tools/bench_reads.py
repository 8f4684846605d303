"""The read floors of ``ckptsvc bench`` besides the buffered ``raw_read``: what a load is
measured against (issue 15).

- ``raw_read_direct`` (local): the raw file read with ``O_DIRECT`` into one fresh
  page-aligned buffer by ``IO_THREADS`` streams. The loader may read with ``O_DIRECT``
  (``CKPTSVC_DIRECT_IO_READS``), so the floor a load is held to is the better of the
  buffered and the direct read of the same bytes, both cold (the parent drops the file
  from the page cache before each; ``O_DIRECT`` bypasses it anyway).
- ``raw_read_mapped`` (local): the raw file mapped privately and faulted in by
  ``IO_THREADS`` threads touching one byte per page (fault-around and readahead bring
  the rest): the loader maps local shards (``CKPTSVC_MAPPED_READS``), so this is the floor
  of that way of reading, and a load is held to the best of the three local floors.
- ``raw_write_objects`` / ``raw_read_objects`` (object stores): the same bytes as
  ``OBJECTS`` objects, put and got in parallel through the filesystem's own bulk calls
  (``fs.pipe`` / ``fs.cat`` of several paths: s3fs runs them concurrently on its loop).
  With ``raw_read`` (one GET of one object) this gives "the best s3fs figure for the same
  bytes" a remote load is compared with.

Each function returns ``(PeakRss, (blocking_s, durable_s, extras))`` for the worker's
sample; :mod:`ckptsvc.tools.bench_workloads` registers them.
"""

from __future__ import annotations

import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptsvc import knobs
from ckptsvc.tools.bench_probes import IO_CHUNK_BYTES, PeakRss, Unavailable, read_file

__all__ = [
    "OBJECTS",
    "READ_ARTIFACTS",
    "raw_read_direct",
    "raw_read_mapped",
    "raw_read_objects",
    "raw_write_objects",
    "state_bytes",
]

#: objects the multi-object floors split the bytes into
OBJECTS = 4
OBJECTS_ARTIFACT = "raw_objects"
READ_ARTIFACTS = {"raw_write_objects": OBJECTS_ARTIFACT}
RAW_FILE = "raw.bin"  # ARTIFACTS["raw_write"] of bench_workloads
_MAPPED_CHUNK_BYTES = 64 * 2**20

Timed = tuple[float, float, dict[str, Any]]


def raw_read_direct(ctx: Any) -> tuple[PeakRss, Timed]:
    """Read the raw file with ``O_DIRECT`` into fresh page-aligned memory, ``IO_THREADS``
    streams (:func:`~ckptsvc.tools.bench_probes.read_file`). Local only."""
    if ctx.cfg.remote:
        raise Unavailable("O_DIRECT applies to local files only")
    streams = max(1, knobs.IO_THREADS.get())
    with PeakRss() as rss:
        try:
            read_s, got = read_file(ctx.path(RAW_FILE), streams=streams, direct=True)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            raise Unavailable(f"the filesystem refuses O_DIRECT: {e}") from e
    if got != ctx.nbytes:
        raise RuntimeError(f"raw direct read got {got} bytes, expected {ctx.nbytes}")
    return rss, (read_s, read_s, {"streams": streams, "mode": "O_DIRECT"})


def raw_read_mapped(ctx: Any) -> tuple[PeakRss, Timed]:
    """Map the raw file privately and fault it in: ``IO_THREADS`` threads each touch one
    byte per 4 KiB page of 64 MiB chunks (torch reductions release the GIL). Local only."""
    if ctx.cfg.remote:
        raise Unavailable("a file mapping applies to local files only")
    import torch

    from ckptsvc.storage.mapped import map_private

    streams = max(1, knobs.IO_THREADS.get())
    path = ctx.path(RAW_FILE)
    with PeakRss() as rss:
        t0 = time.perf_counter()
        nbytes = os.path.getsize(path)
        flat = torch.frombuffer(map_private(path, nbytes=nbytes, url=path), dtype=torch.uint8)
        chunks = range(0, nbytes, _MAPPED_CHUNK_BYTES)
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(lambda lo: int(flat[lo : lo + _MAPPED_CHUNK_BYTES : 4096].sum()), chunks))
        read_s = time.perf_counter() - t0
    if flat.numel() != ctx.nbytes:
        raise RuntimeError(f"mapped read got {flat.numel()} bytes, expected {ctx.nbytes}")
    return rss, (read_s, read_s, {"streams": streams, "mode": "mapped"})


def _object_paths(fs_path: str) -> list[str]:
    return [f"{fs_path}/part-{i:02d}" for i in range(OBJECTS)]


def _cuts(nbytes: int) -> list[tuple[int, int]]:
    """At most ``OBJECTS`` byte ranges covering ``[0, nbytes)``."""
    step = max(1, -(-nbytes // OBJECTS))
    return [(lo, min(nbytes, lo + step)) for lo in range(0, nbytes, step)]


def state_bytes(ctx: Any) -> bytes:
    """The state's bytes, flat (built before any timing starts)."""
    import torch

    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in (ctx.state or {}).values()])
    return flat.numpy().tobytes()


def raw_write_objects(ctx: Any) -> tuple[PeakRss, Timed]:
    """The state's bytes as ``OBJECTS`` objects, put concurrently (``fs.pipe`` of a dict)."""
    if not ctx.cfg.remote:
        raise Unavailable("a multi-object put applies to object stores only")
    fs, fs_path = ctx.fs, ctx.fs_path(OBJECTS_ARTIFACT)
    data = state_bytes(ctx)
    paths = _object_paths(fs_path)
    parts = {paths[i]: data[lo:hi] for i, (lo, hi) in enumerate(_cuts(len(data)))}
    with PeakRss() as rss:
        t0 = time.perf_counter()
        fs.pipe(parts)
        put_s = time.perf_counter() - t0
    return rss, (put_s, put_s, {"objects": len(parts), "chunk": IO_CHUNK_BYTES})


def raw_read_objects(ctx: Any) -> tuple[PeakRss, Timed]:
    """The ``OBJECTS`` objects of :func:`raw_write_objects`, got concurrently (``fs.cat``)."""
    if not ctx.cfg.remote:
        raise Unavailable("a multi-object get applies to object stores only")
    fs, fs_path, nbytes = ctx.fs, ctx.fs_path(OBJECTS_ARTIFACT), ctx.nbytes
    with PeakRss() as rss:
        t0 = time.perf_counter()
        got = fs.cat(_object_paths(fs_path))
        read_s = time.perf_counter() - t0
    total = sum(len(v) for v in got.values())
    if total != nbytes:
        raise RuntimeError(f"multi-object read got {total} bytes, expected {nbytes}")
    return rss, (read_s, read_s, {"objects": len(got)})
