"""Errors crossing from the node writer keep their type and details (errno, file, key,
tensor, problems) through the wire's restricted unpickler into the trainer's exception."""

from __future__ import annotations

import errno
import socket

import pytest

from ckptsvc.errors import (
    CheckpointError,
    InvalidStateError,
    SaveFailedError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    TornSnapshotError,
)
from ckptsvc.storage.errors import classify
from ckptsvc.workers.protocol import ErrorInfo, JobFailed, recv_message, send_message


def over_the_wire(exc: BaseException) -> CheckpointError:
    """``exc`` as the trainer sees it: flattened by the writer, framed, sent, rebuilt."""
    a, b = socket.socketpair()
    with a, b:
        send_message(a, JobFailed(7, ErrorInfo.from_exception(exc)))
        msg = recv_message(b)
    assert isinstance(msg, JobFailed)
    return msg.error.to_exception()


def test_os_error_keeps_errno_and_file() -> None:
    err = over_the_wire(OSError(errno.ENOSPC, "No space left on device", "/ckpt/model.bin"))
    assert isinstance(err, StorageError) and isinstance(err, OSError)
    assert err.errno == errno.ENOSPC
    assert err.filename == "/ckpt/model.bin"
    assert err.url == "/ckpt/model.bin"
    assert "No space left on device" in str(err)


@pytest.mark.parametrize(
    ("exc", "leaf"),
    [
        (FileNotFoundError(errno.ENOENT, "gone", "/x"), StorageNotFoundError),
        (PermissionError(errno.EACCES, "denied", "/x"), StoragePermissionError),
        (OSError(errno.EPERM, "not permitted"), StoragePermissionError),
        (OSError(errno.EIO, "I/O error"), StorageError),
    ],
)
def test_os_errors_map_to_storage_leaves(exc: OSError, leaf: type[StorageError]) -> None:
    err = over_the_wire(exc)
    assert type(err) is leaf
    assert err.errno == exc.errno


def test_classified_storage_error_keeps_url_and_errno() -> None:
    wrapped = classify(OSError(errno.ENOSPC, "No space left"), "/ckpt/a.safetensors", "write")
    wrapped.__cause__ = None  # the errno must travel on the error itself
    err = over_the_wire(wrapped)
    assert type(err) is StorageError
    assert err.url == "/ckpt/a.safetensors"
    assert err.errno == errno.ENOSPC


def test_key_error_keeps_the_missing_key() -> None:
    err = over_the_wire(KeyError("model.embed.weight"))
    assert isinstance(err, SaveFailedError)
    assert err.key == "model.embed.weight"  # type: ignore[attr-defined]
    assert "KeyError" in str(err) and "model.embed.weight" in str(err)


def test_leaf_details_survive() -> None:
    torn = over_the_wire(TornSnapshotError("changed in place", tensor="w", step=3))
    assert type(torn) is TornSnapshotError
    assert (torn.tensor, torn.step) == ("w", 3)
    bad = over_the_wire(InvalidStateError("bad", problems=(("a.b", "dtype"),)))
    assert type(bad) is InvalidStateError
    assert bad.problems == (("a.b", "dtype"),)


def test_unplain_details_are_dropped_not_sent() -> None:
    exc = KeyError(object())  # would not pass the restricted unpickler
    info = ErrorInfo.from_exception(exc)
    assert info.details == ()
    assert isinstance(over_the_wire(exc), SaveFailedError)
