"""S3 multipart uploads, several parts in flight, with bounded memory (the ``ShardSink``
for s3://; GCS's twin is :mod:`.resumable`).

The sink copies the caller's chunks into part buffers (one memcpy; the caller may reuse
its memory as soon as ``write`` returns) and hands full parts to s3fs's event loop, so
storage latency overlaps with producing the next part. With ``stable_source`` (the
caller's memory stays valid and unchanged until ``close``: the node writer's arena, a
synchronous save's tensors) it copies nothing: a part is the list of views of the
chunks that make it up (:class:`~.part_buffer.PartGatherer`). On the development VM a
256 MiB async save to SeaweedFS took 1.5-1.6x the time of s3fs putting the same bytes as
four objects while the writer allocated and filled five fresh 64 MiB part buffers per
file and save; gathering views, 0.7-0.9x (docs/benchmarks.md, sixth pass). A part goes
to botocore as a file-like view (:class:`~.part_buffer.PartBody`), which aiohttp streams
in 64 KiB reads (a ``bytes`` body would be copied whole, twice, while in flight). Each
request (a part, the creation, the completion) is retried on its own with backoff
(:mod:`.retry`); a failure never re-sends the whole file. A file that fits in one part goes as one PutObject.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from fsspec.asyn import sync

from ckptsvc.errors import StorageError, StorageNotFoundError

from .part_buffer import PartBody, PartFiller, PartGatherer
from .retry import acall_with_retries, call_with_retries

if TYPE_CHECKING:
    from .location import Location

__all__ = [
    "S3_MAX_PARTS",
    "S3_MIN_PART_BYTES",
    "PartBody",
    "S3MultipartSink",
    "on_loop",
    "part_size_for",
]

logger = logging.getLogger(__name__)
R = TypeVar("R")

S3_MIN_PART_BYTES = 5 * 2**20  # S3 rejects smaller parts (except the last)
S3_MAX_PARTS = 10_000
_ABORT_WAIT_S = 300.0
#: an abort that failed is tried again in the background for this long, a pause between
_ABORT_LATER_S = 1800.0
_ABORT_LATER_PAUSE_S = 1.0


_PART_ROUND_BYTES = 2**20


def part_size_for(
    size_hint_bytes: int | None, *, part_size_bytes: int, parts_in_flight: int
) -> int:
    """The part size for a file of about ``size_hint_bytes``: ``part_size_bytes`` at most,
    but small enough that the file fills ``parts_in_flight`` parts (so one big shard
    uploads that many parts at once, however many shards the checkpoint has), never below
    S3's 5 MiB minimum, and big enough that the file fits in 10,000 parts. Rounded up to a
    MiB. Without a hint: ``part_size_bytes`` (at least the minimum)."""
    part = max(part_size_bytes, S3_MIN_PART_BYTES)
    if size_hint_bytes is None or size_hint_bytes <= 0:
        return part

    def round_up(n: int) -> int:
        return -(-n // _PART_ROUND_BYTES) * _PART_ROUND_BYTES

    spread = round_up(-(-size_hint_bytes // max(1, parts_in_flight)))
    part = max(S3_MIN_PART_BYTES, min(part, spread))
    return max(part, round_up(-(-size_hint_bytes // S3_MAX_PARTS)))


class _UploadAborted(StorageError):
    """Raised inside a part upload that starts (or retries) after ``abort``: never retried."""


def on_loop(fs: Any, make: Callable[[], Awaitable[R]]) -> Future[R]:
    """Schedule the coroutine ``make()`` on the filesystem's event loop thread."""
    return asyncio.run_coroutine_threadsafe(_await(make), fs.loop)


async def _await(make: Callable[[], Awaitable[R]]) -> R:
    return await make()


async def _s3_request(fs: Any, method: str, **kwargs: Any) -> Any:
    """One attempt of an S3 API call, as s3fs makes it (its session, region-aware client
    and ``s3_additional_kwargs`` such as server-side encryption) but without s3fs's own
    retry loop: every attempt is then visible to (and bounded by) ckptsvc's retries, and
    a retried CreateMultipartUpload is known to have maybe left a stray upload."""
    from s3fs.errors import translate_boto_error

    await fs.set_session()
    client = await fs.get_s3(kwargs.get("Bucket"))
    call = getattr(client, method)
    try:
        return await call(**fs._get_s3_method_kwargs(call, **kwargs))
    except Exception as e:
        translated = translate_boto_error(e)
        if translated is e:
            raise
        raise translated from e


