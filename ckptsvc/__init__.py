"""ckptsvc: asynchronous, crash-consistent PyTorch checkpoints on local disk, S3 or GCS.

This package exports what a training script needs: save (``AsyncCheckpointer``,
``save_checkpoint``, ``CheckpointManager``), load (``load_state``, ``load_components``,
``load_checkpoint`` for weights), find (``find_latest_checkpoint``, ``list_checkpoints``),
check and clean up (``verify_checkpoint``, ``collect_garbage``, ``prune``,
``delete_checkpoint``), copy (``copy_checkpoint``, ``TieredStore``, ``export_hf``) and the
errors. Forgather's other names stay importable where Forgather users import them:
``ckptsvc.sharded_checkpoint`` and ``ckptsvc.manager``. Every function takes a local path
or an fsspec URL plus a keyword-only ``storage_options``; names load on first use (the node
writer process imports no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckptsvc.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CommitConflictError,
    ConfigError,
    CoordinationError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidStateError,
    LifecycleError,
    ReplicationMismatchError,
    SaveFailedError,
    SaveInFlightError,
    StateMismatchError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageTransientError,
    TornSnapshotError,
    WriterDiedError,
)
from ckptsvc.version import __version__

if TYPE_CHECKING:  # the names below load on first use: the writer process imports no torch
    from ckptsvc.compat.training_state import NamedStates, SimpleStatefulProvider, TrainingProgress
    from ckptsvc.engine.async_checkpointer import (
        AsyncCheckpointer,
        SaveHandle,
        SaveTimings,
        load_components,
    )
    from ckptsvc.engine.inflight import load_state
    from ckptsvc.format.manifest import Manifest
    from ckptsvc.manager import CheckpointConfig, CheckpointManager, default_checkpoint_id
    from ckptsvc.metrics import PrometheusExporter, SaveEvent, add_listener
    from ckptsvc.ops.export import ExportResult, export_hf
    from ckptsvc.ops.gc import GcReport, collect_garbage
    from ckptsvc.ops.prune import PruneReport, prune
    from ckptsvc.ops.retention import delete_checkpoint
    from ckptsvc.ops.tiered_saves import TieringConfig
    from ckptsvc.ops.tiering import ReplicationResult, TieredStore, replicate_checkpoint
    from ckptsvc.ops.transfer import CopyReport, copy_checkpoint, copy_tree
    from ckptsvc.ranks import RankInfo
    from ckptsvc.read.discovery import CheckpointInfo, CheckpointStatus, list_checkpoints
    from ckptsvc.read.latest import find_latest_verified
    from ckptsvc.read.verify import Problem, VerifyReport, verify_checkpoint
    from ckptsvc.sharded_checkpoint import (
        find_latest_checkpoint,
        load_checkpoint,
        next_checkpoint_path,
        save_checkpoint,
    )
    from ckptsvc.stage.components import (
        RNGState,
        SharingPattern,
        StateComponent,
        Stateful,
        StatefulProvider,
    )
    from ckptsvc.workers.protocol import WriterOptions

#: public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "TieredStore": "ops.tiering",
    "ReplicationResult": "ops.tiering",
    "replicate_checkpoint": "ops.tiering",
    "find_latest_verified": "read.latest",
    "CheckpointManager": "manager",
    "CheckpointConfig": "manager",
    "default_checkpoint_id": "manager",
    "TieringConfig": "ops.tiered_saves",
    "TrainingProgress": "compat.training_state",
    "NamedStates": "compat.training_state",
    "SimpleStatefulProvider": "compat.training_state",
    "copy_checkpoint": "ops.transfer",
    "copy_tree": "ops.transfer",
    "prune": "ops.prune",
    "CopyReport": "ops.transfer",
    "PruneReport": "ops.prune",
    "SaveEvent": "metrics",
    "add_listener": "metrics",
    "PrometheusExporter": "metrics",
    "load_components": "engine.async_checkpointer",
    "RankInfo": "ranks",
    "ExportResult": "ops.export",
    "export_hf": "ops.export",
    "AsyncCheckpointer": "engine.async_checkpointer",
    "CheckpointInfo": "read.discovery",
    "CheckpointStatus": "read.discovery",
    "GcReport": "ops.gc",
    "Manifest": "format.manifest",
    "Problem": "read.verify",
    "RNGState": "stage.components",
    "SaveHandle": "engine.async_checkpointer",
    "SaveTimings": "engine.async_checkpointer",
    "SharingPattern": "stage.components",
    "StateComponent": "stage.components",
    "Stateful": "stage.components",
    "StatefulProvider": "stage.components",
    "VerifyReport": "read.verify",
    "collect_garbage": "ops.gc",
    "delete_checkpoint": "ops.retention",
    "find_latest_checkpoint": "sharded_checkpoint",
    "list_checkpoints": "read.discovery",
    "load_checkpoint": "sharded_checkpoint",
    "load_state": "engine.inflight",
    "next_checkpoint_path": "sharded_checkpoint",
    "save_checkpoint": "sharded_checkpoint",
    "verify_checkpoint": "read.verify",
    "WriterOptions": "workers.protocol",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptsvc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AsyncCheckpointer",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointStatus",
    "CommitConflictError",
    "ConfigError",
    "CoordinationError",
    "CopyReport",
    "CorruptCheckpointError",
    "ExportResult",
    "GcReport",
    "IncompleteCheckpointError",
    "InvalidStateError",
    "LifecycleError",
    "Manifest",
    "NamedStates",
    "Problem",
    "PrometheusExporter",
    "PruneReport",
    "RNGState",
    "RankInfo",
    "ReplicationMismatchError",
    "ReplicationResult",
    "SaveEvent",
    "SaveFailedError",
    "SaveHandle",
    "SaveInFlightError",
    "SaveTimings",
    "SharingPattern",
    "SimpleStatefulProvider",
    "StateComponent",
    "StateMismatchError",
    "Stateful",
    "StatefulProvider",
    "StorageError",
    "StorageNotFoundError",
    "StoragePermissionError",
    "StorageTransientError",
    "TieredStore",
    "TieringConfig",
    "TornSnapshotError",
    "TrainingProgress",
    "VerifyReport",
    "WriterDiedError",
    "WriterOptions",
    "__version__",
    "add_listener",
    "collect_garbage",
    "copy_checkpoint",
    "copy_tree",
    "default_checkpoint_id",
    "delete_checkpoint",
    "export_hf",
    "find_latest_checkpoint",
    "find_latest_verified",
    "list_checkpoints",
    "load_checkpoint",
    "load_components",
    "load_state",
    "next_checkpoint_path",
    "prune",
    "replicate_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]
