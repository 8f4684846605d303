"""Parallel ranged reads straight into the caller's memory (tensor storage, say).

1. :func:`plan_reads` turns byte extents ``(file offset, destination view)`` into
   :class:`RangeRead` requests: small extents close together are coalesced into one
   range (the bytes between them land in a scratch buffer), huge ones are split so that
   one file keeps ``in_flight`` requests busy.
2. :func:`read_ranges` runs them, each retried on its own with backoff, resuming after
   the bytes already received:

   - local files: ``preadv`` of the range into the destination views, on a thread pool;
   - S3: GetObject with a ``Range`` header on the filesystem's event loop; the response
     body is copied chunk by chunk from the socket buffers into the views (no
     intermediate whole-range buffer, no second copy);
   - other async filesystems (GCS): ``_cat_file(start, end)`` on the loop, then one copy;
   - any other filesystem: ``cat_file(start, end)`` on a thread pool, then one copy.

A range that ends past the end of the file is a truncated file: ``CorruptCheckpointError``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fsspec.asyn import AsyncFileSystem, sync

from ckptsvc import knobs
from ckptsvc.errors import CheckpointError, ConfigError, CorruptCheckpointError

from .direct_io import ALIGN_BYTES, AUTO_FILESYSTEMS, _address_of, filesystem_type
from .errors import classify, storage_errors
from .retry import call_with_retries

if TYPE_CHECKING:
    from .location import Location

__all__ = ["OnRange", "RangeRead", "plan_reads", "read_ranges", "want_direct_read"]

logger = logging.getLogger(__name__)

_MIN_SPLIT_BYTES = 8 * 2**20  # never split a tensor into ranges smaller than this
_BODY_READ_BYTES = 4 * 2**20  # most bytes taken from a response body per await
_LOCAL_PARALLEL_BYTES = 64 * 2**20  # below this, local reads run in the calling thread
_MAX_VIEWS = 512  # views per range: preadv takes at most IOV_MAX (1024) buffers
_MIN_DIRECT_BYTES = 2**20  # smaller aligned spans are read buffered even when direct


@dataclass(frozen=True)
class RangeRead:
    """One request: file bytes ``[offset, offset + nbytes)`` land in ``views``, in order."""

    offset: int
    views: tuple[memoryview, ...]

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.views)


def _byte_view(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def plan_reads(
    extents: Iterable[tuple[int, memoryview]],
    *,
    max_range_bytes: int,
    max_gap_bytes: int,
    min_ranges: int = 1,
) -> list[RangeRead]:
    """Coalesce and split ``(offset, view)`` extents into requests (see the module doc).

    Each range holds at most ``max_range_bytes``; for a big total the cap shrinks (never
    below 8 MiB) so that at least ``min_ranges`` ranges can run in parallel. Extents at
    most ``max_gap_bytes`` apart share a range; the bytes between them are discarded.
    """
    pieces = sorted(
        ((off, _byte_view(v)) for off, v in extents if v.nbytes), key=lambda item: item[0]
    )
    if not pieces:
        return []
    total = sum(v.nbytes for _, v in pieces)
    target = -(-total // max(1, min_ranges))
    target = max(1, min(max_range_bytes, max(target, min(_MIN_SPLIT_BYTES, max_range_bytes))))
    if target > ALIGN_BYTES:  # split points stay block aligned (direct reads need it)
        target -= target % ALIGN_BYTES

    split: list[tuple[int, memoryview]] = []
    for off, v in pieces:
        for start in range(0, v.nbytes, target):
            split.append((off + start, v[start : start + target]))

    scratch: memoryview | None = None  # one buffer for every gap: its bytes are discarded
    out: list[RangeRead] = []
    cur_off = cur_end = 0
    cur: list[memoryview] = []
    for off, v in split:
        gap = off - cur_end
        if (
            cur
            and 0 <= gap <= max_gap_bytes
            and off + v.nbytes - cur_off <= target
            and len(cur) + 2 <= _MAX_VIEWS
        ):
            if gap:
                scratch = scratch if scratch is not None else memoryview(bytearray(max_gap_bytes))
                cur.append(scratch[:gap])
            cur.append(v)
            cur_end = off + v.nbytes
            continue
        if cur:
            out.append(RangeRead(cur_off, tuple(cur)))
        cur, cur_off, cur_end = [v], off, off + v.nbytes
    if cur:
        out.append(RangeRead(cur_off, tuple(cur)))
    return out


class _Scatter:
    """Copies a byte stream into consecutive views; ``done`` counts the bytes placed."""

    def __init__(self, views: Sequence[memoryview]) -> None:
        self._views = views
        self._i = 0
        self._pos = 0
        self.done = 0

    def skip(self, nbytes: int) -> None:
        self.done += nbytes
        while nbytes and self._i < len(self._views):
            room = self._views[self._i].nbytes - self._pos
            step = min(room, nbytes)
            self._pos += step
            nbytes -= step
            if self._pos == self._views[self._i].nbytes:
                self._i, self._pos = self._i + 1, 0

    def write(self, data: bytes | memoryview) -> None:
        src = memoryview(data)
        while src.nbytes:
            if self._i >= len(self._views):
                raise ValueError("more bytes than the range asked for")
            dst = self._views[self._i]
            step = min(dst.nbytes - self._pos, src.nbytes)
            dst[self._pos : self._pos + step] = src[:step]
            self._pos += step
            self.done += step
            src = src[step:]
            if self._pos == dst.nbytes:
                self._i, self._pos = self._i + 1, 0


def _truncated(url: str, rr: RangeRead, got: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{url}: file is truncated (wanted bytes {rr.offset}..{rr.offset + rr.nbytes}, got {got})"
    )


def _is_range_error(exc: BaseException) -> bool:
    """A request for bytes at or past the end of the object (HTTP 416)."""
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL:
        return True
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        if response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416:
            return True
        if response.get("Error", {}).get("Code") == "InvalidRange":
            return True
    if getattr(exc, "status", None) == 416 or getattr(exc, "code", None) == 416:
        return True
    # never match a bare "416": "received 208 of 416 bytes" is a cut body, not a range error
    text = str(exc).lower()
    return "invalidrange" in text or "not satisfiable" in text


#: called with each range once all its bytes are in place, in the thread that read it
OnRange = Callable[[RangeRead], None]


def read_ranges(
    loc: Location,
    reads: Sequence[RangeRead],
    *,
    in_flight: int,
    on_range: OnRange | None = None,
    direct: bool = False,
) -> None:
    """Run ``reads`` against ``loc``, at most ``in_flight`` at a time (see the module doc).

    ``on_range(rr)`` runs as soon as range ``rr`` is complete, in the thread that read it
    (a reader thread, or the filesystem's event loop), while its bytes are still in the
    CPU cache: the loaders checksum there. ``direct`` (local files): read the block-aligned
    middle of every range whose memory is block aligned as well with ``O_DIRECT``
    (bypassing the page cache); the rest, or everything where the filesystem refuses
    ``O_DIRECT``, is read buffered.
    """
    if not reads:
        return
    in_flight = max(1, in_flight)
    if loc.is_local:
        _read_local(loc, reads, threads=in_flight, on_range=on_range, direct=direct)
    elif hasattr(loc.fs, "_call_s3"):
        _read_on_loop(loc, reads, in_flight, _s3_range, on_range)
    elif isinstance(loc.fs, AsyncFileSystem):
        _read_on_loop(loc, reads, in_flight, _cat_range, on_range)
    else:
        _read_threads(loc, reads, threads=in_flight, on_range=on_range)


# ---- local ------------------------------------------------------------------------------
def _read_local(
    loc: Location,
    reads: Sequence[RangeRead],
    *,
    threads: int,
    on_range: OnRange | None,
    direct: bool,
) -> None:
    with storage_errors(loc.url, "read"):
        fd = os.open(loc.path, os.O_RDONLY)
    direct_fd = _open_direct(loc.path) if direct else None
    try:

        def fill(views: Sequence[memoryview], offset: int, nbytes: int, use: int) -> None:
            done = 0
            while done < nbytes:
                n = os.preadv(use, _remaining(views, done), offset + done)
                if n == 0:
                    raise _truncated(loc.url, RangeRead(offset, tuple(views)), done)
                done += n

        def one(rr: RangeRead) -> None:
            with storage_errors(loc.url, "read"):
                span = _direct_span(rr) if direct_fd is not None else None
                if span is None or direct_fd is None:
                    fill(rr.views, rr.offset, rr.nbytes, fd)
                else:
                    view = _byte_view(rr.views[0])
                    lo, hi = span
                    fill([view[lo:hi]], rr.offset + lo, hi - lo, direct_fd)
                    if lo:
                        fill([view[:lo]], rr.offset, lo, fd)
                    if hi < view.nbytes:
                        fill([view[hi:]], rr.offset + hi, view.nbytes - hi, fd)
            if on_range is not None:
                on_range(rr)

        total = sum(rr.nbytes for rr in reads)
        if threads == 1 or len(reads) == 1 or total < _LOCAL_PARALLEL_BYTES:
            for rr in reads:
                one(rr)
        else:
            with ThreadPoolExecutor(max_workers=min(threads, len(reads))) as pool:
                list(pool.map(one, reads))
    finally:
        os.close(fd)
        if direct_fd is not None:
            os.close(direct_fd)


_MODES = {"auto": "auto", "on": "on", "off": "off", "1": "on", "0": "off",
          "true": "on", "false": "off", "yes": "on", "no": "off"}  # fmt: skip


def want_direct_read(path: str, mode: str | None = None) -> bool:
    """Whether loads of the local file ``path`` read with ``O_DIRECT`` where they can
    (``mode``, else ``CKPTSVC_DIRECT_IO_READS``): ``off``, ``on``, or ``auto`` = on ext4 and
    xfs, where a 1 GiB cold load measured no slower than through the page cache and spends
    no CPU on the kernel's copy (see docs/benchmarks.md)."""
    raw = knobs.DIRECT_IO_READS.get(mode).strip().lower()
    if raw not in _MODES:
        raise ConfigError(f"direct_io_reads={raw!r}: use 'auto', 'on' or 'off'")
    chosen = _MODES[raw]
    if chosen != "auto":
        return chosen == "on"
    try:
        return filesystem_type(os.path.dirname(path) or ".") in AUTO_FILESYSTEMS
    except OSError:
        return False


def _open_direct(path: str) -> int | None:
    """A second descriptor with ``O_DIRECT``, or ``None`` where the filesystem refuses it."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        logger.debug("%s: O_DIRECT refused (%s); reading through the page cache", path, e)
        return None


def _direct_span(rr: RangeRead) -> tuple[int, int] | None:
    """The block-aligned part ``[lo, hi)`` of a one-view range whose memory address and file
    offset agree modulo the block size, if at least ``_MIN_DIRECT_BYTES``; else ``None``."""
    if len(rr.views) != 1 or rr.nbytes < _MIN_DIRECT_BYTES:
        return None
    view = _byte_view(rr.views[0])
    address = _address_of(view)
    if (address - rr.offset) % ALIGN_BYTES:
        return None
    lo = -rr.offset % ALIGN_BYTES
    hi = lo + (rr.nbytes - lo) // ALIGN_BYTES * ALIGN_BYTES
    return (lo, hi) if hi - lo >= _MIN_DIRECT_BYTES else None


def _remaining(views: Sequence[memoryview], skip: int) -> list[memoryview]:
    out = []
    for v in views:
        if skip >= v.nbytes:
            skip -= v.nbytes
            continue
        out.append(v[skip:])
        skip = 0
    return out


# ---- sync fsspec filesystems --------------------------------------------------------------
def _read_threads(
    loc: Location, reads: Sequence[RangeRead], *, threads: int, on_range: OnRange | None
) -> None:
    def one(rr: RangeRead) -> None:
        try:
            data = call_with_retries(
                lambda: loc.fs.cat_file(loc.path, start=rr.offset, end=rr.offset + rr.nbytes),
                url=loc.url,
                policy=loc.retry_policy(),
                action="read",
            )
        except CheckpointError as e:
            if _is_range_error(e.__cause__ or e):
                raise _truncated(loc.url, rr, 0) from e
            raise
        if len(data) < rr.nbytes:
            raise _truncated(loc.url, rr, len(data))
        _Scatter(rr.views).write(memoryview(data)[: rr.nbytes])
        if on_range is not None:
            on_range(rr)

    if len(reads) == 1:
        one(reads[0])
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(reads))) as pool:
        list(pool.map(one, reads))


# ---- async filesystems (S3, GCS) ------------------------------------------------------------
_RangeFn = Callable[[Any, str, str, RangeRead, _Scatter], Awaitable[None]]


def _read_on_loop(
    loc: Location,
    reads: Sequence[RangeRead],
    in_flight: int,
    fn: _RangeFn,
    on_range: OnRange | None,
) -> None:
    policy = loc.retry_policy()

    async def retried(rr: RangeRead, gate: asyncio.Semaphore) -> None:
        async with gate:
            scatter = _Scatter(rr.views)
            started = time.monotonic()
            attempt = 0
            while True:
                attempt += 1
                before = scatter.done
                try:
                    await fn(loc.fs, loc.path, loc.url, rr, scatter)
                except CheckpointError:
                    raise
                except Exception as e:
                    if _is_range_error(e):
                        raise _truncated(loc.url, rr, scatter.done) from e
                    if scatter.done > before:
                        attempt, started = 1, time.monotonic()  # progress: a fresh budget
                    delay = policy.delay_s(e, attempt=attempt, started_s=started)
                    if delay is None:
                        raise classify(e, loc.url, "read") from e
                    logger.warning(
                        "read %s bytes %d..%d failed (attempt %d/%d, %s: %s); retrying in %.2fs",
                        loc.url,
                        rr.offset + scatter.done,
                        rr.offset + rr.nbytes,
                        attempt,
                        policy.attempts,
                        type(e).__name__,
                        e,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                if scatter.done < rr.nbytes:
                    raise _truncated(loc.url, rr, scatter.done)
                if on_range is not None:
                    on_range(rr)
                return

    async def run_all() -> None:
        gate = asyncio.Semaphore(in_flight)
        tasks = [asyncio.ensure_future(retried(rr, gate)) for rr in reads]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:  # no task may keep writing into memory the caller frees
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    sync(loc.fs.loop, run_all)


async def _s3_range(fs: Any, path: str, url: str, rr: RangeRead, scatter: _Scatter) -> None:
    """Stream ``GetObject(Range)`` from where ``scatter`` stands into its views."""
    bucket, key, version = fs.split_path(path)
    start = rr.offset + scatter.done
    kwargs: dict[str, Any] = {"VersionId": version} if version else {}
    resp = await fs._call_s3(
        "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{rr.offset + rr.nbytes - 1}",
        **kwargs,
    )  # fmt: skip
    body = resp["Body"]
    # aiohttp's readany() hands over one received buffer as is; read(n) would join several
    content = getattr(getattr(body, "raw_stream", None), "content", None)
    read_any: Callable[[], Awaitable[bytes]] = (
        content.readany
        if content is not None and hasattr(content, "readany")
        else lambda: body.read(_BODY_READ_BYTES)
    )
    promised = int(resp.get("ContentLength") or 0)  # what the server said it would send
    received = 0
    try:
        while scatter.done < rr.nbytes:
            chunk = await read_any()
            if not chunk:
                break
            scatter.write(chunk)
            received += len(chunk)
    finally:
        body.close()
    if scatter.done < rr.nbytes and received < promised:
        # the connection ended mid-body without an error: transient, resume where we stand
        # (a body shorter than the *promise* is a short file, left to the caller's check)
        raise ConnectionResetError(
            f"{url}: response body ended after {received} of {promised} bytes"
        )


async def _cat_range(fs: Any, path: str, url: str, rr: RangeRead, scatter: _Scatter) -> None:
    """``_cat_file(start, end)`` of what ``scatter`` still lacks, then one copy."""
    start = rr.offset + scatter.done
    data = await fs._cat_file(path, start=start, end=rr.offset + rr.nbytes)
    scatter.write(memoryview(data)[: rr.nbytes - scatter.done])
