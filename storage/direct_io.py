"""``O_DIRECT`` writes of new local files, and when to use them (``CKPTSVC_DIRECT_IO``).

:class:`DirectFile` writes a new file with ``O_DIRECT`` and keeps several writes in
flight at their own offsets (``pwrite``), as the device needs to stay busy. **Zero copy**:
a big chunk whose memory is page aligned, arriving when the file so far ends on a block
boundary, is written straight from the caller's memory. That is the common case: shards
of 1 MiB or more pad their header to 4 KiB (:mod:`ckptsvc.format.safetensors_stream`), and the
staging arena keeps each shard's data page aligned, so after the header's block every
byte goes from shared memory to the device without a copy. Anything else is copied into
page-aligned bounce slots (an anonymous mapping whose pages are touched only when used);
the last partial block is zero-padded and the file cut back with ``ftruncate``. Skipping
the page cache saves the kernel's per-page copy, dirty accounting and writeback
throttling: on ext4 over a virtio disk it made 8 MiB - 1 GiB durable writes 1.5-2x faster
(see the bench's ``raw_write_direct`` floor).

:func:`want_direct` decides per file: ``off``; ``on`` (try everywhere, fall back where
refused); ``auto`` (the default: only on block-device filesystems where it was measured
faster - ext4, xfs - and only for files of at least ``CKPTSVC_DIRECT_IO_MIN_BYTES``).
A filesystem that refuses ``O_DIRECT`` (``EINVAL`` at open, or at the first write) is
remembered per device and logged once at INFO; the file is then written buffered, and
its bytes are identical either way.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Literal

from ckptsvc import knobs
from ckptsvc.errors import ConfigError

from . import bounce
from .bounce import BounceSlot
from .buffer_address import address_of as _address_of

__all__ = [
    "ALIGN_BYTES",
    "AUTO_FILESYSTEMS",
    "DirectFile",
    "DirectIOMode",
    "DirectIORefused",
    "direct_io_mode",
    "filesystem_type",
    "want_direct",
]

logger = logging.getLogger(__name__)

DirectIOMode = Literal["auto", "on", "off"]
#: alignment of buffers, offsets and lengths of every O_DIRECT write (covers 512 B and 4 KiB
#: logical blocks)
ALIGN_BYTES = 4096
#: filesystems on which ``auto`` uses O_DIRECT: local block devices with a real direct path
AUTO_FILESYSTEMS = frozenset({"ext4", "xfs"})
_REFUSING_ERRNOS = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})
#: pieces at least this big are copied by ``memmove`` without the GIL, so the flusher
#: thread can start its next write at once (a slice assignment holds the GIL throughout)
_GIL_FREE_COPY_BYTES = 64 * 1024
#: chunks at least this big, page aligned at a block-aligned file offset, skip the bounce
_ZERO_COPY_MIN_BYTES = 2**20
#: direct writes of one file in flight, and its bounce slots (each
#: ``CKPTSVC_DIRECT_IO_BUFFER_BYTES``): one more than in flight, so the caller fills the next
#: slot while ``_IN_FLIGHT`` writes keep the device busy
_IN_FLIGHT = 4
_SLOTS = _IN_FLIGHT + 1
#: zero-copy writes from a stable source queued or in flight before ``write`` waits
_WINDOW = 2 * _IN_FLIGHT
#: from a stable source, consecutive pieces (tensors written in place, the bounce blocks
#: between them) are gathered into one ``pwritev`` of about this many bytes: a virtual
#: disk moves 1 GiB about 13 % slower as 2 MiB writes with 4 KiB ones between than as
#: 32 MiB writes, four in flight either way
_GATHER_BYTES = 16 * 2**20
_GATHER_SEGMENTS = 512  # below IOV_MAX (1024 on Linux)


def _no_op() -> None:
    """A zero-copy write's release: nothing to give back."""


_lock = threading.Lock()
_refused_devices: set[int] = set()  # st_dev of filesystems that refused O_DIRECT
_fs_types: dict[int, str] = {}  # st_dev -> filesystem type, from /proc/self/mountinfo


class DirectIORefused(OSError):
    """Internal: the filesystem does not accept ``O_DIRECT``; write the file buffered."""


