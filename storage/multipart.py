"""Streaming uploads to object stores with bounded memory: S3 multipart, GCS resumable.

Both sinks copy the caller's chunks into part buffers (one memcpy; the caller may reuse
its memory as soon as ``write`` returns) and hand full parts to the filesystem's event
loop, so storage latency overlaps with producing the next part. Each request (a part, a
chunk, the completion) is retried on its own with backoff (:mod:`.retry`); a failure
never re-sends the whole file. A file that fits in one part goes as one PUT.
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

from .errors import classify
from .retry import RetryPolicy, acall_with_retries, call_with_retries

if TYPE_CHECKING:
    from .location import Location

__all__ = [
    "S3_MAX_PARTS",
    "S3_MIN_PART_BYTES",
    "GcsResumableSink",
    "S3MultipartSink",
    "gcs_resumable_supported",
]

logger = logging.getLogger(__name__)
R = TypeVar("R")

S3_MIN_PART_BYTES = 5 * 2**20  # S3 rejects smaller parts (except the last)
S3_MAX_PARTS = 10_000
GCS_CHUNK_MULTIPLE = 256 * 2**10  # non-final resumable chunks are multiples of 256 KiB
_ABORT_WAIT_S = 300.0


class _UploadAborted(StorageError):
    """Raised inside a part upload that starts (or retries) after ``abort``: never retried."""


def _on_loop(fs: Any, make: Callable[[], Awaitable[R]]) -> Future[R]:
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

    1. ``write`` (the caller's thread) copies bytes into the current part buffer. When it
       is full and more bytes follow, the first full part creates the upload
       (CreateMultipartUpload, blocking) and each full part becomes an UploadPart
       coroutine on the filesystem's event loop; ``write`` then takes a free buffer,
       waiting while ``parts_in_flight`` parts are uploading (memory stays at most
       ``(parts_in_flight + 1) * part_size_bytes``).
    2. ``close`` (the caller's thread): a file that never filled a part is one PutObject;
       otherwise the last part is sent, every part awaited, and CompleteMultipartUpload
       makes the object visible. Any failure aborts the upload before raising.
    3. ``abort`` (the caller's thread, any time): parts not yet started are skipped,
       running ones finish, then AbortMultipartUpload; nothing stays behind.
    """

    def __init__(self, loc: Location, *, part_size_bytes: int, parts_in_flight: int) -> None:
        self._loc = loc
        self._fs: Any = loc.fs
        self._bucket, self._key, _ = self._fs.split_path(loc.path)
        self._part_nbytes = max(part_size_bytes, S3_MIN_PART_BYTES)
        self._max_buffers = max(1, parts_in_flight) + 1
        self._policy = RetryPolicy.from_knobs()
        self._cond = threading.Condition()
        self._free: list[bytearray] = []  # guarded by _cond, like the four below
        self._nbuffers = 0
        self._in_flight = 0
        self._parts: dict[int, dict[str, Any]] = {}
        self._error: BaseException | None = None
        self._aborting = False
        self._buf: bytearray | None = None
        self._fill = 0
        self._upload_id: str | None = None
        self._create_tries = 0
        self._next_part = 1
        self._state = "open"  # -> "closed" | "aborted"

    def _s3(self, method: str, **kwargs: Any) -> Any:
        """One S3 request from the caller's thread (blocking), without s3fs's retries."""
        return sync(self._fs.loop, _s3_request, self._fs, method, **kwargs)

    # ---- step 1 ------------------------------------------------------------------------
    def write(self, data: memoryview | bytes) -> None:
        if self._state != "open":
            raise ValueError(f"{self._loc.url}: write after close or abort")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        while view.nbytes:
            if self._buf is not None and self._fill == len(self._buf):
                self._send_part(self._buf, self._fill)  # full, and more bytes follow
                self._buf = None
            if self._buf is None:
                self._buf = self._take_buffer()
                self._fill = 0
            n = min(view.nbytes, len(self._buf) - self._fill)
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]

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

    def _send_part(self, buf: bytearray, nbytes: int) -> None:
        if self._upload_id is None:

            def create() -> Any:
                self._create_tries += 1
                return self._s3("create_multipart_upload", Bucket=self._bucket, Key=self._key)

            out = call_with_retries(create, url=self._loc.url, action="start multipart upload of")
            self._upload_id = str(out["UploadId"])
        number = self._next_part
        if number > S3_MAX_PARTS:
            raise StorageError(
                f"{self._loc.url}: more than {S3_MAX_PARTS} parts of "
                f"{self._part_nbytes} bytes; raise CKPTSVC_PART_SIZE_BYTES or the shard count",
                url=self._loc.url,
            )
        self._next_part += 1
        if nbytes < len(buf):
            del buf[nbytes:]  # the last part: shrink in place (botocore wants exact bytes)
        with self._cond:
            self._in_flight += 1
        _on_loop(self._fs, lambda: self._upload_part(number, buf))

    async def _upload_part(self, number: int, buf: bytearray) -> None:
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
                Body=buf,
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
                if len(buf) == self._part_nbytes:
                    self._free.append(buf)
                else:
                    self._nbuffers -= 1
                self._cond.notify_all()

    # ---- step 2 ------------------------------------------------------------------------
    def close(self) -> None:
        if self._state != "open":
            return
        try:
            if self._upload_id is None:
                self._put_whole()
            else:
                if self._buf is not None and self._fill:
                    self._send_part(self._buf, self._fill)
                self._buf = None
                self._wait_parts()
                self._complete()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._abort_strays()
        self._loc.fs.invalidate_cache(self._loc.path)

    def _put_whole(self) -> None:
        body = bytearray()
        if self._buf is not None:
            del self._buf[self._fill :]  # shrink in place: botocore wants the exact bytes
            body = self._buf
        call_with_retries(
            lambda: self._s3("put_object", Bucket=self._bucket, Key=self._key, Body=body),
            url=self._loc.url,
            action="upload",
        )
        self._buf = None

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
            call_with_retries(complete, url=self._loc.url, action="complete upload of")
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
        self._buf = None
        if self._upload_id is None:
            return
        upload_id = self._upload_id
        try:
            call_with_retries(
                lambda: self._s3(
                    "abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=upload_id
                ),
                url=self._loc.url,
                action="abort upload of",
                attempts=3,
            )
        except StorageNotFoundError:
            pass  # already gone
        except Exception as e:  # report, but let the caller's original error propagate
            logger.warning("could not abort the multipart upload of %s: %s", self._loc.url, e)
        self._abort_strays()

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
                action="list uploads of",
            )
            for up in out.get("Uploads") or []:
                if up.get("Key") != self._key or up.get("UploadId") == self._upload_id:
                    continue
                try:
                    call_with_retries(
                        lambda up_id=up["UploadId"]: self._s3(
                            "abort_multipart_upload",
                            Bucket=self._bucket,
                            Key=self._key,
                            UploadId=up_id,
                        ),
                        url=url,
                        action="abort a stray upload of",
                    )
                except StorageNotFoundError:
                    pass  # a retry's first attempt got there
                logger.info("aborted a stray upload of %s", url)
        except Exception as e:  # best effort: a bucket lifecycle rule reclaims the rest
            logger.warning("could not clean stray uploads of %s: %s", url, e)


