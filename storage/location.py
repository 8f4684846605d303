"""``Location``: one file or directory on any fsspec filesystem, named by a path or URL.

Everything above this layer passes ``Location`` objects around instead of
``(fs, path)`` pairs, so that error messages always carry the user's URL and local
files get the fast, durable code path (raw ``os`` calls, fsync, ``os.replace``).

``Location`` is the one face of the storage layer; each of its jobs lives in a helper it
imports (which sees ``Location`` only as a type): ``fs`` (resolving URLs, listing
entries, the sink contract), ``sinks`` / ``multipart`` / ``resumable`` (streaming writes),
``atomic`` (``publish``, ``create_exclusive``), ``reads`` (ranged and scattered reads),
``copies`` (server-side copies), ``deletes`` (``remove``, ``remove_children``). Hook
points (:mod:`ckptsvc.hooks`) run here, around the helpers.
"""

from __future__ import annotations

import base64
import os
import posixpath
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fsspec import AbstractFileSystem

from ckptsvc import hooks, knobs
from ckptsvc.errors import (
    ConfigError,
    CorruptCheckpointError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
)

from . import atomic, deletes
from .copies import CopyMethod, copy_file
from .errors import storage_errors
from .fs import (
    GCS_PROTOCOLS,
    S3_PROTOCOLS,
    ChildInfo,
    ShardSink,
    is_local_fs,
    listing_time,
    url_to_fs,
)
from .io_settings import IOSettings
from .reads import OnRange, RangeRead, plan_reads, read_ranges
from .retry import RetryPolicy, call_with_retries
from .sinks import open_sink

__all__ = ["Location"]


