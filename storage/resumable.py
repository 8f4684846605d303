"""GCS resumable uploads, pipelined, with bounded memory (the ``ShardSink`` for gs://).

A resumable upload takes its chunks in order, one at a time: parts cannot go in parallel
as on S3 (parallel composite uploads would need temporary objects and a compose step, and
leave objects without an MD5). Instead two chunk buffers alternate, one filled by the
caller while the other uploads on gcsfs's event loop; each chunk is retried on its own,
resuming from the offset a status check (``PUT``, ``Content-Range: bytes */*``) reports as
persisted, and the finalized object's size is checked against the bytes sent.

Emulators: fake-gcs-server finalizes a session on a status check and appends a re-sent
chunk instead of ignoring the overlap (its issue #1149), so a chunk whose answer is lost
*after* the server stored it fails the upload there (cleanly: the size check), where real
GCS resumes. Faults before the server sees a chunk (5xx, refused connections) are retried
on every server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from fsspec.asyn import sync

from ckptsvc.errors import CheckpointError, StorageError

from .errors import classify
from .multipart import on_loop
from .part_buffer import PartFiller
from .retry import call_with_retries

if TYPE_CHECKING:
    from .location import Location

__all__ = ["GCS_CHUNK_MULTIPLE", "GcsResumableSink", "gcs_resumable_supported"]

logger = logging.getLogger(__name__)

GCS_CHUNK_MULTIPLE = 256 * 2**10  # non-final resumable chunks are multiples of 256 KiB


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
    persisted (gcsfs also retries each HTTP request itself). Memory: two chunk buffers,
    plus aiohttp's transient copy of the chunk on the wire before Python 3.12.9 (a
    file-like body would avoid it, but its 64 KiB thread-pool reads slow the single
    sequential stream that a resumable upload is).
    """

    def __init__(self, loc: Location, *, part_size_bytes: int) -> None:
        self._loc = loc
        self._fs: Any = loc.fs
        self._bucket, self._key, _ = self._fs.split_path(loc.path)
        self._chunk_nbytes = max(
            GCS_CHUNK_MULTIPLE, part_size_bytes // GCS_CHUNK_MULTIPLE * GCS_CHUNK_MULTIPLE
        )
        self._policy = loc.retry_policy()
        self._spare: bytearray | None = None
        self._filler = PartFiller(take=self._take_buffer, on_full=self._send_full)
        self._offset = 0  # bytes handed to the session so far
        self._session: str | None = None
        self._pending: Future[None] | None = None
        self._pending_buf: bytearray | None = None
        self._state = "open"

    def write(self, data: memoryview | bytes) -> None:
        if self._state != "open":
            raise ValueError(f"{self._loc.url}: write after close or abort")
        self._filler.write(data)

    def _take_buffer(self) -> bytearray:
        buf, self._spare = self._spare or bytearray(self._chunk_nbytes), None
        return buf

    def _send_full(self, buf: bytearray, fill: int) -> None:
        self._send(buf, fill, final_nbytes=None)

    def _wait_pending(self) -> None:
        pending, self._pending = self._pending, None
        buf, self._pending_buf = self._pending_buf, None
        try:
            if pending is not None:
                pending.result()
        finally:
            if buf is not None and len(buf) == self._chunk_nbytes:
                self._spare = buf  # its chunk is done: reuse it for the next one

    def _send(self, buf: bytearray | None, fill: int, *, final_nbytes: int | None) -> None:
        """Hand ``buf[:fill]`` to the loop (after the previous chunk is done)."""
        self._wait_pending()
        if self._session is None:
            self._session = self._open_session()
        if buf is None:
            buf, fill = bytearray(), 0
        offset = self._offset
        view = memoryview(buf)[:fill]
        self._offset += fill
        self._pending = on_loop(self._fs, lambda: self._upload_chunk(view, offset, final_nbytes))
        self._pending_buf = buf

    def _open_session(self) -> str:
        from gcsfs.core import initiate_upload

        def start() -> str:
            return str(sync(self._fs.loop, initiate_upload, self._fs, self._bucket, self._key))

        return call_with_retries(
            start, url=self._loc.url, policy=self._policy, action="start resumable upload of"
        )

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
            except CheckpointError:
                raise
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
                if persisted is not None and persisted < offset:
                    raise StorageError(
                        f"upload {self._loc.url}: the server holds {persisted} bytes, fewer "
                        f"than the {offset} it confirmed; the upload cannot resume",
                        url=self._loc.url,
                    ) from e
                if persisted is not None:
                    sent = min(persisted - offset, view.nbytes)
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
            "POST",
            self._session,
            headers=headers,
            data=view if n else None,  # zero-copy slice
        )
        if final_nbytes is not None and (contents or "Range" not in out_headers):
            self._check_final_size(contents, final_nbytes)
            return None  # the object's metadata: finalized
        return _persisted(out_headers)

    def _check_final_size(self, contents: bytes, final_nbytes: int) -> None:
        """The finalized object must hold exactly the bytes sent (a server that appended a
        re-sent chunk twice would make it longer)."""
        try:
            size = int(json.loads(contents)["size"])
        except (ValueError, KeyError, TypeError):
            return  # no metadata in the answer: nothing to compare
        if size != final_nbytes:
            raise StorageError(
                f"upload {self._loc.url}: the server stored {size} bytes, {final_nbytes} were "
                "sent (a re-sent chunk was appended twice?); the file is not usable",
                url=self._loc.url,
            )

    async def _query_persisted(self) -> int | None:
        """Bytes the session holds, per a status request; ``None`` if the server won't say."""
        try:
            out_headers, _ = await self._fs._call(
                "PUT",
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
        buf, fill = self._filler.take_last()
        try:
            if self._session is None and self._offset == 0:
                data = bytes(memoryview(buf)[:fill]) if buf is not None else b""
                call_with_retries(
                    lambda: self._fs.pipe_file(self._loc.path, data),
                    url=self._loc.url,
                    policy=self._policy,
                    action="upload",
                )
            else:
                self._send(buf, fill, final_nbytes=self._offset + fill)
                self._wait_pending()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._spare = None
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
        self._filler.take_last()
        self._spare = None
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
