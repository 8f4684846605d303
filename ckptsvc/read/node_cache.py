"""Node-local read-through cache for the replicated files of remote checkpoints.

Every rank loads a REPLICATED (or GLOBAL) component whole, so without this each rank of
a job fetches the same objects: 10,000 ranks, 10,000 GETs of the model's shards. Here the
first rank of a node to need such a file downloads it once into a node-local directory
(``CKPTSVC_NODE_CACHE_DIR``, default the system temp dir), and
the node's other ranks wait for it and read the local copy through the local load path
(a private mapping of the file: the page cache holds one copy for the whole node).
Loads stay non-collective: the processes of a node coordinate through the filesystem
only, so any processes of one machine share the cache, whatever job they belong to.

Entries (one per file; ``<name>.data``, ``<name>.lock``, ``<name>.tmp-*`` while it is
downloaded). ``<name>`` derives from the checkpoint's URL, the file's relative path and
its manifest size and CRC-32C, so a checkpoint saved again at the same path (new bytes,
new CRC) gets a new entry and nothing stale is ever served.

Protocol (``fcntl.flock`` on the lock file; a lock dies with its process):

1. ``.data`` exists: take the lock shared, check the file is still there, read it. The
   shared lock is held until the component is read (:meth:`CachedFiles.close`), so the
   entry is never evicted under a reader that has not mapped it yet.
2. Else take the lock exclusive without waiting. Got it: download the whole object into
   ``<name>.tmp-<pid>-<thread>`` (parallel ranged GETs, ``CKPTSVC_READ_RANGES_IN_FLIGHT``),
   checking its CRC-32C as the ranges arrive; a mismatch is ``CorruptCheckpointError``
   (the checkpoint is damaged: nothing is cached); then make it read-only, rename it to
   ``.data`` and turn the lock shared. The CRC-32C is checked once, here: readers trust
   the entry (written once, read-only, named by its CRC) and do not check it again.
3. Not got: another process is downloading. Wait, polling, while its download makes
   progress (the temp file's mtime moves with each range); when its process dies the
   lock is released and a waiter takes the download over (the dead one's temp file is
   deleted: it is never renamed, never read). No progress for
   ``CKPTSVC_NODE_CACHE_STALL_S`` while the holder lives: :class:`NodeCacheStalledError`.

The lock file is deleted with its entry; a process that locked a lock file checks that
the path still names the file it locked, else starts again.

Eviction, by a process about to add an entry (holding its own entry's lock): entries of
other checkpoints not used (``.data`` mtime, touched on each use) for
``CKPTSVC_NODE_CACHE_MAX_AGE_S``, then the least recently used ones while the cache would
exceed ``CKPTSVC_NODE_CACHE_MAX_BYTES`` (0: half its filesystem) or leave less than 5 %
of its filesystem free. An entry whose lock another process holds (reading or
downloading) is never deleted. A file that still does not fit is read directly. A copy
stays in the cache after the load until a later download evicts it: disk space and
reclaimable page cache in the default directory, memory on a tmpfs such as ``/dev/shm``.

Any local failure of the cache (a directory that cannot be created or written, a full
filesystem, another user's default directory) makes the rank read the file directly,
with one warning per directory and process.

Applies (:func:`replicated_files`): ``CKPTSVC_NODE_CACHE`` ``auto`` - object stores (not
local or ``memory://`` checkpoints, which already share the page cache or the process),
more than one rank per node, REPLICATED or GLOBAL components stored whole; ``on`` - also
one rank per node; ``off`` (or ``CKPTSVC_NODE_CACHE_DIR=off``) - never.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import glob
import hashlib
import logging
import mmap
import os
import posixpath
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from ckptsvc import knobs
from ckptsvc.errors import CheckpointError, ConfigError, NodeCacheStalledError
from ckptsvc.format.checksum import crc32c_value
from ckptsvc.format.manifest import FileRecord, Manifest
from ckptsvc.read.shard_read import Checksums, check_crc
from ckptsvc.stage.components import SharingPattern
from ckptsvc.storage import Location
from ckptsvc.storage.reads import RangeRead

__all__ = [
    "CachedFiles",
    "NodeCache",
    "cache_dir_override",
    "default_cache_dir",
    "entry_name",
    "replicated_files",
]

logger = logging.getLogger(__name__)

_FREE_RESERVE = 20  # keep 1/20 of the cache's filesystem free
_POLL_MAX_S = 0.05
_ON = {"auto": "auto", "on": "on", "1": "on", "true": "on", "yes": "on",
       "off": "off", "0": "off", "false": "off", "no": "off"}  # fmt: skip
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ckptsvc_node_cache_dir", default=None
)
_warned: set[str] = set()
_warned_lock = threading.Lock()


@contextlib.contextmanager
def cache_dir_override(path: str) -> Iterator[None]:
    """Use ``path`` as the node cache directory in the current thread (context), whatever
    ``CKPTSVC_NODE_CACHE_DIR`` says: the simulated nodes of ``ckptsvc simulate`` (threads
    of one process) each get their own."""
    token = _override.set(path)
    try:
        yield
    finally:
        _override.reset(token)


def default_cache_dir() -> str:
    """``ckptsvc-node-cache-<uid>`` in the system temp dir (``TMPDIR``). Not ``/dev/shm``
    by default: a copy there is memory the kernel cannot reclaim for as long as it stays
    in the cache, where a disk file's pages are page cache (point
    ``CKPTSVC_NODE_CACHE_DIR`` at ``/dev/shm`` to trade that memory for speed)."""
    return os.path.join(tempfile.gettempdir(), f"ckptsvc-node-cache-{os.getuid()}")


def entry_name(ckpt_url: str, record: FileRecord) -> str:
    """The cache entry's name for one file of a checkpoint: a hash of the checkpoint's URL
    (its entries share the prefix), a hash of URL + relative path + size + CRC-32C, and
    the file's base name (for people looking at the directory)."""
    url = ckpt_url.rstrip("/")
    ckpt = hashlib.sha256(url.encode()).hexdigest()[:16]
    ident = f"{url}\0{record.path}\0{record.nbytes}\0{record.crc32c}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:24]
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", posixpath.basename(record.path))[-64:]
    return f"{ckpt}-{key}-{base}"


