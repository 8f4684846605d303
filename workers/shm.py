"""Shared-memory segments, the writer's half of a staging arena (torch-free).

The trainer creates segments (``ckptsvc.stage.arena.ArenaPool``) and is their only owner;
the node writer (``workers/node_writer.py``) attaches to them read-only. Both run this:

1. :func:`new_segment_name` (trainer) names a segment
   ``ckptsvc-<node>-<pidns>-<pid>-<serial>``: owner pid and pid namespace, so that
2. :func:`reclaim_stale_segments` (the writer: its node's, when a trainer's connection
   closes and periodically; a new trainer pool: every node's, at its first arena) can
   unlink the segments of owners killed before they could (:func:`stale_segments`).
3. :class:`ShmSegment` ``create`` (trainer: fallocate, pre-faulted mapping) or ``attach``
   (writer: read-only, never through ``multiprocessing``'s resource tracker, which would
   unlink the segment when the writer exits).

The directory is ``CKPTSVC_SHM_DIR`` (default ``/dev/shm``) unless a caller names one.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import mmap
import os
import re

from ckptsvc import knobs
from ckptsvc.errors import StorageError
from ckptsvc.liveness import pid_alive, pid_namespace

__all__ = [
    "PREFIX",
    "ShmSegment",
    "new_segment_name",
    "pid_alive",
    "reclaim_stale_segments",
    "segment_prefix",
    "stale_segments",
]

logger = logging.getLogger(__name__)

PREFIX = "ckptsvc"
_serial = itertools.count()


# ---- naming and liveness -------------------------------------------------------------------


def segment_prefix(node: str) -> str:
    """Names of this pid namespace's segments for ``node`` start with this."""
    return f"{PREFIX}-{node}-{pid_namespace()}-"


def new_segment_name(node: str) -> str:
    return f"{segment_prefix(node)}{os.getpid()}-{next(_serial)}"


#: ``ckptsvc-<node>-<pidns>-<pid>-<serial>``, parsed from the right (a node id given
#: to :func:`segment_prefix` directly may hold dashes; :func:`~ckptsvc.workers.identity.node_id` never makes one)
_SEGMENT_RE = re.compile(rf"^{PREFIX}-(?P<node>.+)-(?P<pidns>\d+)-(?P<pid>\d+)-(?P<serial>\d+)$")


def stale_segments(node: str | None = None, *, shm_dir: str | None = None) -> list[str]:
    """Names (sorted) of the segments in the shm directory whose owner process is dead:
    of ``node``, or of every node when ``node`` is ``None``. Only this pid namespace's
    segments are considered (a pid means nothing in another); this process's, a live
    process's and names that are not ours are never listed."""
    directory = knobs.SHM_DIR.get(shm_dir)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    pidns = pid_namespace()
    stale = []
    for name in sorted(names):
        m = _SEGMENT_RE.match(name)
        if m is None or m["pidns"] != pidns or (node is not None and m["node"] != node):
            continue
        owner = int(m["pid"])
        if owner != os.getpid() and owner > 0 and not pid_alive(owner):
            stale.append(name)
    return stale


def reclaim_stale_segments(node: str | None, *, shm_dir: str | None = None) -> list[str]:
    """Unlink the segments of ``node`` (every node's when ``None``) whose owner process is
    dead (:func:`stale_segments`); return their names. One that another user owns (and
    we may not unlink) is left alone."""
    directory = knobs.SHM_DIR.get(shm_dir)
    reclaimed = []
    for name in stale_segments(node, shm_dir=directory):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            continue  # someone else reclaimed it first
        except PermissionError as e:
            logger.debug("cannot unlink stale segment %s: %s", name, e)
            continue
        reclaimed.append(name)
    if reclaimed:
        logger.info(
            "reclaimed %d shared-memory segments of dead processes: %s", len(reclaimed), reclaimed
        )
    return reclaimed


# ---- one segment ---------------------------------------------------------------------------


def _no_space(nbytes: int, directory: str, free: int) -> StorageError:
    return StorageError(
        f"not enough shared memory for a {nbytes / 2**20:.1f} MiB staging arena in {directory} "
        f"({free / 2**20:.1f} MiB free). Give the container more: `docker run --shm-size=<N>g`, "
        "or in Kubernetes mount an `emptyDir: {medium: Memory, sizeLimit: <N>Gi}` at /dev/shm; "
        "or set CKPTSVC_SHM_DIR to a local-disk directory (slower), or use fewer arenas "
        "(arenas_per_rank=1), or stage in pieces within a smaller budget "
        "(memory_budget_bytes=<bytes>, CKPTSVC_MEMORY_BUDGET_BYTES)",
        url=directory,
    )


class ShmSegment:
    """A named shared-memory file mapped into this process.

    1. ``create`` (trainer): O_EXCL create, ``posix_fallocate`` (fails cleanly when
       /dev/shm is too small, where touching pages would SIGBUS), map pre-faulted;
       or ``attach`` (writer): map an existing segment read-only, untracked.
    2. ``buffer`` is the mapping; callers slice ``memoryview(segment.buffer)``.
    3. ``close`` unmaps (callers must drop every view first); the owner calls ``unlink``.
    """

    def __init__(self, name: str, path: str, buffer: mmap.mmap, *, owner: bool) -> None:
        self.name = name
        self.path = path
        self.buffer = buffer
        self.nbytes = len(buffer)
        self.owner = owner

    @classmethod
    def create(cls, name: str, nbytes: int, *, shm_dir: str | None = None) -> ShmSegment:
        directory = knobs.SHM_DIR.get(shm_dir)
        path = os.path.join(directory, name)
        try:
            st = os.statvfs(directory)
        except OSError as e:
            raise StorageError(
                f"cannot use {directory} for shared memory: {e}", url=directory
            ) from e
        free = st.f_bavail * st.f_frsize
        if nbytes > free:
            raise _no_space(nbytes, directory, free)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise _no_space(nbytes, directory, free) from e
                os.ftruncate(fd, nbytes)  # filesystems without fallocate
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            buffer = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        os.close(fd)
        return cls(name, path, buffer, owner=True)

    @classmethod
    def attach(cls, name: str, *, shm_dir: str | None = None) -> ShmSegment:
        """Map an existing segment read-only. Never unlinks it (``owner`` is False)."""
        directory = knobs.SHM_DIR.get(shm_dir)
        if "/" in name or name in ("", ".", ".."):
            raise StorageError(f"invalid shared-memory segment name {name!r}", url=directory)
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_RDONLY)
        try:
            nbytes = os.fstat(fd).st_size
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            buffer = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(name, path, buffer, owner=False)

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.buffer.close()

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
