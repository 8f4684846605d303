"""``O_DIRECT`` writes of new local files, and when to use them (``CKPTSVC_DIRECT_IO``).

:class:`DirectFile` copies the stream into a page-aligned bounce buffer (an anonymous
mapping of two halves) and writes whole halves with ``O_DIRECT`` from a flusher thread
while the caller fills the other half; the last partial block is zero-padded and the file
cut back with ``ftruncate``. **Zero copy**: a big chunk whose memory is page aligned,
arriving when the file so far ends on a block boundary, is written straight from the
caller's memory. That is the common case: shards of 1 MiB or more pad their header to
4 KiB (:mod:`ckptsvc.safetensors_stream`), and the staging arena keeps each shard's data
page aligned, so after the header's block every byte goes from shared memory to the
device without a copy (and the bounce buffer's pages are never touched). Skipping the page cache saves the kernel's per-page copy, dirty
accounting and writeback throttling: on ext4 over a virtio disk it made 8 MiB - 1 GiB
durable writes 1.5-2x faster (see ``docs``: the bench's ``raw_write_direct`` floor).

:func:`want_direct` decides per file: ``off``; ``on`` (try everywhere, fall back where
refused); ``auto`` (the default: only on block-device filesystems where it was measured
faster - ext4, xfs - and only for files of at least ``CKPTSVC_DIRECT_IO_MIN_BYTES``).
A filesystem that refuses ``O_DIRECT`` (``EINVAL`` at open, or at the first write) is
remembered per device and logged once at INFO; the file is then written buffered, and
its bytes are identical either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import queue
import threading
from typing import Literal

from ckptsvc import knobs

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
        raise ValueError(f"direct_io={raw!r}: use 'auto', 'on' or 'off' (CKPTSVC_DIRECT_IO)")
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


def want_direct(directory: str, *, mode: DirectIOMode, size_hint_bytes: int | None) -> bool:
    """Whether a new file of about ``size_hint_bytes`` in ``directory`` should be written
    with ``O_DIRECT`` (see the module docstring)."""
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
    if size_hint_bytes is None or size_hint_bytes < knobs.DIRECT_IO_MIN_BYTES.get():
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


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (the buffer protocol's view of an object's memory)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def _address_of(view: memoryview) -> int:
    """The address of ``view``'s first byte (read-only buffers too: the writer maps arenas
    read-only, and importing numpy for this would cost the writer ~6 MB); valid while
    ``view`` lives (it holds its exporter's buffer)."""
    buf = _PyBuffer()
    if _get_buffer(view, ctypes.byref(buf), 0) != 0:  # PyBUF_SIMPLE; raises on failure
        raise BufferError("cannot get the address of a buffer")
    try:
        return int(buf.buf or 0)
    finally:
        _release_buffer(ctypes.byref(buf))


class DirectFile:
    """A new local file written with ``O_DIRECT`` through a bounce buffer.

    1. ``__init__`` (caller thread): create/truncate the file with ``O_DIRECT``
       (:class:`DirectIORefused` where the filesystem does not accept it) and map the
       bounce buffer: two halves of ``chunk_nbytes`` (rounded to pages), smaller for a
       small ``size_hint_bytes``;
    2. ``write`` (caller thread, one at a time): copy into the filling half; a full half
       goes to the flusher thread (started on the first one), which writes it while the
       caller fills the other half;
    3. ``close`` (caller thread): wait for the flusher, write the last half zero-padded
       to a block, ``ftruncate`` to the real size, ``fsync`` (when asked), close; or
       ``abort``: stop the flusher, close, unlink (never raises).

    A write refused with ``EINVAL`` drops ``O_DIRECT`` from the descriptor and writes the
    same bytes through the page cache (logged once per filesystem).
    """

    def __init__(
        self, path: str, *, chunk_nbytes: int, size_hint_bytes: int | None, fsync: bool
    ) -> None:
        self.path = path
        self._fsync = fsync
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as e:
            if e.errno in _REFUSING_ERRNOS:
                _note_refused(path, os.path.dirname(path) or ".", e)
                raise DirectIORefused(e.errno, e.strerror, path) from e
            raise
        half = _round_up(max(1, chunk_nbytes))
        if size_hint_bytes is not None:
            half = min(half, _round_up(max(1, size_hint_bytes)))
        self._half_nbytes = half
        try:
            self._map = mmap.mmap(-1, 2 * half)
        except BaseException:
            os.close(self._fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._view = memoryview(self._map)
        self._dst = ctypes.c_char.from_buffer(self._map)  # the bounce buffer's address
        self._free = (threading.Event(), threading.Event())
        self._free[0].set()
        self._free[1].set()
        self._todo: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._flusher: threading.Thread | None = None
        self._error: BaseException | None = None
        self._direct = True  # False once the filesystem refused a direct write
        self._fill = 0  # index of the half being filled
        self._filled = 0  # bytes in it
        self.nbytes = 0  # bytes accepted so far
        self._open = True

    @property
    def closed(self) -> bool:
        """True after ``close`` or ``abort`` started."""
        return not self._open

    # ---- caller thread ----------------------------------------------------------------------
    def write(self, data: memoryview | bytes) -> None:
        """Copy ``data`` into the bounce buffer; full halves are written in the background."""
        if not self._open:
            raise ValueError(f"{self.path}: write after close or abort")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        half = self._half_nbytes
        pos, total = 0, view.nbytes
        src_addr = _address_of(view) if total >= _GIL_FREE_COPY_BYTES else None
        if src_addr is not None and src_addr % ALIGN_BYTES == 0:
            pos = self._write_through(view)
        while pos < total:
            self._raise_error()
            n = min(total - pos, half - self._filled)
            base = self._fill * half + self._filled
            if src_addr is not None and n >= _GIL_FREE_COPY_BYTES:
                ctypes.memmove(ctypes.addressof(self._dst) + base, src_addr + pos, n)
            else:
                self._view[base : base + n] = view[pos : pos + n]
            self._filled += n
            pos += n
            if self._filled == half:
                self._submit(half)
        self.nbytes += total

    def _write_through(self, view: memoryview) -> int:
        """Zero copy: write the block-aligned prefix of ``view`` (page-aligned memory) from
        where it lies, once the bytes so far end on a block boundary. Returns the bytes
        written (0 when the stream is not there)."""
        nbytes = view.nbytes // ALIGN_BYTES * ALIGN_BYTES
        if not self._direct or nbytes < _ZERO_COPY_MIN_BYTES or self._filled % ALIGN_BYTES:
            return 0
        if self._filled:
            self._submit(self._filled)  # whole blocks: the file stays block aligned
        self._free[1 - self._fill].wait()  # the flusher is idle: file order is kept
        self._raise_error()
        self._write_view(view[:nbytes])
        return nbytes

    def _submit(self, nbytes: int) -> None:
        """Hand the filling half to the flusher and wait until the other half is free."""
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=self._flush_loop, name="ckptsvc-direct-io", daemon=True
            )
            self._flusher.start()
        index = self._fill
        self._free[index].clear()
        self._todo.put((index, nbytes))
        self._fill, self._filled = 1 - index, 0
        self._free[self._fill].wait()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for the flusher, write what is left, cut the padding, fsync, close."""
        if not self._open:
            return
        self._open = False
        try:
            self._stop_flusher()  # one writer of the descriptor at a time, in file order
            self._raise_error()
            if self._filled:
                end = _round_up(self._filled) if self._direct else self._filled
                base = self._fill * self._half_nbytes
                self._view[base + self._filled : base + end] = bytes(end - self._filled)
                self._write_half(self._fill, end)
            if os.fstat(self._fd).st_size != self.nbytes:
                os.ftruncate(self._fd, self.nbytes)
            if self._fsync:
                os.fsync(self._fd)
        finally:
            self._release()

    def abort(self) -> None:
        """Stop writing and delete the file; never raises."""
        self._open = False
        with contextlib.suppress(OSError):
            self._stop_flusher()
        with contextlib.suppress(OSError):
            self._release()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._todo.put(None)
            self._flusher.join()
            self._flusher = None

    def _release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        self._view.release()
        self._dst = None  # type: ignore[assignment]  # drops its export of the map
        with contextlib.suppress(BufferError):
            self._map.close()

    # ---- flusher thread (and the caller for the last half) ----------------------------------
    def _flush_loop(self) -> None:
        while (item := self._todo.get()) is not None:
            index, nbytes = item
            try:
                if self._error is None:
                    self._write_half(index, nbytes)
            except BaseException as e:  # reported to the caller at its next call
                self._error = e
            finally:
                self._free[index].set()

    def _write_half(self, index: int, nbytes: int) -> None:
        """Write the first ``nbytes`` of half ``index`` at the file's position."""
        base = index * self._half_nbytes
        self._write_view(self._view[base : base + nbytes])

    def _write_view(self, data: memoryview) -> None:
        """Write all of ``data`` at the file's position (``os.write``, so the fault-injection
        hooks see it), dropping O_DIRECT if the filesystem refuses it."""
        done = 0
        while done < data.nbytes:
            try:
                done += os.write(self._fd, data[done:])
            except OSError as e:
                if not self._direct or e.errno not in _REFUSING_ERRNOS:
                    raise
                _note_refused(self.path, self._fd, e)
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                self._direct = False