def _mode() -> str:
    raw = knobs.NODE_CACHE.get().strip().lower()
    if raw not in _ON:
        raise ConfigError(f"CKPTSVC_NODE_CACHE={raw!r}: use auto, on or off")
    return _ON[raw]


def replicated_files(
    ckpt: Location,
    manifest: Manifest | None,
    *,
    sharing_pattern: str,
    sharded: bool,
    local_world_size: int,
) -> CachedFiles | None:
    """The node cache's view of one component's files, or ``None`` where the cache does
    not apply (module doc: knobs, local storage, a single rank per node, a per-rank or
    sharded component, no manifest to key the entries by)."""
    if manifest is None or sharded or ckpt.is_local or ckpt.protocol == "memory":
        return None
    if sharing_pattern not in (SharingPattern.REPLICATED.value, SharingPattern.GLOBAL.value):
        return None
    mode = _mode()
    if mode == "off" or (mode == "auto" and local_world_size <= 1):
        return None
    root = _override.get() or knobs.NODE_CACHE_DIR.get().strip()
    if root.lower() == "off":
        return None
    return CachedFiles(NodeCache(root or default_cache_dir(), checked=not root), ckpt, manifest)


def _warn_once(root: str, what: str) -> None:
    with _warned_lock:
        if root in _warned:
            return
        _warned.add(root)
    logger.warning(
        "node cache %s unusable (%s): replicated files are read directly from storage by "
        "every rank (set CKPTSVC_NODE_CACHE_DIR to a writable directory, or "
        "CKPTSVC_NODE_CACHE=off to silence this)",
        root, what,
    )  # fmt: skip


@dataclass(frozen=True)
class _Entry:
    """A cache entry this process reads: its local location, and the lock file's
    descriptor holding a shared lock until :meth:`release`."""

    location: Location
    lock_fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)  # releases the lock