def direct_io_mode(value: str | bool | None = None) -> DirectIOMode:
    """Normalise an explicit ``direct_io`` argument (``"auto"|"on"|"off"``, or a bool), else
    ``CKPTSVC_DIRECT_IO``; ValueError names the accepted values."""
    if isinstance(value, bool):
        return "on" if value else "off"
    raw = knobs.DIRECT_IO.get(value).strip().lower()
    aliases: dict[str, DirectIOMode] = {
        "auto": "auto", "on": "on", "off": "off", "1": "on", "0": "off",
        "true": "on", "false": "off", "yes": "on", "no": "off",
    }  # fmt: skip
    if raw not in aliases:
        raise ConfigError(f"direct_io={raw!r}: use 'auto', 'on' or 'off' (CKPTSVC_DIRECT_IO)")
    return aliases[raw]


def _round_up(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


def filesystem_type(directory: str) -> str:
    """The type (``ext4``, ``tmpfs``, ...) of the filesystem holding ``directory``, from
    ``/proc/self/mountinfo`` (matched by device number, else by the longest mount point);
    ``""`` when unknown. Cached per device."""
    dev = os.stat(directory).st_dev
    with _lock:
        if dev in _fs_types:
            return _fs_types[dev]
    want = f"{os.major(dev)}:{os.minor(dev)}"
    real = os.path.realpath(directory)
    by_dev, by_prefix, best = "", "", -1
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) < 5 or not tail:
                    continue
                mount_point = fields[4].replace("\\040", " ")
                if fields[2] == want:
                    by_dev = tail[0]
                inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) > best:
                    by_prefix, best = tail[0], len(mount_point)
    except OSError as e:
        logger.debug("cannot read /proc/self/mountinfo: %s", e)
    kind = by_dev or by_prefix
    with _lock:
        _fs_types[dev] = kind
    return kind


def want_direct(
    directory: str,
    *,
    mode: DirectIOMode,
    size_hint_bytes: int | None,
    min_bytes: int | None = None,
) -> bool:
    """Whether a new file of about ``size_hint_bytes`` in ``directory`` should be written
    with ``O_DIRECT`` (see the module docstring; ``min_bytes`` wins over
    ``CKPTSVC_DIRECT_IO_MIN_BYTES``)."""
    if mode == "off":
        return False
    try:
        dev = os.stat(directory).st_dev
    except OSError:
        return False  # the open reports the real problem
    with _lock:
        if dev in _refused_devices:
            return False
    if mode == "on":
        return True
    if size_hint_bytes is None or size_hint_bytes < knobs.DIRECT_IO_MIN_BYTES.get(min_bytes):
        return False
    return filesystem_type(directory) in AUTO_FILESYSTEMS


def _note_refused(path: str, fd_or_dir: int | str, err: OSError) -> None:
    """Remember that the filesystem of ``fd_or_dir`` refuses O_DIRECT; log once per device."""
    try:
        dev = (
            os.fstat(fd_or_dir).st_dev if isinstance(fd_or_dir, int) else os.stat(fd_or_dir).st_dev
        )
    except OSError:
        return
    with _lock:
        first = dev not in _refused_devices
        _refused_devices.add(dev)
    if first:
        logger.info(
            "%s: the filesystem refuses O_DIRECT (%s); writing its files through the page "
            "cache (set CKPTSVC_DIRECT_IO=off to skip the attempt)",
            path,
            os.strerror(err.errno or 0),
        )


