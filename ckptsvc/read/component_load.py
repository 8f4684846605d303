"""``load_components``: restore state components from a checkpoint into their statefuls.

Call order (every rank, training thread; no collective):

1. read and check the manifest (an incomplete or missing checkpoint is an error); in a
   multi-rank job only this rank's view of a v3 manifest (its head and this rank's
   region, :mod:`ckptsvc.read.manifest_view`);
2. for each requested component, pick the instance this rank loads - the single one
   (GLOBAL, REPLICATED, sharded), ``_rank_<r>`` (PER_RANK), ``_group_<name>_<leader>``
   (PER_GROUP) or ``_node_<i>`` (PER_NODE) - and read its JSON document;
3. ask ``stateful.state_dict()`` for a template: a DTensor there means "load the region my
   current layout needs" (:mod:`ckptsvc.read.regions`), anything else loads whole;
4. read every tensor by byte ranges, rebuild the nested state from the document's
   skeleton, and call ``stateful.load_state_dict``.

A missing required component, or a ``load_state_dict`` that raises, is an error
(:class:`StateMismatchError`); an optional one (``required=False``) is skipped with a
warning. PER_RANK (and PER_GROUP / PER_NODE) state saved at another world size is an
error naming the component unless ``world_size_policy`` says otherwise:

- ``"error"`` (default): :class:`StateMismatchError`;
- ``"skip"``: keep the stateful's current state, log a warning;
- ``"wrap"``: rank ``r`` loads the saved instance ``r % saved_world_size`` (node ``i``
  the ``i % saved_nodes``-th node instance; a group its leader's instance if present,
  else the first saved group's).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ckptsvc.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    StateMismatchError,
)
from ckptsvc.format.manifest import ComponentRecord, Manifest, check_relpath
from ckptsvc.gc_pause import with_gc_paused
from ckptsvc.ranks import RankInfo, resolve_groups
from ckptsvc.read.discovery import require_checkpoint_path, require_complete_checkpoint
from ckptsvc.read.legacy import load_legacy_state
from ckptsvc.read.loading import read_checked_doc
from ckptsvc.read.node_cache import replicated_files
from ckptsvc.read.regions import RegionReader
from ckptsvc.stage.components import SharingPattern, StateComponent, check_unique_keys
from ckptsvc.stage.flatten import flatten_state, is_dtensor, unflatten_state
from ckptsvc.stage.parts import DOC_FORMAT, DOC_VERSION, instance_suffix
from ckptsvc.stage.sharded_plan import Piece, local_region
from ckptsvc.stage.state_components import STATE_ROOT, HeldState
from ckptsvc.storage import Location

__all__ = ["WORLD_SIZE_POLICIES", "load_components", "load_state", "to_device"]

logger = logging.getLogger(__name__)

WORLD_SIZE_POLICIES = ("error", "skip", "wrap")


def _instances(rec: ComponentRecord, where: str) -> tuple[dict[str, Any], int]:
    ours = rec.metadata.get("ckptsvc")
    if not isinstance(ours, dict) or not isinstance(ours.get("instances"), dict):
        raise CorruptCheckpointError(
            f"{where}: component {rec.key!r} was not written by save_components (no instances)"
        )
    return ours["instances"], int(ours.get("world_size") or 1)


def _pick_instance(
    c: StateComponent,
    rec: ComponentRecord,
    instances: Mapping[str, Any],
    saved_world: int,
    *,
    info: RankInfo,
    process_groups: Mapping[str, Any] | None,
    policy: str,
    where: str,
) -> str | None:
    """The instance suffix this rank loads, or ``None`` to skip (policy ``skip``)."""
    try:
        pattern = SharingPattern(rec.sharing_pattern)
    except ValueError as e:
        raise CorruptCheckpointError(
            f"{where}: component {rec.key!r} has unknown sharing pattern {rec.sharing_pattern!r}"
        ) from e
    single = pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED)
    if single or rec.metadata.get("ckptsvc", {}).get("sharded"):
        if "" not in instances:
            raise CorruptCheckpointError(f"{where}: component {rec.key!r} lists no saved copy")
        return ""
    if pattern is SharingPattern.PER_RANK:
        want = instance_suffix(pattern, rank=info.rank, node_index=info.node_index)
        wrapped = instance_suffix(pattern, rank=info.rank % saved_world, node_index=0)
        moved = saved_world != info.world_size
        what = f"saved by {saved_world} ranks, loading at {info.world_size}"
    elif pattern is SharingPattern.PER_NODE:
        want = instance_suffix(pattern, rank=info.rank, node_index=info.node_index)
        nodes = sorted(instances, key=lambda s: int(s.rsplit("_", 1)[1]))
        wrapped = nodes[info.node_index % len(nodes)] if nodes else want
        moved = want not in instances or saved_world != info.world_size
        what = f"saved on nodes {nodes} by {saved_world} ranks; this is node {info.node_index} of {info.world_size} ranks"
    else:
        name = c.process_group_name or rec.group_name or ""
        ranks = resolve_groups({name}, process_groups, info)[name]
        want = instance_suffix(
            pattern, rank=info.rank, node_index=info.node_index,
            group_name=name, group_leader=ranks[0],
        )  # fmt: skip
        saved = sorted(instances)
        wrapped = want if want in instances else (saved[0] if saved else want)
        moved = want not in instances or saved_world != info.world_size
        what = f"saved groups {saved} by {saved_world} ranks; this rank's group is {want!r}"
    if not moved:
        return want
    if policy == "skip":
        logger.warning("%s: component %r (%s) not loaded: %s", where, c.key, pattern.value, what)
        return None
    if policy == "wrap" and wrapped in instances:
        logger.warning("%s: component %r: %s; loading instance %r", where, c.key, what, wrapped)
        return wrapped
    raise StateMismatchError(
        f"{where}: component {c.key!r} is {pattern.value} state {what}; its per-rank state "
        "cannot be mapped onto a different world implicitly. Pass world_size_policy='skip' "
        "(keep fresh state) or 'wrap' (rank r loads saved rank r % saved world size)"
    )


def _read_doc(
    ckpt: Location, name: str, *, manifest: Manifest | None, reader: RegionReader
) -> dict[str, Any]:
    """A component document, read bounded and checked against the manifest's record: a
    JSON file, or the header of the tensor file it was folded into (``.safetensors``)."""
    if name.endswith(".safetensors"):
        doc = reader.document(check_relpath(name, where=ckpt.url))
    else:
        doc = read_checked_doc(ckpt, name, manifest=manifest, what="component document")
    loc = ckpt.join(name)  # a safe relative path: read_checked_doc checked it
    if not isinstance(doc, dict) or doc.get("format") != DOC_FORMAT or "state" not in doc:
        raise CorruptCheckpointError(f"{loc.url}: not a ckptsvc component document")
    if not isinstance(doc.get("version"), int) or doc["version"] > DOC_VERSION:
        raise CorruptCheckpointError(
            f"{loc.url}: component document version {doc.get('version')!r} is newer than this "
            "ckptsvc understands; upgrade ckptsvc"
        )
    return doc


def _template(c: StateComponent, doc: Mapping[str, Any]) -> dict[str, Any]:
    """FQN -> live tensor of the stateful's current state (to find DTensors and devices).

    A ``torch.optim.Optimizer`` whose state is still empty (a fresh optimizer about to be
    resumed) maps ``state.<i>.<name>`` to parameter ``i`` when the shapes match, so the
    state of a sharded parameter is loaded sharded like the parameter.
    """
    try:
        template = dict(flatten_state(c.stateful.state_dict(), allow_dtensor=True).tensors)
    except CheckpointError:
        template = {}
    if isinstance(c.stateful, torch.optim.Optimizer):
        params = [p for g in c.stateful.param_groups for p in g["params"]]
        for fqn, info in (doc.get("tensors") or {}).items():
            m = _OPT_STATE.match(fqn)
            if fqn in template or m is None or int(m.group(1)) >= len(params):
                continue
            param = params[int(m.group(1))]
            if is_dtensor(param) and list(param.shape) == list(info.get("shape") or ()):
                template[fqn] = param
    return template


_OPT_STATE = re.compile(r"^state\.(\d+)\.[^.]+$")


def _read_tensors(
    ckpt: Location,
    doc: Mapping[str, Any],
    template: Mapping[str, Any],
    reader: RegionReader,
    *,
    in_place: bool = False,
) -> dict[str, Any]:
    """Every tensor of a component document: whole stored tensors in one pass per file
    (into the live tensors of ``template`` when ``in_place``), regions of sharded ones."""
    where = ckpt.url
    tensors = doc.get("tensors") or {}
    if not isinstance(tensors, dict):
        raise CorruptCheckpointError(f"{where}: component document 'tensors' is not an object")
    pending: list[tuple[str, torch.Tensor, Any]] = []
    for fqn, info in tensors.items():
        try:
            dtype, shape = str(info["dtype"]), tuple(int(x) for x in info["shape"])
            if "pieces" in info:
                pieces = [Piece.from_dict(p, where=where) for p in info["pieces"]]
            else:
                pieces = [Piece(check_relpath(info["file"], where=where), (0,) * len(shape), shape)]
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{where}: tensor {fqn!r}: malformed entry ({e})") from e
        for p in pieces:
            check_relpath(p.file, where=where)
        live = template.get(fqn)
        if live is not None and is_dtensor(live):
            if tuple(live.shape) != shape:
                raise StateMismatchError(
                    f"{where}: tensor {fqn!r} was saved with global shape {list(shape)} but the "
                    f"live DTensor has {list(live.shape)}"
                )
            offsets, local_shape = local_region(live)
        elif "pieces" not in info:  # a whole stored tensor: one pass over its file
            dest = live if in_place and isinstance(live, torch.Tensor) else None
            reader.want_whole(fqn, dtype, pieces[0].file, shape, dest)
            continue
        else:
            offsets, local_shape = (0,) * len(shape), shape
        pending.append((fqn, reader.want(fqn, dtype, pieces, offsets, local_shape), live))
    out: dict[str, Any] = reader.run()
    for fqn, t, live in pending:
        if live is not None and is_dtensor(live):
            from torch.distributed.tensor import DTensor

            local = t.to(live.to_local().device)
            out[fqn] = DTensor.from_local(
                local, live.device_mesh, live.placements, run_check=False,
                shape=live.shape, stride=live.stride(),
            )  # fmt: skip
        else:
            out[fqn] = t
    return out


@with_gc_paused
def load_components(
    path: str,
    components: Sequence[StateComponent],
    *,
    process_groups: Mapping[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    strict: bool = True,
    world_size_policy: str = "error",
    rank: int | None = None,
) -> None:
    """Restore each component's state from the checkpoint (see the module docstring).

    ``strict`` is passed to ``nn.Module.load_state_dict``; with ``strict=False`` a
    missing *required* component is also only a warning. ``path=None`` (no checkpoint
    found) raises :class:`~ckptsvc.errors.CheckpointNotFoundError`.
    """
    require_checkpoint_path(path, caller="load_components")
    if world_size_policy not in WORLD_SIZE_POLICIES:
        raise ConfigError(
            f"world_size_policy must be one of {WORLD_SIZE_POLICIES}, not {world_size_policy!r}"
        )
    check_unique_keys(list(components))
    ckpt = Location.parse(path, storage_options)
    info = RankInfo.current(rank=rank)
    manifest = _manifest_for(ckpt, info)
    records = {r.key: r for r in manifest.components}
    for c in components:
        rec = records.get(c.key)
        if rec is None:
            msg = (
                f"{ckpt.url}: the checkpoint has no component {c.key!r} (it has {sorted(records)})"
            )
            if c.required and strict:
                raise StateMismatchError(msg)
            logger.warning("%s; skipping it", msg)
            continue
        loaded = _read_component(
            ckpt, manifest, c, rec, info=info, process_groups=process_groups,
            policy=world_size_policy,
        )  # fmt: skip
        if loaded is not None:
            _apply(c, loaded[0], strict=strict, where=ckpt.url)


def _manifest_for(ckpt: Location, info: RankInfo) -> Manifest:
    """The manifest a rank loads with: in a multi-rank job its own view of a v3 manifest
    (the head and its region: bytes read independent of the job's size), the whole
    manifest when the job's world size differs from the saved one (``wrap`` may need
    another rank's region) or when the job has one rank."""
    if info.world_size <= 1:
        return require_complete_checkpoint(ckpt)
    manifest = require_complete_checkpoint(ckpt, view_rank=info.rank)
    if manifest.view_rank is not None and manifest.world_size != info.world_size:
        return require_complete_checkpoint(ckpt)
    return manifest


def _read_component(
    ckpt: Location,
    manifest: Manifest,
    c: StateComponent,
    rec: ComponentRecord,
    *,
    info: RankInfo,
    process_groups: Mapping[str, Any] | None,
    policy: str,
) -> tuple[Any] | None:
    """Steps 2-4 for one component: ``(its state,)``, or ``None`` when the policy skips it."""
    instances, saved_world = _instances(rec, ckpt.url)
    suffix = _pick_instance(
        c, rec, instances, saved_world, info=info, process_groups=process_groups,
        policy=policy, where=ckpt.url,
    )  # fmt: skip
    if suffix is None:
        return None
    doc_file = instances[suffix].get("doc")
    if not doc_file:
        raise CorruptCheckpointError(
            f"{ckpt.url}: component {c.key!r} instance {suffix!r} has no document"
        )
    files = replicated_files(  # one download per node of a replicated file (read.node_cache)
        ckpt, manifest, sharing_pattern=rec.sharing_pattern,
        sharded=bool(rec.metadata.get("ckptsvc", {}).get("sharded")),
        local_world_size=info.local_world_size,
    )  # fmt: skip
    reader = RegionReader(ckpt, manifest=manifest, files=files)
    try:
        doc = _read_doc(ckpt, doc_file, manifest=manifest, reader=reader)
        tensors = _read_tensors(
            ckpt, doc, _template(c, doc), reader, in_place=_loads_in_place(c.stateful)
        )
    finally:
        if files is not None:
            files.close()
    logger.debug("read component %r from %s (%s)", c.key, ckpt.url, doc_file)
    return (unflatten_state(doc, tensors),)


def _loads_in_place(stateful: Any) -> bool:
    """A module's state is read straight into its parameters and buffers (its
    ``load_state_dict`` then copies each onto itself, which torch skips); other statefuls
    (an optimizer's state is replaced, not filled) get fresh tensors."""
    if not isinstance(stateful, torch.nn.Module):
        return False
    return not any(
        m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks for m in stateful.modules()
    )


def _is_component_layout(manifest: Manifest) -> bool:
    return all(isinstance(r.metadata.get("ckptsvc"), dict) for r in manifest.components)


@with_gc_paused
def load_state(
    path: str,
    *,
    storage_options: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    rank: int | None = None,
) -> Any:
    """The state a checkpoint holds, rebuilt: what ``AsyncCheckpointer.save(step, state)``
    was given (its modules and optimizers as their state dicts), or, for a checkpoint of
    ``save_components``, ``{key: state}`` for every component (the instance this rank
    would load), in the manifest's order. Tensors are moved to ``device``.

    Checkpoints written before the component layout (``ckptsvc_state.json``) load as
    before; a checkpoint of ``save_checkpoint`` returns its flat ``{fqn: tensor}`` dict.
    Raises :class:`~ckptsvc.errors.CheckpointNotFoundError` /
    :class:`~ckptsvc.errors.IncompleteCheckpointError` unless the checkpoint is complete,
    also for ``path=None`` (what ``find_latest_checkpoint`` returns when there is none).
    """
    require_checkpoint_path(path, caller="load_state")
    ckpt = Location.parse(path, storage_options)
    info = RankInfo.current(rank=rank)
    manifest = _manifest_for(ckpt, info)
    if not manifest.components and not manifest.files:  # save(step, {}): nothing to hold
        return {}
    if not manifest.components or not _is_component_layout(manifest):
        return load_legacy_state(ckpt, manifest, device=device)
    out: dict[str, Any] = {}
    for rec in manifest.components:
        holder = HeldState(None)
        c = StateComponent(
            key=rec.key,
            stateful=holder,
            sharing_pattern=SharingPattern.GLOBAL,  # _pick_instance reads the record's
            process_group_name=rec.group_name,
        )
        loaded = _read_component(
            ckpt, manifest, c, rec, info=info, process_groups=None, policy="error"
        )
        state = to_device(loaded[0] if loaded else None, torch.device(device))
        if rec.metadata.get(STATE_ROOT):
            return state
        out[rec.key] = state
    return out


def to_device(state: Any, device: torch.device) -> Any:
    """``state`` with every tensor moved to ``device`` (containers rebuilt; tensors that are
    one object stay one object, so tied weights stay tied)."""
    if device.type == "cpu":
        return state
    memo: dict[int, torch.Tensor] = {}  # tied tensors stay tied

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            if id(v) not in memo:
                memo[id(v)] = v.to(device)
            return memo[id(v)]
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        return v

    return move(state)


def _apply(c: StateComponent, state: Any, *, strict: bool, where: str) -> None:
    try:
        if isinstance(c.stateful, torch.nn.Module):
            c.stateful.load_state_dict(state, strict=strict)
        else:
            c.stateful.load_state_dict(state)
    except CheckpointError:
        raise
    except Exception as e:
        raise StateMismatchError(
            f"{where}: component {c.key!r}: load_state_dict failed ({type(e).__name__}: {e})"
        ) from e