def _open_lock(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_lock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file ``fd`` has open (an evicted entry's lock file
    is deleted: a lock on the old one protects nothing)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (own.st_ino, own.st_dev)


def _progress(data: str) -> int:
    """The latest mtime of the entry's temp files (a download touches its file per range)."""
    latest = 0
    for tmp in glob.glob(glob.escape(data[: -len(".data")]) + ".tmp-*"):
        with contextlib.suppress(OSError):
            latest = max(latest, os.stat(tmp).st_mtime_ns)
    return latest


class NodeCache:
    """One cache directory (module doc). ``checked``: refuse a directory owned by another
    user (the default path, shared by name)."""

    def __init__(self, root: str, *, checked: bool = False) -> None:
        self.root = root
        self._checked = checked

    def acquire(self, original: Location, ckpt_url: str, record: FileRecord) -> _Entry | None:
        """The verified local copy of ``original`` (the file ``record`` describes),
        downloaded by this process or another; ``None``: read it directly (the cache is
        unusable or the file does not fit; warned once)."""
        try:
            return self._acquire(original, ckpt_url, record)
        except CheckpointError:  # storage and checksum errors: the checkpoint's, not ours
            raise
        except OSError as e:
            _warn_once(self.root, f"{type(e).__name__}: {e}")
            return None

    def _prepare(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if self._checked and os.stat(self.root).st_uid != os.getuid():
            raise PermissionError(f"{self.root} belongs to another user")

    def _acquire(self, original: Location, ckpt_url: str, record: FileRecord) -> _Entry | None:
        self._prepare()
        name = entry_name(ckpt_url, record)
        data = os.path.join(self.root, name + ".data")
        lock = os.path.join(self.root, name + ".lock")
        stall_s = knobs.NODE_CACHE_STALL_S.get()
        seen, since, delay = -1, time.monotonic(), 0.002
        while True:
            fd = _open_lock(lock)
            try:
                if os.path.exists(data):
                    if _try_lock(fd, fcntl.LOCK_SH) and _same_file(fd, lock) and _use(data):
                        return _Entry(_local(data, original), fd)
                elif _try_lock(fd, fcntl.LOCK_EX) and _same_file(fd, lock):
                    if not os.path.exists(data) and not self._download(original, record, data):
                        os.close(fd)
                        return None
                    fcntl.flock(fd, fcntl.LOCK_SH)  # let the node's other ranks in
                    if _same_file(fd, lock) and _use(data):
                        return _Entry(_local(data, original), fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            progress = _progress(data)
            now = time.monotonic()
            if seen == -1:
                logger.debug("node cache: waiting for another process's download of %s", data)
            if progress != seen:
                seen, since = progress, now
            elif now - since > stall_s:
                raise NodeCacheStalledError(
                    f"{original.url}: another process of this node has been downloading it "
                    f"into the node cache ({data}) with no progress for {stall_s:g} s and "
                    "still holds the lock; raise CKPTSVC_NODE_CACHE_STALL_S, or set "
                    "CKPTSVC_NODE_CACHE=off to read directly"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, _POLL_MAX_S)

    def _download(self, original: Location, record: FileRecord, data: str) -> bool:
        """Download ``original`` into ``data`` (the caller holds the entry's lock
        exclusively); ``False`` when it does not fit."""
        stem = data[: -len(".data")]
        for stale in glob.glob(glob.escape(stem) + ".tmp-*"):  # a dead downloader's
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        if not self._make_room(record.nbytes, keep=os.path.basename(stem)):
            _warn_once(self.root, f"no room for {record.nbytes} bytes of {original.url}")
            return False
        tmp = f"{stem}.tmp-{os.getpid()}-{threading.get_ident():x}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            got = self._fill(fd, original, record.nbytes)
            check_crc(got, record.crc32c, original.url)
            os.fchmod(fd, 0o444)  # written once: nobody changes an entry in place
            os.rename(tmp, data)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        logger.debug(
            "node cache: downloaded %s (%d bytes) into %s", original.url, record.nbytes, data
        )
        return True

    @staticmethod
    def _fill(fd: int, original: Location, nbytes: int) -> str:
        """Read the whole object into the temp file ``fd`` (space reserved first: a full
        tmpfs is an ``OSError`` here, not a ``SIGBUS`` in the mapping); its CRC-32C."""
        if nbytes == 0:
            return f"{crc32c_value(b''):08x}"
        os.posix_fallocate(fd, 0, nbytes)
        checksums = Checksums()

        def on_range(rr: RangeRead) -> None:
            checksums.add(rr)
            os.utime(fd)  # progress, for the node's waiting ranks

        mapping = mmap.mmap(fd, nbytes)
        try:
            view = memoryview(mapping)
            try:
                original.read_scattered([(0, view)], on_range=on_range)
            finally:
                view.release()
            return checksums.file_crc(b"", nbytes, original.url)
        finally:
            with contextlib.suppress(BufferError):  # a range view still referenced: GC frees it
                mapping.close()

    def _make_room(self, nbytes: int, *, keep: str) -> bool:
        """Evict (module doc) until ``nbytes`` more fit; whether they do."""
        st = os.statvfs(self.root)
        fs_size = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        cap = knobs.NODE_CACHE_MAX_BYTES.get() or fs_size // 2
        reserve = fs_size // _FREE_RESERVE
        max_age = knobs.NODE_CACHE_MAX_AGE_S.get()
        ckpt_prefix = keep.split("-", 1)[0]
        entries = []
        for path in glob.glob(os.path.join(glob.escape(self.root), "*.data")):
            with contextlib.suppress(OSError):
                s = os.stat(path)
                entries.append((s.st_mtime, path[: -len(".data")], s.st_size))
        used = sum(size for _, _, size in entries)
        now = time.time()
        for mtime, stem, size in sorted(entries):
            if os.path.basename(stem) == keep:
                continue
            stale = not os.path.basename(stem).startswith(ckpt_prefix) and now - mtime > max_age
            tight = used + nbytes > cap or free - nbytes < reserve
            if (stale or tight) and _evict(stem):
                used -= size
                free += size
        return used + nbytes <= cap and free - nbytes >= reserve


def _use(data: str) -> bool:
    """Mark an entry used now (eviction goes by it); ``False`` if it is gone."""
    try:
        os.utime(data)
    except FileNotFoundError:
        return False
    return True


def _evict(stem: str) -> bool:
    """Delete one entry unless another process holds its lock; whether it was deleted."""
    lock = stem + ".lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    try:
        if fd >= 0 and not (_try_lock(fd, fcntl.LOCK_EX) and _same_file(fd, lock)):
            return False
        for path in [stem + ".data", *glob.glob(glob.escape(stem) + ".tmp-*"), lock]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        logger.debug("node cache: evicted %s", stem)
        return True
    finally:
        if fd >= 0:
            os.close(fd)


def _local(data: str, original: Location) -> Location:
    """The local copy, named in messages by the object it copies."""
    return replace(Location.parse(data), url=f"{original.url} (node cache copy {data})")


class CachedFiles:
    """The files of one component as a loading rank reads them: a file of the manifest
    from its node cache entry (downloaded on first use), anything else from storage.
    Holds a shared lock on each entry used until :meth:`close`."""

    def __init__(self, cache: NodeCache, ckpt: Location, manifest: Manifest) -> None:
        self._cache = cache
        self._ckpt = ckpt
        self._manifest = manifest
        self._entries: dict[str, _Entry | None] = {}
        self._lock = threading.Lock()

    def location(self, file: str) -> Location:
        """Where to read ``file`` (relative to the checkpoint) from."""
        original = self._ckpt.join(file)
        with self._lock:
            if file not in self._entries:
                record = self._manifest.file(file)
                self._entries[file] = (
                    None
                    if record is None
                    else self._cache.acquire(original, self._ckpt.url, record)
                )
            entry = self._entries[file]
        return original if entry is None else entry.location

    def verified(self, file: str) -> bool:
        """Whether ``file`` is read from a cache entry (its CRC-32C checked on download)."""
        with self._lock:
            return self._entries.get(file) is not None

    def close(self) -> None:
        """Release the entries (their mapped tensors survive an eviction)."""
        with self._lock:
            for entry in self._entries.values():
                if entry is not None:
                    entry.release()
            self._entries.clear()
