"""Loading training state from checkpoints written by Forgather's own CheckpointManager.

Forgather's layout (``forgather.ml.trainer.checkpoint_coordinator``), next to the model
weights (read by :func:`ckptsvc.read.weights.load_checkpoint`):

- ``{key}_state.pt``: a GLOBAL or REPLICATED component (saved by rank 0);
- ``{key}_state_rank_{r}.pt``: a PER_RANK component, one file per rank;
- ``{key}_state_group_{name}_grank_{g}_rank_{r}.pt``: PER_GROUP, one per group;
- ``{key}_state_node_{n}_rank_{r}.pt``: PER_NODE, one per node;
- ``checkpoint_metadata.pt``: ``{"best_checkpoints": [(path, metric), ...],
  "callback_states": {"callback_{i}_{Type}": state}}`` (older runs:
  ``callback_states.pt`` with the callback dict alone);
- ``checkpoint_manifest.json`` (newer runs; its ``components`` name what was saved).

Every ``.pt`` file is read with ``torch.load(weights_only=True)``: tensors, containers and
scalars only, never arbitrary pickled objects. A file that needs more is refused with an
error that says so. Forgather's ``RNGState`` (``torch_rng_state`` / ``cuda_rng_state``) is
translated for :class:`ckptsvc.stage.components.RNGState`. Missing files of required components
and failing ``load_state_dict`` calls are errors (Forgather's manager downgraded some of
them to warnings).
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ckptsvc.errors import (
    CheckpointError,
    CorruptCheckpointError,
    StateMismatchError,
    StorageNotFoundError,
)
from ckptsvc.format.json_doc import check_doc_against_manifest, read_doc_bytes
from ckptsvc.format.manifest import Manifest
from ckptsvc.format.skeleton import SKELETON_NAME, parse_skeleton
from ckptsvc.read.weights import load_checkpoint
from ckptsvc.stage.components import RNGState, SharingPattern, StateComponent
from ckptsvc.stage.flatten import unflatten_state
from ckptsvc.storage import Location

__all__ = [
    "LEGACY_METADATA_NAMES",
    "LegacyRank",
    "is_legacy_state_checkpoint",
    "legacy_state_file",
    "load_legacy_checkpoint",
    "load_legacy_components",
    "read_legacy_metadata",
    "torch_load_safe",
]

logger = logging.getLogger(__name__)

LEGACY_METADATA_NAMES = ("checkpoint_metadata.pt", "callback_states.pt")
_STATE_FILE_RE = re.compile(r"^(?P<key>.+?)_state(?:_(?P<suffix>.+))?\.pt$")


@dataclass(frozen=True)
class LegacyRank:
    """Where this process sits, to pick its file among the per-rank/group/node ones."""

    rank: int = 0
    node_rank: int = 0
    group_ranks: Mapping[str, int] | None = None


def torch_load_safe(loc: Location) -> Any:
    """``torch.load(weights_only=True)`` of one file (local or remote), tensors on CPU."""
    raw = loc.read_bytes()
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (
        Exception
    ) as e:  # UnpicklingError, RuntimeError, EOFError: all mean "not loadable safely"
        raise CorruptCheckpointError(
            f"{loc.url}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{e}); ckptsvc never unpickles arbitrary objects - re-save this state with "
            "tensors, numbers, strings and containers only"
        ) from e


def is_legacy_state_checkpoint(children: Sequence[str], manifest: Manifest | None) -> bool:
    """True for a Forgather-written checkpoint: its state lives in ``*_state*.pt`` files
    and its manifest (if any) carries no ckptsvc section."""
    if manifest is not None and manifest.library_version:
        return False
    return any(_STATE_FILE_RE.match(n) for n in children) or any(
        n in LEGACY_METADATA_NAMES for n in children
    )


def legacy_state_file(
    component: StateComponent, children: Sequence[str], where: LegacyRank
) -> str | None:
    """The file name holding ``component`` for this process, or ``None``."""
    key = component.key
    pattern = component.sharing_pattern
    names = set(children)
    if pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
        name = f"{key}_state.pt"
        return name if name in names else None
    if pattern is SharingPattern.PER_RANK:
        name = f"{key}_state_rank_{where.rank}.pt"
        return name if name in names else None
    if pattern is SharingPattern.PER_GROUP:
        group = component.process_group_name or ""
        grank = (where.group_ranks or {}).get(group, 0)
        prefix = f"{key}_state_group_{group}_grank_{grank}_rank_"
        old_prefix = f"{key}_state_group_{group}_rank_"  # Forgather's earlier spelling
    else:  # PER_NODE
        prefix = f"{key}_state_node_{where.node_rank}_rank_"
        old_prefix = None
    for p in (prefix, old_prefix):
        if p is None:
            continue
        matches = sorted(n for n in names if n.startswith(p) and n.endswith(".pt"))
        if matches:
            return matches[0]
    return None


def _adapt(component: StateComponent, state: Any) -> Any:
    """Translate Forgather's RNG state for our RNGState (torch generators only)."""
    forgather_rng = isinstance(state, dict) and "torch_rng_state" in state and "python" not in state
    if isinstance(component.stateful, RNGState) and forgather_rng:
        return _ForgatherRng(state)
    return state


class _ForgatherRng(dict[str, Any]):
    """Marker: a Forgather RNG state dict, restored without Python/NumPy generators."""