class S3MultipartSink:
    """One S3 object written as a parallel multipart upload with bounded memory.

    Parts are ``part_size_bytes`` (:func:`part_size_for` picks them from the file's
    expected size in ``open_sink``).

    1. ``write`` (the caller's thread) copies bytes into the current part buffer (with
       ``stable_source``: appends views of them to the current part). When it
       is full and more bytes follow, the first full part creates the upload
       (CreateMultipartUpload, blocking) and each full part becomes an UploadPart
       coroutine on the filesystem's event loop, once fewer than ``parts_in_flight``
       are uploading (``write`` waits); then ``write`` fills a free buffer. Memory stays
       at most ``(parts_in_flight + 1) * part_size_bytes`` (none with ``stable_source``).
    2. ``close`` (the caller's thread): a file that never filled a part is one PutObject;
       otherwise the last part is sent, every part awaited, and CompleteMultipartUpload
       makes the object visible. Any failure aborts the upload before raising.
    3. ``abort`` (the caller's thread, any time): parts not yet started are skipped,
       running ones finish, then AbortMultipartUpload; nothing stays behind (an abort
       that fails is retried on a background thread until the store answers).
    """

    def __init__(
        self,
        loc: Location,
        *,
        part_size_bytes: int,
        parts_in_flight: int,
        stable_source: bool = False,
    ) -> None:
        self._loc = loc
        self._fs: Any = loc.fs
        self._bucket, self._key, _ = self._fs.split_path(loc.path)
        self._part_nbytes = max(part_size_bytes, S3_MIN_PART_BYTES)
        self._max_in_flight = max(1, parts_in_flight)
        self._max_buffers = self._max_in_flight + 1
        self._policy = loc.retry_policy()
        self._cond = threading.Condition()
        self._free: list[bytearray] = []  # guarded by _cond, like the four below
        self._nbuffers = 0
        self._in_flight = 0
        self._parts: dict[int, dict[str, Any]] = {}
        self._error: BaseException | None = None
        self._aborting = False
        self._filler: PartFiller | PartGatherer = (
            PartGatherer(part_nbytes=self._part_nbytes, on_full=self._send_part)
            if stable_source
            else PartFiller(take=self._take_buffer, on_full=self._send_buffer)
        )
        self._upload_id: str | None = None
        self._create_tries = 0
        self._next_part = 1
        self._state = "open"  # -> "closed" | "aborted"

    def _s3(self, method: str, **kwargs: Any) -> Any:
        """One S3 request from the caller's thread (blocking), without s3fs's retries."""
        return sync(self._fs.loop, _s3_request, self._fs, method, **kwargs)

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "open" and getattr(self, "_upload_id", None):
            logger.warning(
                "the upload of %s was neither closed nor aborted; its multipart upload stays "
                "until the bucket's AbortIncompleteMultipartUpload lifecycle rule removes it",
                self._loc.url,
            )

    # ---- step 1 ------------------------------------------------------------------------
    def write(self, data: memoryview | bytes) -> None:
        if self._state != "open":
            raise ValueError(f"{self._loc.url}: write after close or abort")
        self._filler.write(data)

    def _take_buffer(self) -> bytearray:
        with self._cond:
            while True:
                self._raise_if_failed()
                if self._free:
                    return self._free.pop()
                if self._nbuffers < self._max_buffers:
                    self._nbuffers += 1
                    break
                self._cond.wait()
        return bytearray(self._part_nbytes)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _send_buffer(self, buf: bytearray, nbytes: int) -> None:
        self._send_part((memoryview(buf)[:nbytes],), nbytes, buf=buf)

    def _send_part(
        self, views: tuple[memoryview, ...], nbytes: int, *, buf: bytearray | None = None
    ) -> None:
        """Upload a part (``views``, ``nbytes`` in all) on the loop; ``buf``: the part
        buffer they are views of, freed for the next part once the upload ends."""
        if self._upload_id is None:

            def create() -> Any:
                self._create_tries += 1
                return self._s3("create_multipart_upload", Bucket=self._bucket, Key=self._key)

            out = call_with_retries(
                create, url=self._loc.url, policy=self._policy, action="start multipart upload of"
            )
            self._upload_id = str(out["UploadId"])
        number = self._next_part
        if number > S3_MAX_PARTS:
            raise StorageError(
                f"{self._loc.url}: more than {S3_MAX_PARTS} parts of "
                f"{self._part_nbytes} bytes; raise CKPTSVC_PART_SIZE_BYTES or the shard count",
                url=self._loc.url,
            )
        self._next_part += 1
        with self._cond:
            while self._in_flight >= self._max_in_flight:
                self._raise_if_failed()
                self._cond.wait()
            self._raise_if_failed()
            self._in_flight += 1
        on_loop(self._fs, lambda: self._upload_part(number, views, buf))

    async def _upload_part(
        self, number: int, views: tuple[memoryview, ...], buf: bytearray | None
    ) -> None:
        upload_id = self._upload_id

        def attempt() -> Awaitable[Any]:
            if self._aborting:
                raise _UploadAborted(f"upload of {self._loc.url} aborted", url=self._loc.url)
            return _s3_request(
                self._fs,
                "upload_part",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=upload_id,
                PartNumber=number,
                Body=PartBody(views),  # a fresh reader per attempt
            )

        try:
            out = await acall_with_retries(
                attempt, url=self._loc.url, action=f"upload part {number} of", policy=self._policy
            )
            part = {"PartNumber": number, "ETag": out["ETag"]}
            if "ChecksumSHA256" in out:
                part["ChecksumSHA256"] = out["ChecksumSHA256"]
            with self._cond:
                self._parts[number] = part
        except Exception as e:
            with self._cond:
                if self._error is None and not isinstance(e, _UploadAborted):
                    self._error = e
        finally:
            with self._cond:
                self._in_flight -= 1
                if buf is not None:
                    self._free.append(buf)
                self._cond.notify_all()

    # ---- step 2 ------------------------------------------------------------------------
    def close(self) -> None:
        if self._state != "open":
            return
        last, fill = self._filler.take_last()
        if isinstance(last, tuple):  # gathered views
            views, buf = last, None
        else:
            views, buf = (memoryview(last or bytearray())[:fill],), last
        try:
            if self._upload_id is None:
                self._put_whole(views)
            else:
                if fill:
                    self._send_part(views, fill, buf=buf)
                self._wait_parts()
                self._complete()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._abort_strays()
        self._loc.fs.invalidate_cache(self._loc.path)

    def _put_whole(self, views: tuple[memoryview, ...]) -> None:
        call_with_retries(
            lambda: self._s3(
                "put_object", Bucket=self._bucket, Key=self._key, Body=PartBody(views)
            ),
            url=self._loc.url,
            policy=self._policy,
            action="upload",
        )

    def _wait_parts(self) -> None:
        with self._cond:
            while self._in_flight:
                self._cond.wait()
            self._raise_if_failed()

    def _complete(self) -> None:
        parts = [self._parts[n] for n in sorted(self._parts)]
        tries = 0

        def complete() -> Any:
            nonlocal tries
            tries += 1
            return self._s3(
                "complete_multipart_upload",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )

        try:
            call_with_retries(
                complete, url=self._loc.url, policy=self._policy, action="complete upload of"
            )
        except StorageNotFoundError:
            # A retry after a completion whose answer was lost finds no upload any more:
            # that is success if the object is there.
            if tries < 2 or not self._loc.exists():
                raise
            logger.info("completion of %s was answered late; the object exists", self._loc.url)

    # ---- step 3 ------------------------------------------------------------------------
    def abort(self) -> None:
        """Stop the upload and delete its parts (never raises)."""
        if self._state != "open":
            return
        self._state = "aborted"
        deadline = time.monotonic() + _ABORT_WAIT_S
        with self._cond:
            self._aborting = True
            while self._in_flight and time.monotonic() < deadline:
                self._cond.wait(timeout=1.0)
            if self._in_flight:
                logger.warning(
                    "%d parts of %s still uploading after %.0fs; aborting anyway",
                    self._in_flight,
                    self._loc.url,
                    _ABORT_WAIT_S,
                )
            self._free.clear()
        self._filler.take_last()
        if self._upload_id is not None:
            try:
                self._abort_upload(self._upload_id)
            except Exception as e:  # report, but let the caller's original error propagate
                logger.warning(
                    "could not abort the multipart upload of %s (%s); trying again in the "
                    "background for %.0f s",
                    self._loc.url,
                    e,
                    _ABORT_LATER_S,
                )
                self._abort_later(self._upload_id)
        self._abort_strays()

    def _abort_later(self, upload_id: str) -> None:
        """The abort failed (the store is down longer than the retries last): keep trying
        on a daemon thread, so an outage that fails a save leaves no upload behind once the
        store is back (gc, or the bucket's lifecycle rule, covers a process that exits)."""

        def run() -> None:
            deadline = time.monotonic() + _ABORT_LATER_S
            while True:
                time.sleep(_ABORT_LATER_PAUSE_S)
                try:
                    self._abort_upload(upload_id)
                except Exception as e:
                    if time.monotonic() < deadline:
                        continue
                    logger.warning("gave up aborting the upload of %s: %s", self._loc.url, e)
                    return
                logger.info("aborted the upload of the failed save of %s", self._loc.url)
                return

        threading.Thread(target=run, name="ckptsvc-abort-later", daemon=True).start()

    def _abort_upload(self, upload_id: str) -> None:
        """AbortMultipartUpload, retried; an upload already gone is fine."""

        def abort() -> None:
            try:
                self._s3(
                    "abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=upload_id
                )
            except FileNotFoundError:  # NoSuchUpload: an earlier attempt got there
                return

        call_with_retries(abort, url=self._loc.url, policy=self._policy, action="abort upload of")

    def _abort_strays(self) -> None:
        """After a retried CreateMultipartUpload, abort the uploads of this key that the
        lost answers started (one writer per key is the protocol's invariant)."""
        if self._create_tries < 2:
            return
        url = self._loc.url
        try:
            out = call_with_retries(
                lambda: self._s3("list_multipart_uploads", Bucket=self._bucket, Prefix=self._key),
                url=url,
                policy=self._policy,
                action="list uploads of",
            )
            for up in out.get("Uploads") or []:
                if up.get("Key") == self._key and up.get("UploadId") != self._upload_id:
                    self._abort_upload(str(up["UploadId"]))
                    logger.info("aborted a stray upload of %s", url)
        except Exception as e:  # best effort: a bucket lifecycle rule reclaims the rest
            logger.warning("could not clean stray uploads of %s: %s", url, e)