@dataclass(frozen=True)
class Location:
    """A file or directory: the filesystem, its native path, and the URL the user gave.

    Create with :meth:`parse`; derive children with :meth:`join`. ``storage_options`` is
    kept so that another process (the node writer) can rebuild the same filesystem.
    """

    fs: AbstractFileSystem = field(repr=False, compare=False)
    path: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    settings: IOSettings | None = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(
        cls,
        url: str | os.PathLike[str] | Location,
        storage_options: dict[str, Any] | None = None,
        *,
        settings: IOSettings | None = None,
    ) -> Location:
        """The location of ``url``; with ``settings`` (:class:`~.io_settings.IOSettings`),
        every write and request made through it (and its ``join``/``parent``) uses those
        instead of the ``CKPTSVC_*`` knobs."""
        if isinstance(url, Location):
            return url if settings is None else replace(url, settings=settings)
        opts = dict(storage_options or {})
        fs, path = url_to_fs(url, **opts)
        text = os.fspath(url)
        if is_local_fs(fs):
            path = os.path.abspath(path)
            text = path if "://" not in text else text
        return cls(
            fs=fs,
            path=path.rstrip("/") or "/",
            url=text.rstrip("/") or text,
            storage_options=opts,
            settings=settings,
        )

    def retry_policy(self) -> RetryPolicy:
        """The retry policy of requests made through this location: its ``settings``'s,
        else the ``CKPTSVC_RETRY_*`` knobs (read now)."""
        return self.settings.retry if self.settings is not None else RetryPolicy.from_knobs()

    # ---- naming --------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return is_local_fs(self.fs)

    @property
    def protocol(self) -> str:
        p = self.fs.protocol
        return p[0] if isinstance(p, (tuple, list)) else str(p)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> Location:
        return Location(
            fs=self.fs,
            path=posixpath.dirname(self.path.rstrip("/")) or "/",
            url=self.url.rstrip("/").rsplit("/", 1)[0] if "/" in self.url.rstrip("/") else self.url,
            storage_options=self.storage_options,
            settings=self.settings,
        )

    def join(self, *parts: str) -> Location:
        """A child location. Each part must be a relative name without ``..``."""
        path, url = self.path, self.url
        for part in parts:
            for piece in part.split("/"):
                if piece in ("", ".", "..") or "\\" in piece or "\x00" in piece:
                    raise ConfigError(f"unsafe path component {part!r} under {self.url}")
            path = posixpath.join(path, part)
            url = f"{url.rstrip('/')}/{part}"
        return Location(
            fs=self.fs,
            path=path,
            url=url,
            storage_options=self.storage_options,
            settings=self.settings,
        )

    def __str__(self) -> str:
        return self.url

    # ---- queries -------------------------------------------------------------------------
    def exists(self) -> bool:
        """True if the file or directory exists. A store that refuses to say (403, an
        outage) raises its ``StorageError``: fsspec's ``exists`` would answer False."""
        if self.is_local:
            return os.path.exists(self.path)

        def _exists() -> bool:
            try:
                self.fs.info(self.path)
            except FileNotFoundError:
                return False
            return True

        return bool(
            call_with_retries(_exists, url=self.url, policy=self.retry_policy(), action="stat")
        )

    def isdir(self) -> bool:
        if self.is_local:
            return os.path.isdir(self.path)
        return bool(
            call_with_retries(
                lambda: self.fs.isdir(self.path),
                url=self.url,
                policy=self.retry_policy(),
                action="stat",
            )
        )

    def size(self) -> int:
        if self.is_local:
            with storage_errors(self.url, "stat"):
                return os.path.getsize(self.path)
        return int(
            call_with_retries(
                lambda: self.fs.size(self.path),
                url=self.url,
                policy=self.retry_policy(),
                action="stat",
            )
        )

    def stored_crc32c(self) -> str | None:
        """The CRC-32C the store itself keeps for this object, as 8 hex digits (GCS does,
        for every object); ``None`` where the store keeps none (local, S3, ...)."""
        if self.protocol not in GCS_PROTOCOLS:
            return None
        self.fs.invalidate_cache(self.path)
        info = call_with_retries(
            lambda: self.fs.info(self.path), url=self.url, policy=self.retry_policy(), action="stat"
        )
        raw = info.get("crc32c")
        return base64.b64decode(raw).hex() if raw else None

    def list_children(self) -> list[ChildInfo]:
        """One listing of the direct children (a single paginated LIST on object stores)."""
        if self.is_local:
            out: list[ChildInfo] = []
            with storage_errors(self.url, "list"), os.scandir(self.path) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    is_dir = entry.is_dir(follow_symlinks=False)
                    out.append(ChildInfo(entry.name, is_dir, st.st_size, st.st_mtime))
            return out

        def _ls() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(self.path)
            return list(self.fs.ls(self.path, detail=True))

        entries = call_with_retries(_ls, url=self.url, policy=self.retry_policy(), action="list")
        result = []
        for info in entries:
            name = posixpath.basename(str(info["name"]).rstrip("/"))
            if not name or str(info["name"]).rstrip("/") == self.path.rstrip("/"):
                continue
            mtime = listing_time(
                info.get("mtime")  # local, sftp, ...
                or info.get("LastModified")  # S3
                or info.get("updated")  # GCS
                or info.get("created")  # memory://
            )
            is_dir = info.get("type") == "directory"
            result.append(ChildInfo(name, is_dir, int(info.get("size") or 0), mtime))
        return result

    # ---- reads ---------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        if self.is_local:
            with storage_errors(self.url, "read"), open(self.path, "rb") as f:
                return f.read()
        # s3fs would HEAD the object first to split big reads: one GET is enough here
        kwargs = {"max_concurrency": 1} if self.protocol in S3_PROTOCOLS else {}
        return bytes(
            call_with_retries(
                lambda: self.fs.cat_file(self.path, **kwargs),
                url=self.url,
                policy=self.retry_policy(),
                action="read",
            )
        )

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``; may return fewer at end of file."""
        if end <= start:
            return b""
        if self.is_local:
            with storage_errors(self.url, "read"):
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    return os.pread(fd, end - start, start)
                finally:
                    os.close(fd)
        try:
            return bytes(
                call_with_retries(
                    lambda: self.fs.cat_file(self.path, start=start, end=end),
                    url=self.url,
                    policy=self.retry_policy(),
                    action="read",
                )
            )
        except (StorageNotFoundError, StoragePermissionError):
            raise
        except StorageError:
            # S3 and GCS answer 416 for a range that starts at or after the end of the
            # object; that is a short read like the local one, not a storage failure.
            if start >= self.size():
                return b""
            raise

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the file's bytes from ``offset``; raise if the file is shorter."""
        if out.format != "B" or out.ndim != 1:
            out = out.cast("B")  # offsets below count bytes, whatever the element type
        if not self.is_local:
            self.read_scattered([(offset, out)])  # parallel ranges; raises if the file is short
            return
        want = out.nbytes
        with storage_errors(self.url, "read"):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                done = 0
                step = knobs.READ_CHUNK_BYTES.get()
                while done < want:
                    n = os.preadv(fd, [out[done : done + step]], offset + done)
                    if n == 0:
                        break
                    done += n
            finally:
                os.close(fd)
        if done != want:
            raise CorruptCheckpointError(
                f"{self.url}: file is truncated (wanted bytes {offset}..{offset + want}, got {done})"
            )

    def read_scattered(
        self,
        extents: Sequence[tuple[int, memoryview]],
        *,
        in_flight: int | None = None,
        on_range: OnRange | None = None,
        direct: bool = False,
    ) -> None:
        """Fill each view with the file's bytes from its offset, in parallel ranged reads.

        Nearby extents share one request and huge ones are split (``storage.reads``);
        on object stores the bytes go from the response straight into the views.
        ``on_range`` and ``direct``: see :func:`ckptsvc.storage.reads.read_ranges`.
        Raises ``CorruptCheckpointError`` if the file ends before an extent does.
        """
        if in_flight is None:
            in_flight = (
                knobs.IO_THREADS.get() if self.is_local else knobs.READ_RANGES_IN_FLIGHT.get()
            )
        reads: list[RangeRead] = plan_reads(
            extents,
            max_range_bytes=knobs.READ_CHUNK_BYTES.get(),
            max_gap_bytes=knobs.READ_COALESCE_GAP_BYTES.get(),
            min_ranges=in_flight,
        )
        read_ranges(self, reads, in_flight=in_flight, on_range=on_range, direct=direct)

    # ---- writes --------------------------------------------------------------------------
    def makedirs(self) -> None:
        if self.is_local:
            with storage_errors(self.url, "create directory"):
                os.makedirs(self.path, exist_ok=True)
        elif self.protocol in ("memory", "file"):
            with storage_errors(self.url, "create directory"):
                self.fs.makedirs(self.path, exist_ok=True)
        # object stores have no directories: nothing to create

    def publish(self, data: bytes) -> None:
        """Atomically make ``data`` the file's content: readers see old or new, never torn.

        Local: temp file in the same directory, fsync, ``os.replace``, fsync the directory.
        Object stores: one PUT, which S3 and GCS make visible atomically.
        """
        hooks.point("publish.before", name=self.name, url=self.url)
        self._publish(data)
        hooks.point("publish.after", name=self.name, url=self.url)

    def _publish(self, data: bytes) -> None:
        atomic.publish(self, data)

    def create_exclusive(self, data: bytes) -> bool:
        """Create the file with ``data`` only if it does not exist; ``False`` if it did.

        Local: ``O_CREAT | O_EXCL``, fsync, directory fsync. S3 and GCS: a conditional PUT
        (``If-None-Match: *`` / ``ifGenerationMatch=0``), so of two writers exactly one
        wins. Other filesystems have no conditional write: an existence check, then a
        write (two writers racing within one round trip could both win; logged once).
        """
        hooks.point("publish.before", name=self.name, url=self.url)  # a claim: a publish too
        created = self._create_exclusive(data)
        hooks.point("publish.after", name=self.name, url=self.url)
        return created

    def _create_exclusive(self, data: bytes) -> bool:
        return atomic.create_exclusive(self, data)

    def mtime_s(self) -> float | None:
        """Last modification time in seconds since the epoch (``None`` if not reported)."""
        if self.is_local:
            with storage_errors(self.url, "stat"):
                return os.stat(self.path, follow_symlinks=False).st_mtime

        def _info() -> dict[str, Any]:
            self.fs.invalidate_cache(self.path)
            return dict(self.fs.info(self.path))

        info = call_with_retries(_info, url=self.url, policy=self.retry_policy(), action="stat")
        return listing_time(
            info.get("mtime")
            or info.get("LastModified")
            or info.get("updated")
            or info.get("created")
        )

    def open_sink(
        self,
        *,
        fsync: bool | None = None,
        part_size_bytes: int | None = None,
        parts_in_flight: int | None = None,
        direct_io: str | bool | None = None,
        size_hint_bytes: int | None = None,
        stable_source: bool = False,
    ) -> ShardSink:
        """A streaming writer: local files are fsynced on close (``O_DIRECT`` per
        ``direct_io`` / ``size_hint_bytes``); S3 gets a parallel multipart upload, GCS a
        pipelined resumable one (see ``storage.sinks``). ``stable_source``: the caller's
        buffers stay valid and unchanged until ``close``/``abort`` (see ``open_sink``)."""
        sink = open_sink(
            self,
            fsync=fsync,
            part_size_bytes=part_size_bytes,
            parts_in_flight=parts_in_flight,
            direct_io=direct_io,
            size_hint_bytes=size_hint_bytes,
            stable_source=stable_source,
        )
        return hooks.wrap("sink.open", sink, name=self.name, url=self.url)

    def remove(self, *, recursive: bool = False, missing_ok: bool = True) -> None:
        """Delete the file (with ``recursive``: the whole directory tree).

        A missing target is fine unless ``missing_ok=False`` (then ``StorageNotFoundError``).
        """
        info = {"name": self.name, "url": self.url, "recursive": recursive}
        hooks.point("remove.before", **info)
        deletes.remove(self, recursive=recursive, missing_ok=missing_ok)
        hooks.point("remove.after", **info)

    def remove_children(self, *, keep: Collection[str] = ()) -> None:
        """Delete everything below this directory except its direct children named in
        ``keep`` (batched on S3; the directory itself stays). Retention uses it to delete
        a checkpoint's data while its in-progress marker still stands."""
        deletes.remove_children(self, keep=keep)

    def copy_to(self, dst: Location, *, allow_plain_copy: bool = True) -> CopyMethod | None:
        """Copy this file to ``dst`` on the same store without moving the bytes through
        this process where the store allows: hard link, S3 CopyObject, GCS rewrite
        (``storage.copies.copy_file``; ``None``: only a plain copy was possible and it
        was not allowed)."""
        return copy_file(self, dst, allow_plain_copy=allow_plain_copy)

    def walk_files(self) -> Iterator[tuple[str, int]]:
        """(relative path, size) of every file below this directory."""
        found: dict[str, dict[str, Any]] = call_with_retries(
            lambda: self.fs.find(self.path, detail=True),
            url=self.url,
            policy=self.retry_policy(),
            action="list",
        )
        base = self.path.rstrip("/") + "/"
        for name, info in sorted(found.items()):
            rel = name[len(base) :] if name.startswith(base) else posixpath.basename(name)
            yield rel, int(info.get("size") or 0)