def _restore_forgather_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(torch.as_tensor(state["torch_rng_state"], dtype=torch.uint8))
    cuda = state.get("cuda_rng_state")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.as_tensor(cuda, dtype=torch.uint8))
    logger.warning(
        "restored a Forgather RNG state: torch generators only (it has no Python or NumPy state)"
    )


def load_legacy_components(
    ckpt: Location,
    components: Sequence[StateComponent],
    *,
    where: LegacyRank,
    manifest: Manifest | None = None,
) -> list[str]:
    """Load each component from its Forgather ``.pt`` file; return the keys loaded.

    A required component whose file is missing raises :class:`StateMismatchError`; an
    optional one is skipped with a warning. A failing ``load_state_dict`` raises
    :class:`StateMismatchError` naming the component and the file.
    """
    children = [c.name for c in ckpt.list_children() if not c.is_dir]
    saved = {c.key for c in manifest.components} if manifest is not None else None
    loaded = []
    for comp in components:
        name = legacy_state_file(comp, children, where)
        if name is None:
            msg = (
                f"{ckpt.url}: no Forgather state file for component {comp.key!r} "
                f"({comp.sharing_pattern.value}"
                + (
                    f", rank {where.rank}"
                    if comp.sharing_pattern is SharingPattern.PER_RANK
                    else ""
                )
                + ")"
                + (f"; the manifest lists {sorted(saved)}" if saved is not None else "")
            )
            if comp.required:
                raise StateMismatchError(msg)
            logger.warning("%s; keeping its current state", msg)
            continue
        loc = ckpt.join(name)
        state = _adapt(comp, torch_load_safe(loc))
        try:
            if isinstance(state, _ForgatherRng):
                _restore_forgather_rng(state)
            else:
                comp.stateful.load_state_dict(state)
        except CheckpointError:
            raise
        except Exception as e:
            raise StateMismatchError(
                f"{loc.url}: loading component {comp.key!r} failed: {type(e).__name__}: {e}"
            ) from e
        logger.info("loaded legacy component %s from %s", comp.key, loc.url)
        loaded.append(comp.key)
    return loaded


def read_legacy_metadata(ckpt: Location) -> dict[str, Any] | None:
    """``checkpoint_metadata.pt`` (or the older ``callback_states.pt``, returned as
    ``{"callback_states": ...}``); ``None`` when neither exists."""
    for name in LEGACY_METADATA_NAMES:
        loc = ckpt.join(name)
        try:
            doc = torch_load_safe(loc)
        except StorageNotFoundError:
            continue
        if not isinstance(doc, dict):
            raise CorruptCheckpointError(f"{loc.url}: expected a dict, found {type(doc).__name__}")
        return doc if name == LEGACY_METADATA_NAMES[0] else {"callback_states": doc}
    return None


def load_legacy_checkpoint(
    ckpt: Location,
    *,
    model_parts: Sequence[nn.Module],
    components: Sequence[StateComponent],
    callbacks: Sequence[object],
    where: LegacyRank,
    manifest: Manifest | None,
) -> dict[str, Any]:
    """Load a whole Forgather checkpoint: weights into each model part (on the device the
    part is on), the components, and the callbacks (Forgather keyed their states
    ``callback_{i}_{Type}`` by position in the trainer's callback list, Stateful or not).
    Returns ``checkpoint_metadata.pt`` (``{}`` if absent) for the best-checkpoint list."""
    for part in model_parts:
        device = next((p.device for p in part.parameters()), torch.device("cpu"))
        load_checkpoint(
            ckpt.url, part, device=str(device), strict=True, storage_options=ckpt.storage_options
        )
    load_legacy_components(ckpt, components, where=where, manifest=manifest)
    meta = read_legacy_metadata(ckpt) or {}
    states = meta.get("callback_states") or {}
    for i, cb in enumerate(callbacks):
        key = f"callback_{i}_{type(cb).__name__}"
        load = getattr(cb, "load_state_dict", None)
        if key in states and callable(load):
            try:
                load(states[key])
            except Exception as e:
                raise StateMismatchError(
                    f"{ckpt.url}: restoring callback {key} failed: {type(e).__name__}: {e}"
                ) from e
            logger.info("restored legacy state of callback %s", key)
    return meta


def load_legacy_state(ckpt: Location, manifest: Manifest, *, device: str | torch.device) -> Any:
    """The state of a checkpoint written by ``AsyncCheckpointer.save`` before the component
    layout (tensors of every key in the HF shards, the rest in ``ckptsvc_state.json``), or
    the flat ``{fqn: tensor}`` of a ``save_checkpoint`` checkpoint (no skeleton).

    The skeleton (like the index and every shard) must match its manifest record: a
    skeleton from another save is corruption.
    """
    tensors = (
        load_checkpoint(ckpt.url, device=str(device), storage_options=ckpt.storage_options) or {}
    )
    skeleton_loc = ckpt.join(SKELETON_NAME)
    if manifest.file(SKELETON_NAME) is None:
        return tensors
    try:
        raw = read_doc_bytes(skeleton_loc, what="state skeleton")
    except StorageNotFoundError:
        raise CorruptCheckpointError(
            f"{skeleton_loc.url}: the manifest lists the state skeleton but it is missing; "
            "resume from an intact checkpoint"
        ) from None
    check_doc_against_manifest(
        raw, rel_path=SKELETON_NAME, url=skeleton_loc.url, manifest=manifest, what="state skeleton"
    )
    return unflatten_state(parse_skeleton(raw, where=skeleton_loc.url), tensors)
