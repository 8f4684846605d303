"""The Forgather-compatible synchronous checkpoint API, over any fsspec URL.

Same names, signatures and defaults as ``forgather.ml.sharded_checkpoint``; code written
against Forgather runs unchanged after swapping the import. Differences, all fixes:

- saves follow the commit protocol: marker, shards, index, manifest last; a crash
  never leaves something :func:`find_latest_checkpoint` returns;
- shard sizes count tensor bytes, not whole storages;
- tied-parameter names are ordered deterministically;
- the caller's ``metadata`` dict is never mutated;
- errors are :class:`~ckptsvc.errors.CheckpointError` leaves that name the path and key
  (and still subclass the builtins Forgather raised, e.g. ``FileNotFoundError``);
- every function also takes a URL and a keyword-only ``storage_options``.

This module is the facade Forgather users import; the code lives by layer:
:mod:`ckptsvc.engine.sync_save` (saving), :mod:`ckptsvc.read.weights` (loading),
:mod:`ckptsvc.read.latest` and :mod:`ckptsvc.read.discovery` (finding checkpoints;
:func:`find_latest_checkpoint` and :func:`load_checkpoint` here first wait for this
process's saves in flight, see
:mod:`ckptsvc.engine.inflight`),
:mod:`ckptsvc.stage.tied_params` (tied parameters).
"""

from ckptsvc.engine.inflight import find_latest_checkpoint, load_checkpoint
from ckptsvc.engine.sync_save import (
    create_pretrained_symlinks,
    make_shard_index,
    save_checkpoint,
    save_checkpoint_metrics,
    save_shard_index,
    save_sharded_checkpoint,
    validate_output_dir,
)
from ckptsvc.format.layout import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    index_file_name,
)
from ckptsvc.ops.retention import maybe_delete_oldest_checkpoint
from ckptsvc.read.discovery import next_checkpoint_path, validate_checkpoint
from ckptsvc.read.weights import (
    CheckpointMeta,
    ShardIndex,
    get_checkpoint_metadata,
    load_checkpoint_metrics,
    load_shard_index,
    load_sharded_checkpoint,
)
from ckptsvc.stage.tied_params import (
    create_sharing_metadata,
    get_all_fqns,
    id_to_fqn,
    make_cannonical_names,
    map_cannonical_names,
    retie_parameters,
)

__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "CheckpointMeta",
    "ShardIndex",
    "create_pretrained_symlinks",
    "create_sharing_metadata",
    "find_latest_checkpoint",
    "get_all_fqns",
    "get_checkpoint_metadata",
    "id_to_fqn",
    "index_file_name",
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
]