def gcs_resumable_supported(loc: Location) -> bool:
    """False for gcsfs filesystems that write this bucket another way (zonal buckets)."""
    fs: Any = loc.fs
    if not hasattr(fs, "_call"):
        return False
    zonal = getattr(fs, "_is_zonal_bucket", None)
    if zonal is None:
        return True
    bucket = fs.split_path(loc.path)[0]
    try:
        return not bool(sync(fs.loop, zonal, bucket))
    except Exception as e:  # unknown bucket type: let gcsfs's own file decide
        logger.debug("could not tell the bucket type of %s: %s", loc.url, e)
        return False


class GcsResumableSink:
    """One GCS object written as a resumable upload, pipelined, with bounded memory.

    A resumable upload takes its chunks in order, one at a time, so parts cannot go in
    parallel: instead two chunk buffers alternate, one filled by the caller while the
    other uploads on the filesystem's event loop.

    1. ``write`` (the caller's thread) copies bytes into the current chunk; a full chunk,
       with more bytes following, waits for the previous chunk to finish, opens the
       upload session if needed, and goes to the loop.
    2. ``close`` (the caller's thread): a file that never filled a chunk is one simple
       upload; otherwise the last chunk carries the total size and finalizes the object.
    3. ``abort`` (the caller's thread): waits for the chunk in flight, then cancels the
       session (an unfinalized upload is never visible).

    A chunk that fails transiently is re-sent from the offset the server reports as
    persisted (gcsfs also retries each HTTP request itself).
    """

    def __init__(self, loc: Location, *, part_size_bytes: int) -> None:
        self._loc = loc
        self._fs: Any = loc.fs
        self._bucket, self._key, _ = self._fs.split_path(loc.path)
        self._chunk_nbytes = max(
            GCS_CHUNK_MULTIPLE, part_size_bytes // GCS_CHUNK_MULTIPLE * GCS_CHUNK_MULTIPLE
        )
        self._policy = RetryPolicy.from_knobs()
        self._spare: bytearray | None = None
        self._buf: bytearray | None = None
        self._fill = 0
        self._offset = 0  # bytes handed to the session so far
        self._session: str | None = None
        self._pending: Future[None] | None = None
        self._pending_buf: bytearray | None = None
        self._state = "open"

    def write(self, data: memoryview | bytes) -> None:
        if self._state != "open":
            raise ValueError(f"{self._loc.url}: write after close or abort")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        while view.nbytes:
            if self._buf is not None and self._fill == len(self._buf):
                self._send(final_nbytes=None)
            if self._buf is None:
                self._buf, self._spare = self._spare or bytearray(self._chunk_nbytes), None
                self._fill = 0
            n = min(view.nbytes, len(self._buf) - self._fill)
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]

    def _wait_pending(self) -> None:
        pending, self._pending = self._pending, None
        buf, self._pending_buf = self._pending_buf, None
        try:
            if pending is not None:
                pending.result()
        finally:
            if buf is not None and len(buf) == self._chunk_nbytes:
                self._spare = buf  # its chunk is done: reuse it for the next one

    def _send(self, *, final_nbytes: int | None) -> None:
        """Hand the current buffer to the loop (after the previous chunk is done)."""
        self._wait_pending()
        if self._session is None:
            self._session = self._open_session()
        buf, fill, offset = self._buf, self._fill, self._offset
        if buf is None:
            buf, fill = bytearray(), 0
        view = memoryview(buf)[:fill]
        self._offset += fill
        self._buf = None
        self._pending = _on_loop(self._fs, lambda: self._upload_chunk(view, offset, final_nbytes))
        self._pending_buf = buf

    def _open_session(self) -> str:
        from gcsfs.core import initiate_upload

        def start() -> str:
            return str(sync(self._fs.loop, initiate_upload, self._fs, self._bucket, self._key))

        return call_with_retries(start, url=self._loc.url, action="start resumable upload of")

    async def _upload_chunk(self, view: memoryview, offset: int, final_nbytes: int | None) -> None:
        """Send ``view`` (file bytes from ``offset``); re-send what the server lacks."""
        sent = 0  # bytes of view the server has persisted
        started = time.monotonic()
        attempt = 0
        stalls = 0
        while True:
            attempt += 1
            try:
                got = await self._post(view[sent:], offset + sent, final_nbytes)
            except Exception as e:
                delay = self._policy.delay_s(e, attempt=attempt, started_s=started)
                if delay is None:
                    raise classify(e, self._loc.url, f"upload bytes {offset + sent}.. of") from e
                logger.warning(
                    "upload of %s at byte %d failed (%s: %s); retrying in %.2fs",
                    self._loc.url,
                    offset + sent,
                    type(e).__name__,
                    e,
                    delay,
                )
                await asyncio.sleep(delay)
                persisted = await self._query_persisted()
                if persisted is not None:
                    sent = min(max(0, persisted - offset), view.nbytes)
                continue
            if got is None:  # finalized
                return
            new_sent = min(max(0, got - offset), view.nbytes)
            if new_sent >= view.nbytes and final_nbytes is None:
                return
            stalls = stalls + 1 if new_sent <= sent else 0
            if stalls >= 3:
                raise StorageError(
                    f"upload {self._loc.url}: the server keeps refusing bytes from {offset + sent}",
                    url=self._loc.url,
                )
            sent = new_sent

    async def _post(self, view: memoryview, offset: int, final_nbytes: int | None) -> int | None:
        """One chunk request. Returns the persisted byte count (session still open), or
        ``None`` once the object is finalized."""
        n = view.nbytes
        if final_nbytes is None:
            content_range = f"bytes {offset}-{offset + n - 1}/*"
        elif n:
            content_range = f"bytes {offset}-{offset + n - 1}/{final_nbytes}"
        else:
            content_range = f"bytes */{final_nbytes}"
        headers = {
            "Content-Range": content_range,
            "Content-Type": "application/octet-stream",
            "Content-Length": str(n),
        }
        out_headers, contents = await self._fs._call(
            "POST", self._session, headers=headers, data=view if n else None
        )
        if final_nbytes is not None and (contents or "Range" not in out_headers):
            return None  # the object's metadata: finalized
        return _persisted(out_headers)

    async def _query_persisted(self) -> int | None:
        """Bytes the session holds, per a status request; ``None`` if the server won't say."""
        try:
            out_headers, _ = await self._fs._call(
                "POST",
                self._session,
                headers={"Content-Range": "bytes */*", "Content-Length": "0"},
            )
        except Exception as e:  # the next attempt re-sends the whole chunk instead
            logger.debug("status query for %s failed: %s", self._loc.url, e)
            return None
        return _persisted(out_headers)

    def close(self) -> None:
        if self._state != "open":
            return
        try:
            if self._session is None and self._offset == 0:
                data = bytes(memoryview(self._buf)[: self._fill]) if self._buf else b""
                call_with_retries(
                    lambda: self._fs.pipe_file(self._loc.path, data),
                    url=self._loc.url,
                    action="upload",
                )
            else:
                self._send(final_nbytes=self._offset + self._fill)
                self._wait_pending()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._buf = self._spare = None
        self._fs.invalidate_cache(self._loc.path)

    def abort(self) -> None:
        """Cancel the upload session (never raises)."""
        if self._state != "open":
            return
        self._state = "aborted"
        try:
            self._wait_pending()
        except Exception as e:  # the caller is already handling an error
            logger.debug("chunk of %s failed during abort: %s", self._loc.url, e)
        self._buf = self._spare = None
        if self._session is None:
            return
        session = self._session.replace("&ifGenerationMatch=0", "")
        try:
            sync(self._fs.loop, self._fs._call, "DELETE", session)
        except Exception as e:  # 499 "cancelled" is the expected answer on real GCS
            logger.debug("cancelling the upload session of %s: %s", self._loc.url, e)


def _persisted(headers: Any) -> int:
    """Bytes persisted per a ``Range: bytes=0-N`` answer (0 when absent)."""
    text = headers.get("Range") if headers is not None else None
    if not text:
        return 0
    return int(str(text).rsplit("-", 1)[1]) + 1
