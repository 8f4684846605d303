"""ckptsvc: asynchronous, crash-consistent PyTorch checkpoints on local disk, S3 or GCS."""

from __future__ import annotations

from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CommitConflictError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidStateError,
    SaveFailedError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageTransientError,
    WriterDiedError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CommitConflictError",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "InvalidStateError",
    "SaveFailedError",
    "StorageError",
    "StorageNotFoundError",
    "StoragePermissionError",
    "StorageTransientError",
    "WriterDiedError",
    "__version__",
]
