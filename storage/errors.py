"""Translate the zoo of fsspec / s3fs / gcsfs / OS exceptions into ``StorageError`` leaves."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager

from ckptsvc.errors import (
    CheckpointError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageTransientError,
)

__all__ = ["classify", "http_status", "is_transient", "storage_errors"]

_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EAGAIN,
    errno.EBUSY,
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: InternalError / HTTP 500
}
_TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# exception class names (lower case) of aiohttp / botocore / requests transport failures
_TRANSIENT_NAMES = (
    "timeout",
    "clientoserror",
    "serverdisconnected",
    "clientpayload",
    "clientconnect",
    "incompleteread",
    "responsestreaming",
    "connectionclosed",
    "endpointconnection",
    "proxyerror",
)
_TRANSIENT_WORDS = (
    "slowdown",
    "slow down",
    "throttl",
    "internalerror",
    "serviceunavailable",
    "service unavailable",
    "timeout",
    "timed out",
    "connection reset",
    "connection aborted",
    "server disconnected",
    "broken pipe",
    "requesttimeout",
    "connection was closed",
    "could not connect",
    "payload is not completed",
)


# exception classes whose attribute holds the HTTP status of a server's answer
_STATUS_ATTRS = {"clientresponseerror": "status", "httperror": "code"}  # aiohttp, gcsfs/urllib


# a server's verdict in an error's text; status codes as whole words only (a port such as
# 127.0.0.1:34017 or a byte count holds "401" too)
_PERMISSION_TEXT = re.compile(
    r"accessdenied|access denied|forbidden|invalidaccesskeyid|signaturedoesnotmatch"
    r"|(?<![\w.:])40[13](?![\w.])"
)
_NOT_FOUND_TEXT = re.compile(r"nosuchbucket|no such bucket|nosuchkey|(?<![\w.:])404(?![\w.])")
# a transient status code in an error's text, as a whole word: a random bucket or object
# name in the same text ("t-b328a431eb504ad3") holds "504" too
_TRANSIENT_STATUS_TEXT = re.compile(r"(?<![\w.:])50[0234](?![\w.])")


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of the server answer behind ``exc`` or its causes (botocore's
    ``response``, gcsfs's ``HttpError.code``, aiohttp's ``ClientResponseError.status``)."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
        attr = _STATUS_ATTRS.get(type(cur).__name__.lower())
        value = getattr(cur, attr, None) if attr else None
        if isinstance(value, int) and 100 <= value < 600:
            return value
        cur = cur.__cause__
        seen += 1
    return None


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same call may succeed (5xx, throttling, resets, timeouts)."""
    if isinstance(exc, StorageTransientError):
        return True
    if isinstance(exc, StorageError):
        return False
    status = http_status(exc)
    if status is not None and status in _TRANSIENT_HTTP_STATUS:
        return True
    if status is not None and 400 <= status < 500:
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    name = type(exc).__name__.lower()
    if any(w in name for w in _TRANSIENT_NAMES):
        return True
    text = str(exc).lower()
    if _PERMISSION_TEXT.search(text) or _NOT_FOUND_TEXT.search(text):
        return False  # the server's verdict, whatever else the text holds
    return any(w in text for w in _TRANSIENT_WORDS) or bool(_TRANSIENT_STATUS_TEXT.search(text))


def classify(exc: BaseException, url: str, action: str) -> StorageError:
    """Wrap ``exc`` in the matching ``StorageError`` leaf, naming ``url`` and ``action``
    (with ``exc``'s errno, when it has one)."""
    error = _classify(exc, url, action)
    if error.errno is None and isinstance(exc, OSError):
        error.errno = exc.errno
    return error


def _classify(exc: BaseException, url: str, action: str) -> StorageError:
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
    status = http_status(exc)
    if status in (401, 403):
        return StoragePermissionError(
            f"{action} {url}: permission denied (HTTP {status}, {detail}); "
            "check credentials and bucket policy",
            url=url,
        )
    if status == 404:
        return StorageNotFoundError(f"{action} {url}: not found ({detail})", url=url)
    if isinstance(exc, (TimeoutError, ConnectionError)):  # no answer: its text is no verdict
        return StorageTransientError(
            f"{action} {url}: transient failure persisted ({detail})", url=url
        )
    text = str(exc).lower()
    if _PERMISSION_TEXT.search(text):
        return StoragePermissionError(
            f"{action} {url}: permission denied ({detail}); check credentials and bucket policy",
            url=url,
        )
    if _NOT_FOUND_TEXT.search(text):
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
