"""The exception hierarchy of ckptsvc.

Every error ckptsvc raises on purpose derives from :class:`CheckpointError`. Leaves also
derive from the builtin a caller would naturally catch (``FileNotFoundError``,
``FileExistsError``, ``ValueError``, ...), so code written against Forgather's module
(which raises builtins) keeps working.

This module imports nothing heavy: ``ckptsvc.storage`` and the writer process use it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CommitConflictError",
    "ConfigError",
    "CoordinationError",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "InvalidStateError",
    "LifecycleError",
    "NodeCacheStalledError",
    "ReplicationMismatchError",
    "SaveFailedError",
    "SaveInFlightError",
    "StateMismatchError",
    "StorageError",
    "StorageNotFoundError",
    "StoragePermissionError",
    "StorageTransientError",
    "TornSnapshotError",
    "UnsafeCheckpointError",
    "WriterDiedError",
]


class CheckpointError(Exception):
    """Root of every error raised by ckptsvc."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (complete or legacy) exists where one was expected."""


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """The directory holds a save that never committed (no manifest, or our marker only)."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint file exists but its bytes are wrong: bad header, size, checksum, JSON."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """A file written by another tool (a pickle) can only be read by running arbitrary
    code (``torch.load(weights_only=False)``); refused unless the caller opts in."""


class CommitConflictError(CheckpointError, FileExistsError):
    """A commit would overwrite a checkpoint that another save is writing or has committed."""


class InvalidStateError(CheckpointError, TypeError):
    """The state handed to save cannot be checkpointed (unknown dtype, unserialisable value).

    When raised by the state walk of ``save``, ``problems`` lists every offending value as
    ``(key, reason)`` pairs (the key is the dotted path, e.g. ``optimizer.state.3.foo``);
    the message shows the first 20.
    """

    def __init__(self, message: str, *, problems: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


class ConfigError(CheckpointError, ValueError):
    """A configuration mistake: a ``CKPTSVC_*`` environment variable or an argument has a
    value of the wrong type, outside its allowed range, or one ckptsvc does not support
    (e.g. a distributed setting it cannot serve); the message names the variable or
    argument, the value and what is allowed."""


class LifecycleError(CheckpointError, RuntimeError):
    """An object was used in a way or at a time it does not support: after ``close()``, in
    a forked child, before its setup, started twice, or loading into a write-only view."""


class SaveFailedError(CheckpointError, RuntimeError):
    """An asynchronous save failed; ``__cause__`` holds the underlying error."""


class SaveInFlightError(IncompleteCheckpointError, TimeoutError):
    """A load waited for a save of this process to that root or path, and the save was
    still in flight when the wait's timeout ran out; the message names its step and path.
    The checkpoint is not committed yet, so this is also an ``IncompleteCheckpointError``."""


class NodeCacheStalledError(CheckpointError, TimeoutError):
    """A rank waited for another process of its node to download a replicated file into
    the node cache (``CKPTSVC_NODE_CACHE_DIR``), and the download made no progress for
    ``CKPTSVC_NODE_CACHE_STALL_S`` while its process lived; the message names the file."""


class WriterDiedError(CheckpointError, RuntimeError):
    """The node writer process exited or stopped answering while a save was in flight."""


class StorageError(CheckpointError, OSError):
    """An I/O operation on local disk or an object store failed. The message names the URL;
    ``errno`` is the OS's error number when the OS reported one (``None`` otherwise)."""

    def __init__(self, message: str, *, url: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.errno = errno

    def __str__(self) -> str:  # OSError.__str__ would format errno/strerror instead
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[object, ...]:  # keep pickling (writer -> trainer) lossless
        return (_rebuild_storage_error, (type(self), str(self), self.url, self.errno))


def _rebuild_storage_error(
    cls: type[StorageError], message: str, url: str | None, errno: int | None = None
) -> StorageError:
    return cls(message, url=url, errno=errno)


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object, file or bucket does not exist."""


class StoragePermissionError(StorageError, PermissionError):
    """Credentials are missing or do not allow the operation (HTTP 401/403, EACCES)."""


class StorageTransientError(StorageError):
    """A failure worth retrying (5xx, throttling, connection reset, timeout) that persisted."""


class StateMismatchError(CheckpointError, RuntimeError):
    """The checkpoint's keys or shapes do not match the module or state being restored."""


class CoordinationError(SaveFailedError):
    """Ranks could not agree on a save: a rank never reported, or the store went away.

    ``missing`` lists the ranks that never reported (empty if that is not the cause).
    """

    def __init__(self, message: str, *, missing: tuple[int, ...] | list[int] = ()) -> None:
        super().__init__(message)
        self.missing = tuple(missing)


class ReplicationMismatchError(SaveFailedError):
    """Ranks that must hold identical state (REPLICATED) do not, or disagree on the save."""


class TornSnapshotError(SaveFailedError):
    """A tensor changed in place while its overlapped snapshot (``overlap=True``) was being
    copied; the save was abandoned before anything was written. ``tensor`` names it."""

    def __init__(self, message: str, *, tensor: str = "", step: int | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor
        self.step = step