class DirectFile:
    """A new local file written with ``O_DIRECT``, several writes in flight.

    1. ``__init__`` (caller thread): create the file with ``O_DIRECT`` (:class:`DirectIORefused`
       where the filesystem does not accept it). Bounce slots of ``chunk_nbytes``
       (rounded to pages; smaller for a small ``size_hint_bytes``), at most ``_SLOTS``,
       are taken from the process's :mod:`.bounce` pool when first needed and given back
       on ``close`` / ``abort``, so the next file reuses them already faulted in
       (``huge_slots``: of transparent huge pages, for a writer that copies most bytes);
    2. ``write`` (caller thread, one at a time): a big chunk whose memory reaches a page
       boundary where the file reaches a block boundary (page-aligned at a block-aligned
       offset, or in step past both) is written from where it lies after its head (zero
       copy); anything else is copied into the filling slot. Full slots and zero-copy chunks become ``pwrite`` s at their own
       file offsets on a pool of ``_IN_FLIGHT`` threads, so the device sees several
       requests at once (one stream of synchronous writes leaves it idle between them);
       the caller waits for a free slot, and for its zero-copy writes (its memory is
       free again when ``write`` returns) - unless ``stable_source`` (the caller's memory
       stays valid until ``close``/``abort``: the node writer's arena): then up to
       ``_WINDOW`` zero-copy writes stay queued or in flight across ``write`` calls, so the
       device never waits for the slowest write of a chunk, and consecutive pieces (in
       place or bounce blocks, which then share a slot) go out as one ``pwritev`` of
       about ``_GATHER_BYTES``;
    3. ``close`` (caller thread): write the last slot zero-padded to a block, wait for every
       write, ``ftruncate`` to the real size, ``fsync`` (when asked), close; or ``abort``:
       drop the writes not started, wait for the running ones, close, unlink (never
       raises). Either way the slots go back to the pool.

    The first write runs on the caller thread: if the filesystem refuses it (``EINVAL``),
    the descriptor drops ``O_DIRECT`` and the same bytes go through the page cache (logged
    once per filesystem). ``nbytes`` counts the bytes accepted so far.
    """

    def __init__(
        self,
        path: str,
        *,
        chunk_nbytes: int,
        size_hint_bytes: int | None,
        fsync: bool,
        stable_source: bool = False,
        huge_slots: bool = False,
    ) -> None:
        self.path = path
        self._fsync = fsync
        self._stable_source = stable_source
        self._huge_slots = huge_slots
        self._pending: collections.deque[Future[None]] = collections.deque()
        self._gather: list[memoryview] = []  # pieces of the next pwritev (stable source)
        self._gather_releases: list[Callable[[], None]] = []
        self._gather_offset = 0  # file offset of its first byte
        self._gather_nbytes = 0
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as e:
            if e.errno in _REFUSING_ERRNOS:
                _note_refused(path, os.path.dirname(path) or ".", e)
                raise DirectIORefused(e.errno, e.strerror, path) from e
            raise
        slot = _round_up(max(1, chunk_nbytes))
        if size_hint_bytes is not None:
            slot = min(slot, _round_up(max(1, size_hint_bytes)))
        self._slot_nbytes = slot
        self._slots: list[BounceSlot] = []  # taken from the pool, given back at the end
        self._free_slots: queue.SimpleQueue[BounceSlot] = queue.SimpleQueue()
        self._slot: BounceSlot | None = None  # the slot being filled
        self._slot_base = 0  # where its region being filled starts (stable sources)
        self._filled = 0  # bytes in that region
        self._slot_users: dict[int, int] = {}  # id(slot) -> its regions being written
        self._slot_lock = threading.Lock()
        self._offset = 0  # file offset of the next write handed out
        self._pool: ThreadPoolExecutor | None = None
        self._flags_lock = threading.Lock()
        self._error: BaseException | None = None
        self._direct = True  # False once the filesystem refused a direct write
        self._proven = False  # a direct write succeeded: the rest may go in parallel
        self.nbytes = 0
        self._open = True

    @property
    def closed(self) -> bool:
        """True after ``close`` or ``abort`` started."""
        return not self._open

    # ---- caller thread ----------------------------------------------------------------------
    def write(self, data: memoryview | bytes) -> None:
        """Take ``data``: written from where it lies when aligned, else via the bounce slots."""
        if not self._open:
            raise ValueError(f"{self.path}: write after close or abort")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        pos, total = 0, view.nbytes
        src_addr = _address_of(view) if total >= _GIL_FREE_COPY_BYTES else None
        if src_addr is not None and total >= _ZERO_COPY_MIN_BYTES:
            # in step: the file reaches a block boundary where the memory reaches a page
            # (aligned memory at an aligned offset, or a heap tensor 64 bytes past a page
            # at a file offset 64 bytes past a block): copy the head, write the rest in place
            head = -src_addr % ALIGN_BYTES
            if (self._filled + head) % ALIGN_BYTES == 0:
                self._fill(view, src_addr, 0, head)
                pos = head + self._write_through(view[head:])
        self._fill(view, src_addr, pos, total)
        self.nbytes += total

    def _fill(self, view: memoryview, src_addr: int | None, pos: int, end: int) -> None:
        """Copy ``view[pos:end]`` into bounce slots, handing out each full slot."""
        slot_nbytes = self._slot_nbytes
        while pos < end:
            self._raise_error()
            slot = self._filling()
            n = min(end - pos, slot_nbytes - self._slot_base - self._filled)
            base = self._slot_base + self._filled
            if src_addr is not None and n >= _GIL_FREE_COPY_BYTES:
                ctypes.memmove(slot.address + base, src_addr + pos, n)
            else:
                slot.view[base : base + n] = view[pos : pos + n]
            self._filled += n
            pos += n
            if self._slot_base + self._filled == slot_nbytes:
                self._submit_slot()

    def _write_through(self, view: memoryview) -> int:
        """Zero copy: write the block-aligned prefix of ``view`` (page-aligned memory) from
        where it lies, once the bytes so far end on a block boundary, as up to
        ``_IN_FLIGHT`` parallel ``pwrite`` s; return when they are done (the caller may
        reuse its memory then: a streamed save refills the ring slot). Returns the bytes
        written (0 when the stream is not there)."""
        nbytes = view.nbytes // ALIGN_BYTES * ALIGN_BYTES
        if not self._direct or nbytes < _ZERO_COPY_MIN_BYTES or self._filled % ALIGN_BYTES:
            return 0
        if self._filled:
            self._submit_slot()  # whole blocks: the file stays block aligned
        self._raise_error()
        base = self._offset
        self._offset += nbytes
        parts = max(1, min(_IN_FLIGHT, nbytes // _ZERO_COPY_MIN_BYTES))
        step = _round_up(-(-nbytes // parts))
        pieces = [(view[lo : min(nbytes, lo + step)], base + lo) for lo in range(0, nbytes, step)]
        if not self._proven:  # the first direct write tells whether O_DIRECT is taken
            self._pwrite_all(*pieces.pop(0))
            self._proven = True
        if self._stable_source:  # the memory outlives the writes: no barrier, a window
            for piece, offset in pieces:
                self._gathered(piece, offset, _no_op)
            return nbytes
        futures = [self._executor().submit(self._pwrite_all, *piece) for piece in pieces]
        wait(futures)
        for future in futures:
            future.result()  # the first error, once no write reads ``view`` any more
        return nbytes

    def _filling(self) -> BounceSlot:
        """The slot to fill: the current one, a free one, a new one from the pool while
        fewer than ``_SLOTS`` are taken, else the next one a write gives back (waits)."""
        if self._slot is None:
            self._slot_base = 0
            try:
                self._slot = self._free_slots.get_nowait()
            except queue.Empty:
                if len(self._slots) < _SLOTS:
                    self._slot = bounce.POOL.take(self._slot_nbytes, huge=self._huge_slots)
                    self._slots.append(self._slot)
                else:
                    self._flush_gather()  # it may hold the slots
                    self._slot = self._free_slots.get()
                    self._raise_error()
        return self._slot

    def _submit_slot(self) -> None:
        """Hand the filling slot's bytes out; the next write fills another slot."""
        slot, base, nbytes = self._slot, self._slot_base, self._filled
        if slot is None:
            return
        # From a stable source the bytes between tensors written in place are a block or
        # two: the rest of the slot takes the next ones (a slot per block would leave the
        # caller waiting for slots while the gathered writes run).
        keep = self._stable_source and self._proven and base + nbytes < self._slot_nbytes
        with self._slot_lock:
            self._slot_users[id(slot)] = self._slot_users.get(id(slot), 0) + 1
            if keep:
                self._slot_base, self._filled = base + nbytes, 0
            else:
                self._slot, self._slot_base, self._filled = None, 0, 0
        self._start(slot.view[base : base + nbytes], release=lambda: self._region_done(slot))
        self._raise_error()

    def _region_done(self, slot: BounceSlot) -> None:
        """A region of ``slot`` is written: the slot is free once none is in flight and
        the caller fills another (any thread)."""
        with self._slot_lock:
            users = self._slot_users[id(slot)] - 1
            self._slot_users[id(slot)] = users
            free = users == 0 and slot is not self._slot
        if free:
            self._free_slots.put(slot)

    def _start(self, chunk: memoryview, *, release: Callable[[], None]) -> None:
        """Write ``chunk`` at the next file offset: on the pool once a direct write worked,
        else here (the first write tells whether the filesystem takes O_DIRECT)."""
        offset = self._offset
        self._offset += chunk.nbytes
        if not self._proven:
            try:
                self._pwrite_all(chunk, offset)
                self._proven = True
            finally:
                release()
            return
        if self._stable_source:
            self._gathered(chunk, offset, release)
            return
        self._executor().submit(self._run, chunk, offset, release)

    def _gathered(self, chunk: memoryview, offset: int, release: Callable[[], None]) -> None:
        """Add ``chunk`` (at file ``offset``, right after the pieces gathered so far) to
        the next ``pwritev``; hand that out once it is big enough."""
        if not self._gather:
            self._gather_offset = offset
        self._gather.append(chunk)
        self._gather_releases.append(release)
        self._gather_nbytes += chunk.nbytes
        if self._gather_nbytes >= _GATHER_BYTES or len(self._gather) >= _GATHER_SEGMENTS:
            self._flush_gather()

    def _flush_gather(self) -> None:
        """Hand the gathered pieces out as one write; keep at most ``_WINDOW`` queued."""
        if not self._gather:
            return
        pieces, releases = self._gather, self._gather_releases
        self._gather, self._gather_releases, self._gather_nbytes = [], [], 0
        self._pending.append(
            self._executor().submit(self._run_gathered, pieces, self._gather_offset, releases)
        )
        while len(self._pending) > _WINDOW:
            self._pending.popleft().result()  # errors come through ``_error``
        self._raise_error()

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_IN_FLIGHT, thread_name_prefix="ckptsvc-direct-io")
        return self._pool

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Write what is left, wait for every write, cut the padding, fsync, close."""
        if not self._open:
            return
        self._open = False
        try:
            self._flush_gather()
            if self._filled and self._slot is not None:
                end = _round_up(self._filled) if self._direct else self._filled
                view = self._slot.view[self._slot_base :]
                view[self._filled : end] = bytes(end - self._filled)
                self._pwrite_all(view[:end], self._offset)
            self._drain()
            self._raise_error()
            if os.fstat(self._fd).st_size != self.nbytes:
                os.ftruncate(self._fd, self.nbytes)
            if self._fsync:
                os.fsync(self._fd)
        finally:
            self._drain()
            self._release()

    def abort(self) -> None:
        """Stop writing and delete the file; never raises."""
        self._open = False
        with contextlib.suppress(BaseException):
            self._drain(cancel=True)
        with contextlib.suppress(OSError):
            self._release()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _drain(self, *, cancel: bool = False) -> None:
        """Wait for the writes (``cancel``: drop those not started yet, and the pieces
        not handed out)."""
        if cancel:
            self._gather, self._gather_releases, self._gather_nbytes = [], [], 0
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None
        self._pending.clear()

    def _release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        slots, self._slots, self._slot = self._slots, [], None
        for slot in slots:  # every write is done: nothing reads them any more
            bounce.POOL.give(slot)

    # ---- pool threads (and the caller for the first and the last write) ---------------------
    def _run(self, chunk: memoryview, offset: int, release: Callable[[], None]) -> None:
        self._guarded(lambda: self._pwrite_all(chunk, offset), [release])

    def _run_gathered(
        self, pieces: list[memoryview], offset: int, releases: list[Callable[[], None]]
    ) -> None:
        self._guarded(lambda: self._pwritev_all(pieces, offset), releases)

    def _guarded(self, write: Callable[[], None], releases: list[Callable[[], None]]) -> None:
        """Run one queued ``write`` unless an earlier one failed; keep its error for the
        caller's next call; release its buffers whatever happened."""
        try:
            if self._error is None:
                write()
        except BaseException as e:  # reported to the caller at its next call
            self._error = self._error or e
        finally:
            for release in releases:
                release()

    def _pwritev_all(self, pieces: list[memoryview], offset: int) -> None:
        """Write ``pieces`` back to back from ``offset``: one ``pwritev``, then whatever a
        short write (or a refusal of O_DIRECT) left, piece by piece."""
        try:
            done = os.pwritev(self._fd, pieces, offset)
        except OSError as e:
            if not self._direct or e.errno not in _REFUSING_ERRNOS:
                raise
            self._drop_direct(e)
            done = 0
        for piece in pieces:
            if done >= piece.nbytes:
                done -= piece.nbytes
            else:
                self._pwrite_all(piece[done:], offset + done)
                done = 0
            offset += piece.nbytes

    def _pwrite_all(self, chunk: memoryview, offset: int) -> None:
        """``pwrite`` all of ``chunk`` at ``offset``, dropping O_DIRECT if refused."""
        done = 0
        while done < chunk.nbytes:
            was_direct = self._direct
            try:
                done += os.pwrite(self._fd, chunk[done:], offset + done)
            except OSError as e:
                if not was_direct or e.errno not in _REFUSING_ERRNOS:
                    raise
                self._drop_direct(e)

    def _drop_direct(self, err: OSError) -> None:
        with self._flags_lock:
            if not self._direct:
                return  # another write saw the refusal first
            _note_refused(self.path, self._fd, err)
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self._direct = False
