"""ckptsvc: asynchronous, crash-consistent PyTorch checkpoints on local disk, S3 or GCS.

The synchronous API is a drop-in for Forgather's ``forgather.ml.sharded_checkpoint``
(also importable as ``ckptsvc.sharded_checkpoint``); every function takes a local path or
an fsspec URL plus a keyword-only ``storage_options``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .components import RNGState, SharingPattern, StateComponent, Stateful, StatefulProvider
from .discovery import CheckpointInfo, CheckpointStatus, list_checkpoints
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CommitConflictError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidStateError,
    SaveFailedError,
    StateMismatchError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageTransientError,
    WriterDiedError,
)
from .gc import GcReport, collect_garbage
from .manifest import Manifest
from .retention import delete_checkpoint
from .sharded_checkpoint import (
    CheckpointMeta,
    create_pretrained_symlinks,
    create_sharing_metadata,
    find_latest_checkpoint,
    get_all_fqns,
    get_checkpoint_metadata,
    id_to_fqn,
    index_file_name,
    load_checkpoint,
    load_checkpoint_metrics,
    load_shard_index,
    load_sharded_checkpoint,
    make_cannonical_names,
    make_shard_index,
    map_cannonical_names,
    maybe_delete_oldest_checkpoint,
    next_checkpoint_path,
    retie_parameters,
    save_checkpoint,
    save_checkpoint_metrics,
    save_shard_index,
    save_sharded_checkpoint,
    validate_checkpoint,
    validate_output_dir,
)
from .verify import Problem, VerifyReport, verify_checkpoint

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointMeta",
    "CheckpointNotFoundError",
    "CheckpointStatus",
    "CommitConflictError",
    "CorruptCheckpointError",
    "GcReport",
    "IncompleteCheckpointError",
    "InvalidStateError",
    "Manifest",
    "Problem",
    "RNGState",
    "SaveFailedError",
    "SharingPattern",
    "StateComponent",
    "StateMismatchError",
    "Stateful",
    "StatefulProvider",
    "StorageError",
    "StorageNotFoundError",
    "StoragePermissionError",
    "StorageTransientError",
    "VerifyReport",
    "WriterDiedError",
    "__version__",
    "collect_garbage",
    "create_pretrained_symlinks",
    "create_sharing_metadata",
    "delete_checkpoint",
    "find_latest_checkpoint",
    "get_all_fqns",
    "get_checkpoint_metadata",
    "id_to_fqn",
    "index_file_name",
    "list_checkpoints",
    "load_checkpoint",
    "load_checkpoint_metrics",
    "load_shard_index",
    "load_sharded_checkpoint",
    "make_cannonical_names",
    "make_shard_index",
    "map_cannonical_names",
    "maybe_delete_oldest_checkpoint",
    "next_checkpoint_path",
    "retie_parameters",
    "save_checkpoint",
    "save_checkpoint_metrics",
    "save_shard_index",
    "save_sharded_checkpoint",
    "validate_checkpoint",
    "validate_output_dir",
    "verify_checkpoint",
]
