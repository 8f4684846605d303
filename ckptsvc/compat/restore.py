"""Restoring a checkpoint's components into a training run (``CheckpointManager.load_checkpoint``).

Call order (every rank, the thread that calls ``load_checkpoint``):

1. classify the checkpoint: written by ckptsvc (a manifest with our section) or by
   Forgather's own manager (``*_state*.pt`` files, or a manifest-less weights directory);
2. ckptsvc: hand the quantized-weights description from the manifest to the model
   component, then ``load_components`` restores every component (tensors by ranged
   reads, the rest from JSON) and calls each ``load_state_dict``;
3. Forgather: :func:`ckptsvc.read.legacy.load_legacy_checkpoint` (``torch.load`` with
   ``weights_only=True``, callbacks by position);
4. return the document holding the saved best-checkpoint list, for the caller to adopt.

Any component that cannot be restored raises; nothing is skipped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ckptsvc.compat.model_state import ModelState
from ckptsvc.compat.training_state import DistInfo
from ckptsvc.read.component_load import load_components
from ckptsvc.read.discovery import CheckpointStatus, checkpoint_info, refuse_unloadable
from ckptsvc.read.legacy import LegacyRank, is_legacy_state_checkpoint, load_legacy_checkpoint
from ckptsvc.stage.components import StateComponent
from ckptsvc.storage import Location

__all__ = ["CALLBACKS_KEY", "META_KEY", "restore_checkpoint"]

logger = logging.getLogger(__name__)

#: key of the manager's section in a checkpoint's manifest metadata
META_KEY = "ckptsvc_manager"
#: the component holding callback states by name
CALLBACKS_KEY = "callbacks"


def restore_checkpoint(
    ckpt: Location,
    *,
    model_state: ModelState,
    model_component: StateComponent,
    others: Sequence[StateComponent],
    legacy_callbacks: Sequence[object],
    process_groups: Mapping[str, Any],
    dist: DistInfo,
) -> Mapping[str, Any]:
    """Restore ``model_component`` and ``others`` from ``ckpt`` (see the module doc).

    For a Forgather checkpoint the component keyed :data:`CALLBACKS_KEY` is skipped:
    Forgather stored callback states by list position, restored into
    ``legacy_callbacks``. Returns the saved best-checkpoint document (may be empty).
    """
    info = checkpoint_info(ckpt)
    refuse_unloadable(info, legacy_ok=True)  # it was complete when chosen: raced with a delete?
    children = [c.name for c in ckpt.list_children() if not c.is_dir]
    logger.info("loading checkpoint %s", ckpt.url)
    if is_legacy_state_checkpoint(children, info.manifest) or (
        info.manifest is None and info.status is CheckpointStatus.LEGACY
    ):
        group_ranks = {}
        td = torch.distributed
        if td.is_available() and td.is_initialized():
            group_ranks = {name: td.get_rank(pg) for name, pg in process_groups.items()}
        return load_legacy_checkpoint(
            ckpt,
            model_parts=model_state.parts,
            components=[c for c in others if c.key != CALLBACKS_KEY],
            callbacks=legacy_callbacks,
            where=LegacyRank(dist.rank, dist.node_rank, group_ranks),
            manifest=info.manifest,
        )
    section = dict((info.manifest.user_metadata if info.manifest else {}).get(META_KEY) or {})
    model_state.expect(section.get("quantized"), where=ckpt.url)
    load_components(
        ckpt.url,
        [model_component, *others],
        process_groups=process_groups,
        storage_options=ckpt.storage_options,
        strict=True,
    )
    return section
