"""Translate the zoo of fsspec / s3fs / gcsfs / OS exceptions into ``StorageError`` leaves."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from ckptsvc.errors import (
    CheckpointError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageTransientError,
)

__all__ = ["classify", "is_transient", "storage_errors"]

_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EAGAIN,
    errno.EBUSY,
}
_TRANSIENT_WORDS = (
    "slowdown",
    "slow down",
    "throttl",
    "internalerror",
    "serviceunavailable",
    "service unavailable",
    "503",
    "500",
    "502",
    "504",
    "timeout",
    "timed out",
    "connection reset",
    "connection aborted",
    "server disconnected",
    "broken pipe",
    "requesttimeout",
)


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same call may succeed (5xx, throttling, resets, timeouts)."""
    if isinstance(exc, StorageTransientError):
        return True
    if isinstance(exc, StorageError):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    name = type(exc).__name__.lower()
    if any(w in name for w in ("timeout", "clientoserror", "serverdisconnected", "clientpayload")):
        return True
    text = str(exc).lower()
    return any(w in text for w in _TRANSIENT_WORDS)


def classify(exc: BaseException, url: str, action: str) -> StorageError:
    """Wrap ``exc`` in the matching ``StorageError`` leaf, naming ``url`` and ``action``."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError) or (
        isinstance(exc, OSError) and exc.errno == errno.ENOENT
    ):
        return StorageNotFoundError(f"{action} {url}: not found ({detail})", url=url)
    if isinstance(exc, PermissionError) or (
        isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM)
    ):
        return StoragePermissionError(
            f"{action} {url}: permission denied ({detail}); check credentials and bucket policy",
            url=url,
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return StorageError(f"{action} {url}: no space left on device ({detail})", url=url)
    text = str(exc).lower()
    if any(
        w in text
        for w in (
            "accessdenied",
            "access denied",
            "forbidden",
            "403",
            "401",
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
        )
    ):
        return StoragePermissionError(
            f"{action} {url}: permission denied ({detail}); check credentials and bucket policy",
            url=url,
        )
    if any(w in text for w in ("nosuchbucket", "no such bucket", "nosuchkey", "404")):
        return StorageNotFoundError(f"{action} {url}: not found ({detail})", url=url)
    if is_transient(exc):
        return StorageTransientError(
            f"{action} {url}: transient failure persisted ({detail})", url=url
        )
    return StorageError(f"{action} {url}: {detail}", url=url)


@contextmanager
def storage_errors(url: str, action: str) -> Iterator[None]:
    """Re-raise any non-ckptsvc exception from the block as a classified ``StorageError``."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # fsspec backends raise anything; classify, never swallow
        raise classify(e, url, action) from e
