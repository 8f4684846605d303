"""Copy one file to another place on the same store without moving its bytes through us.

:func:`copy_file` picks the cheapest way the store offers (:class:`CopyMethod`):

- local disk: a hard link (``os.link`` to a temporary name beside the target, then
  ``os.replace``, so an existing target is replaced atomically and never written in
  place). Where linking is refused (``EXDEV`` across filesystems, ``EPERM``, ``EMLINK``
  too many links, ``ENOTSUP``) a plain copy (``shutil.copyfile``: ``copy_file_range`` /
  ``sendfile`` in the kernel), fsynced, then ``os.replace`` - only with
  ``allow_plain_copy``.
- S3: ``CopyObject`` (one request, the server copies) up to 5 GiB; above, a multipart
  upload whose parts are ``UploadPartCopy`` ranges of the source.
- GCS: ``rewriteTo`` (gcsfs ``cp_file``; the loop over rewrite tokens is gcsfs's).
- any other fsspec filesystem: its ``cp_file``, which may read and re-upload the bytes,
  so it counts as a plain copy (``allow_plain_copy``).

Every failure is a ``StorageError`` leaf naming the URLs (retried where transient).
The caller checks the copy (size; the store's CRC-32C where it keeps one): a copy is only
ever of a complete, committed source file.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import shutil
import uuid
from typing import TYPE_CHECKING

from fsspec.asyn import sync

from .errors import classify, storage_errors
from .fs import GCS_PROTOCOLS, S3_PROTOCOLS
from .retry import call_with_retries

if TYPE_CHECKING:
    from .location import Location

__all__ = [
    "S3_COPY_OBJECT_MAX_BYTES",
    "CopyMethod",
    "copy_file",
    "same_store",
]

logger = logging.getLogger(__name__)

#: the largest object one S3 ``CopyObject`` may copy
S3_COPY_OBJECT_MAX_BYTES = 5 * 2**30
_S3_COPY_PART_BYTES = 512 * 2**20
_LINK_REFUSED = frozenset(
    {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}
)


class CopyMethod(enum.Enum):
    """How :func:`copy_file` materialised the target."""

    LINK = "link"  # local hard link: no byte copied, the two names share one inode
    SERVER = "server"  # S3 CopyObject / UploadPartCopy, GCS rewrite: the store copied
    PLAIN = "plain"  # the bytes were read and written again (fallback)


def same_store(a: Location, b: Location) -> bool:
    """True when a server-side copy from ``a`` to ``b`` is possible: same kind of store
    reached with the same filesystem instance (same endpoint and credentials)."""
    if a.is_local and b.is_local:
        return True
    return a.protocol == b.protocol and a.fs is b.fs


def copy_file(
    src: Location,
    dst: Location,
    *,
    allow_plain_copy: bool = True,
    nbytes: int | None = None,
    multipart_threshold_bytes: int = S3_COPY_OBJECT_MAX_BYTES,
    part_bytes: int = _S3_COPY_PART_BYTES,
) -> CopyMethod | None:
    """Make ``dst`` a copy of ``src`` (same store, see :func:`same_store`).

    Returns the method used, or ``None`` when the only way left would move the bytes
    through this process and ``allow_plain_copy`` is false (nothing was created then).
    ``nbytes`` (the source's size, if the caller knows it) saves a stat on S3;
    ``multipart_threshold_bytes`` and ``part_bytes`` tune S3's multipart copy (tests use
    small ones). A partial target never stays behind: local temp names are removed, an
    S3 multipart copy that fails is aborted by the retry loop's caller via ``gc``.
    """
    if not same_store(src, dst):
        raise ValueError(f"cannot copy {src.url} to {dst.url} server-side: different stores")
    if src.is_local:
        return _copy_local(src, dst, allow_plain_copy=allow_plain_copy)
    if src.protocol in S3_PROTOCOLS and hasattr(src.fs, "_copy_basic"):
        _copy_s3(
            src,
            dst,
            nbytes=nbytes,
            multipart_threshold_bytes=multipart_threshold_bytes,
            part_bytes=part_bytes,
        )
        return CopyMethod.SERVER
    if src.protocol in GCS_PROTOCOLS:
        call_with_retries(
            lambda: src.fs.cp_file(src.path, dst.path),
            url=dst.url,
            policy=dst.retry_policy(),
            action="copy (rewrite) to",
        )
        dst.fs.invalidate_cache(dst.path)
        return CopyMethod.SERVER
    if not allow_plain_copy:
        return None
    call_with_retries(
        lambda: src.fs.cp_file(src.path, dst.path),
        url=dst.url,
        policy=dst.retry_policy(),
        action="copy to",
    )
    dst.fs.invalidate_cache(dst.path)
    return CopyMethod.PLAIN


def _copy_local(src: Location, dst: Location, *, allow_plain_copy: bool) -> CopyMethod | None:
    directory = os.path.dirname(dst.path)
    tmp = os.path.join(directory, f".{dst.name}.{uuid.uuid4().hex[:12]}.tmp")
    with storage_errors(dst.url, "create directory"):
        os.makedirs(directory, exist_ok=True)
    try:
        os.link(src.path, tmp, follow_symlinks=False)
        method = CopyMethod.LINK
    except OSError as e:
        if e.errno not in _LINK_REFUSED:
            raise classify(e, src.url, f"link to {dst.url} from") from e
        if not allow_plain_copy:
            logger.debug("cannot link %s to %s (%s)", src.url, dst.url, e)
            return None
        logger.debug("cannot link %s to %s (%s); copying", src.url, dst.url, e)
        _plain_local_copy(src, dst, tmp)
        method = CopyMethod.PLAIN
    try:
        os.replace(tmp, dst.path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise classify(e, dst.url, "publish") from e
    return method


def _plain_local_copy(src: Location, dst: Location, tmp: str) -> None:
    try:
        shutil.copyfile(src.path, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise classify(e, dst.url, f"copy from {src.url} to") from e


def _copy_s3(
    src: Location,
    dst: Location,
    *,
    nbytes: int | None,
    multipart_threshold_bytes: int,
    part_bytes: int,
) -> None:
    fs = src.fs
    size = src.size() if nbytes is None else nbytes
    if size <= multipart_threshold_bytes:

        def _basic() -> None:
            sync(fs.loop, fs._copy_basic, src.path, dst.path)

        call_with_retries(
            _basic,
            url=dst.url,
            policy=dst.retry_policy(),
            action=f"copy (CopyObject) from {src.url} to",
        )
    else:

        def _managed() -> None:
            sync(fs.loop, fs._copy_managed, src.path, dst.path, size, block=part_bytes)

        call_with_retries(
            _managed,
            url=dst.url,
            policy=dst.retry_policy(),
            action=f"copy (UploadPartCopy) from {src.url} to",
        )
    fs.invalidate_cache(dst.path)
