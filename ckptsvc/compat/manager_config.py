"""The :class:`~ckptsvc.manager.CheckpointManager`'s configuration and checkpoint ids, as
Forgather spells them: :class:`CheckpointConfig`, :func:`default_checkpoint_id` (a
timestamp id) and :func:`checkpoint_step` (the step a save records, from its explicit
step, its id or its ``checkpoint-<n>`` path). All three are importable from
:mod:`ckptsvc.manager`.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from typing import Any

from ckptsvc.ops.tiered_saves import TieringConfig

__all__ = ["CHECKPOINT_NAME_RE", "CheckpointConfig", "checkpoint_step", "default_checkpoint_id"]

#: a checkpoint directory's name, ``checkpoint-<step>``, at the end of its path
CHECKPOINT_NAME_RE = re.compile(r"checkpoint-(\d+)$")


def default_checkpoint_id() -> str:
    """A timestamp id, as Forgather's (``2026-01-31T12-00-00``)."""
    return datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Forgather's fields, then ckptsvc's.

    ``output_dir``: model directory, local path or URL; checkpoints go to
    ``<output_dir>/checkpoints/``. ``save_total_limit``: complete checkpoints to keep
    (``None`` or <= 0 keeps all). ``save_safetensors``: format of :meth:`save_model`
    exports (checkpoints are always safetensors + JSON). ``save_on_all_ranks`` and
    ``save_on_local_rank`` are accepted for compatibility: who writes what follows each
    component's sharing pattern. ``save_on_each_node`` (node-local storage) is not
    supported. ``async_save=False`` makes every save wait until committed.
    ``storage_options`` go to fsspec; ``max_shard_size`` caps weight shard files;
    ``metadata`` is added to every checkpoint's manifest. ``tiering``
    (:class:`~ckptsvc.ops.tiered_saves.TieringConfig`, or a dict of its fields): save to
    ``output_dir`` (fast local disk), replicate each checkpoint to ``tiering.remote_root``;
    ``save_total_limit`` and the best checkpoints then apply to the remote tier, and
    ``tiering.keep_local`` copies stay local (see :mod:`ckptsvc.ops.tiered_saves`).
    ``overlap``: parameters and optimizer state are copied after ``save_checkpoint``
    returns, while training goes on; the next ``step()`` of each optimizer among the
    components waits for that copy (:mod:`ckptsvc.stage.overlap`); call
    :meth:`CheckpointManager.fence` before changing weights in place elsewhere.
    ``incremental`` (default ``CKPTSVC_INCREMENTAL``, on): frozen parameters get shards of
    their own, and a shard unchanged since the previous checkpoint (the last one saved, or
    the one loaded) is hard-linked / copied server-side instead of written
    (:mod:`ckptsvc.stage.incremental`).
    ``memory_budget_bytes`` (default ``CKPTSVC_MEMORY_BUDGET_BYTES``, 0 = one state copy):
    shared-memory staging bytes; a bigger state is staged and written in pieces, and two
    saves overlap only when two copies fit (:mod:`ckptsvc.stage.piecewise`).
    """

    output_dir: str
    save_total_limit: int | None
    save_on_each_node: bool = False
    save_safetensors: bool = True
    save_on_local_rank: int = 0
    save_on_all_ranks: bool = False
    async_save: bool = True
    storage_options: dict[str, Any] | None = None
    max_shard_size: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    tiering: TieringConfig | dict[str, Any] | None = None
    overlap: bool = False
    incremental: bool | None = None
    memory_budget_bytes: int | None = None


def checkpoint_step(step: int | None, checkpoint_id: object, path: str, save_count: int) -> int:
    """The step of a save: ``step`` if given, else a numeric ``checkpoint_id``, else the
    ``<n>`` of a ``checkpoint-<n>`` path, else ``save_count`` (saves so far)."""
    if step is not None:
        return int(step)
    if isinstance(checkpoint_id, int) or (
        isinstance(checkpoint_id, str) and checkpoint_id.isdigit()
    ):
        return int(checkpoint_id)
    m = CHECKPOINT_NAME_RE.search(path.rstrip("/"))
    return int(m.group(1)) if m else save_count
