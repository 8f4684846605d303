"""Which rank writes which part of each state component, under which file names.

Every rank runs :func:`plan_components` on its own components and decides, from what
every rank knows without communication (names, shapes, dtypes, sharing pattern, rank,
world size, node index, group membership), what it writes. Two ranks that plan the same
component therefore agree on the split without a collective.

File naming (``base`` is ``model`` for the component keyed ``model``, else
``<key>_state``; ``suffix`` names the instance):

==============  =========================  ===============================================
pattern         instance suffix            written by
==============  =========================  ===============================================
GLOBAL          ``""``                     rank 0
REPLICATED      ``""``                     ranks spread over the job, one per
                                           ``CKPTSVC_REPLICATED_WRITER_MIN_BYTES`` of
                                           tensors (at most every rank): split by bytes
                                           (LPT)
PER_RANK        ``_rank_<r>``              every rank, its own
PER_GROUP       ``_group_<name>_<leader>`` the lowest global rank of each group
PER_NODE        ``_node_<node index>``     local rank 0 of each node
DTensor inside  ``""``                     every rank its local shards (``-rank<r>`` files)
==============  =========================  ===============================================

Tensor files: for an unsharded model as transformers' ``save_pretrained`` writes them,
``model.safetensors`` in one shard, else ``model-<i>-of-<n>.safetensors`` plus
``model.safetensors.index.json``; ``<base><suffix>.safetensors`` or
``<base><suffix>-<i>-of-<n>`` otherwise; ``<base>-rank<r>[-<i>-of-<n>].safetensors`` for
sharded state. Every instance has one JSON document: the non-tensor skeleton plus
``tensors`` = ``{fqn: {"dtype", "shape", "file"}}`` or, for sharded state,
``{fqn: {"dtype", "shape" (global), "pieces": [{"file", "offsets", "shape"}]}}``. For an
instance with tensor files it is the string ``__metadata__["ckptsvc_component"]`` of its
first tensor file's safetensors header (:func:`fold_document`), so the instance is its
tensor files alone; the manifest names that file as the instance's ``doc``. It is the file
``<key>_state<suffix>.json`` for an instance without tensors, a document over
``MAX_FOLDED_DOC_BYTES``, and sharded state (rank 0 merges that document at commit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ckptsvc import hooks, knobs
from ckptsvc.errors import ConfigError, InvalidStateError
from ckptsvc.format.hf_files import cached_pretrained_files
from ckptsvc.format.layout import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    FilePlan,
    TensorSpec,
    assign_shards,
    encode_index,
    frozen_groups,
    make_index,
)
from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME
from ckptsvc.format.safetensors_stream import plan_shard, with_metadata
from ckptsvc.ranks import RankInfo, resolve_groups
from ckptsvc.stage.components import SharingPattern, StateComponent, check_unique_keys
from ckptsvc.stage.flatten import (
    FlatState,
    flatten_state,
    frozen_parameter_names,
    invalid_state_error,
    is_dtensor,
)
from ckptsvc.stage.incremental import frozen_files
from ckptsvc.stage.parts import (
    DOC_FORMAT,
    DOC_META_KEY,
    MAX_FOLDED_DOC_BYTES,
    MODEL_KEY,
    SHARD_META,
    ComponentPlan,
    DocInputs,
    PartReport,
    StagedFile,
    base_name,
    component_doc,
    doc_name,
    instance_suffix,
    json_bytes,
    signature,
)
from ckptsvc.stage.sharded_plan import plan_sharded
from ckptsvc.stage.state_components import STATE_ROOT
from ckptsvc.stage.tensors import dtype_from_torch

if TYPE_CHECKING:  # plan_reuse builds on this module
    from ckptsvc.stage.plan_reuse import PlanReuse

__all__ = [
    "DOC_FORMAT",
    "MODEL_KEY",
    "ComponentPlan",
    "PartReport",
    "StagedFile",
    "doc_name",
    "fold_document",
    "instance_suffix",
    "plan_components",
]


def split_by_bytes(specs: Sequence[TensorSpec], ways: int) -> list[list[TensorSpec]]:
    """Deterministic LPT split: biggest tensor first to the least-loaded part (ties: lowest
    index); each part keeps the input order. Identical on every rank for identical specs."""
    loads = [0] * ways
    owner: dict[str, int] = {}
    for s in sorted(specs, key=lambda s: (-s.nbytes, s.name)):
        p = min(range(ways), key=lambda i: (loads[i], i))
        owner[s.name] = p
        loads[p] += s.nbytes
    return [[s for s in specs if owner[s.name] == p] for p in range(ways)]


def _file_name(key: str, suffix: str, number: int, count: int) -> str:
    if key == MODEL_KEY and not suffix:  # as transformers' save_pretrained names them
        if count == 1:
            return SAFE_WEIGHTS_NAME
        return f"model-{number:05}-of-{count:05}.safetensors"
    if count == 1:
        return f"{base_name(key)}{suffix}.safetensors"
    return f"{base_name(key)}{suffix}-{number:05}-of-{count:05}.safetensors"


def _plan_files(
    key: str,
    suffix: str,
    parts: Sequence[Sequence[TensorSpec]],
    *,
    max_shard_size: int,
    frozen: frozenset[str] = frozenset(),
) -> list[list[FilePlan]]:
    """Cut each part into files of at most ``max_shard_size`` tensor bytes, numbered
    across all parts (``frozen`` tensors in files of their own); returns the file plans
    of each part."""
    assigned = assign_shards(
        [g for part in parts for g in frozen_groups([(s.name, s.nbytes) for s in part], frozen)],
        max_shard_size=max_shard_size,
        safetensors=True,
    )
    numbers = sorted(set(assigned.values()))
    rename = {old: _file_name(key, suffix, i + 1, len(numbers)) for i, old in enumerate(numbers)}
    out: list[list[FilePlan]] = []
    for part in parts:
        by_file: dict[str, list[TensorSpec]] = {}
        for s in part:
            by_file.setdefault(rename[assigned[s.name]], []).append(s)
        out.append(
            [
                FilePlan(
                    name,
                    plan_shard(((s.name, s.dtype, s.shape) for s in members), metadata=SHARD_META),
                )
                for name, members in by_file.items()
            ]
        )
    return out


def _specs(flat: FlatState) -> list[TensorSpec]:
    return [
        TensorSpec(n, d, tuple(t.shape))
        for (n, t), d in zip(flat.tensors, flat.dtypes, strict=True)
    ]


def _plan_plain(
    c: StateComponent,
    flat: FlatState,
    *,
    info: RankInfo,
    suffix: str,
    writers: tuple[int, ...],
    max_shard_size: int,
    user_metadata: Mapping[str, Any],
    incremental: bool = False,
) -> ComponentPlan:
    """A component without DTensors: one instance, its tensors split over ``writers``."""
    specs = _specs(flat)
    sig = signature([(s.name, s.dtype, s.shape) for s in specs], flat.skeleton)
    parts = split_by_bytes(specs, len(writers))
    frozen = flat.frozen if incremental else frozenset()
    plans = _plan_files(c.key, suffix, parts, max_shard_size=max_shard_size, frozen=frozen)
    file_of = {e.name: fp.file_name for part in plans for fp in part for e in fp.layout.entries}
    my_index = writers.index(info.rank) if info.rank in writers else None
    # "quick" compares the structure (signature) only; "tensor" / "full" also every byte
    validate = c.validate_replication and c.validation_level in ("tensor", "full")
    sources = dict(flat.tensors)
    staged: list[StagedFile] = []
    for p, files_of_part in enumerate(plans):
        if p != my_index and not (validate and my_index is not None):
            continue
        for fp in files_of_part:
            src = {e.name: sources[e.name] for e in fp.layout.entries}
            staged.append(StagedFile(fp, src, write=p == my_index))
    mine = tuple(f.plan.file_name for f in staged if f.write)
    docs: dict[str, bytes] = {}
    inputs = None
    if my_index == 0:  # the first writer publishes the instance document (and HF index)
        tensors = {
            s.name: {"dtype": s.dtype, "shape": list(s.shape), "file": file_of[s.name]}
            for s in specs
        }
        # several model shards get the HF index; one is model.safetensors alone (as
        # transformers writes it): its tied groups are in the document, in its header
        indexed = c.key == MODEL_KEY and not suffix and len(set(file_of.values())) > 1
        inputs = DocInputs(
            doc_name(c.key, suffix),
            tensors,
            weight_map={s.name: file_of[s.name] for s in sorted(specs, key=lambda s: s.name)}
            if indexed
            else None,
            total_size=sum(s.nbytes for s in specs),
            param_sharing=flat.param_sharing,
        )
        docs[inputs.doc_file] = json_bytes(component_doc(c, flat, tensors))
        if inputs.weight_map is not None:
            docs[SAFE_WEIGHTS_INDEX_NAME] = index_bytes(inputs, user_metadata)
        docs.update(model_files(c, suffix))
        add_component_files(c, docs, mine)
    part = PartReport(
        key=c.key,
        pattern=c.sharing_pattern.value,
        group_name=c.process_group_name,
        instance=suffix if my_index is not None else None,
        doc=None if inputs is None else inputs.doc_file,
        files=tuple(sorted([*mine, *docs])),
        nbytes=files_nbytes(staged) + sum(map(len, docs.values())),
        signature=sig,
        replicas=(
            tuple(range(info.world_size))
            if c.sharing_pattern is SharingPattern.REPLICATED
            else None
        ),
        metadata=dict(c.metadata),
    )
    crc_names = tuple(s.name for s in specs) if validate and my_index is not None else ()
    reusable = frozen_files([f.plan for f in staged if f.write], frozen)
    return ComponentPlan(
        c, part, staged, docs, crc_names=crc_names, frozen_files=reusable, doc_inputs=inputs
    )


def files_nbytes(staged: Sequence[StagedFile]) -> int:
    """Bytes of the tensor files this rank writes."""
    return sum(f.plan.layout.file_nbytes for f in staged if f.write)


def index_bytes(inputs: DocInputs, user_metadata: Mapping[str, Any]) -> bytes:
    """The HF index of a model component (``inputs.weight_map`` set), with the user's metadata."""
    index = make_index(
        inputs.weight_map or {},
        total_size=inputs.total_size,
        metadata=dict(user_metadata),
        param_sharing=[list(g) for g in inputs.param_sharing] or None,
    )
    return encode_index(index)


def model_files(c: StateComponent, suffix: str) -> dict[str, bytes]:
    """``config.json`` & co. of a transformers model component (so ``from_pretrained``
    works), cached while the configs' JSON is unchanged; ``{}`` for anything else."""
    if c.key != MODEL_KEY or suffix or getattr(c.stateful, "config", None) is None:
        return {}
    return cached_pretrained_files(c.stateful)


def add_component_files(c: StateComponent, docs: dict[str, bytes], shards: tuple[str, ...]) -> None:
    """``c.files`` join the instance's small files; a name ckptsvc writes itself is refused."""
    # the HF weight names too: a reader would take such a file for the model's weights
    reserved = {
        *docs,
        *shards,
        MANIFEST_NAME,
        MARKER_NAME,
        SAFE_WEIGHTS_NAME,
        SAFE_WEIGHTS_INDEX_NAME,
    }
    clash = sorted(set(c.files) & reserved)
    if clash:
        raise ConfigError(
            f"StateComponent {c.key!r}: files {clash} would overwrite files ckptsvc writes "
            "in the checkpoint; rename them"
        )
    docs.update(c.files)


def _writers(
    c: StateComponent,
    info: RankInfo,
    groups: Mapping[str, tuple[int, ...]],
    nbytes: int,
) -> tuple[str, tuple[int, ...]]:
    """(instance suffix, ranks that write it) for this rank's instance of ``c``, whose
    tensors hold ``nbytes`` (the writers of a REPLICATED component depend on them)."""
    pattern = c.sharing_pattern
    if pattern is SharingPattern.GLOBAL:
        return "", (0,)
    if pattern is SharingPattern.REPLICATED:
        return "", replicated_writers(c, info.world_size, nbytes)
    if pattern is SharingPattern.PER_RANK:
        return instance_suffix(pattern, rank=info.rank, node_index=info.node_index), (info.rank,)
    if pattern is SharingPattern.PER_NODE:
        leader = info.rank - info.local_rank
        return instance_suffix(pattern, rank=info.rank, node_index=info.node_index), (leader,)
    ranks = groups[c.process_group_name or ""]
    suffix = instance_suffix(
        pattern, rank=info.rank, node_index=info.node_index,
        group_name=c.process_group_name, group_leader=ranks[0],
    )  # fmt: skip
    return suffix, (ranks[0],)


def replicated_writers(c: StateComponent, world_size: int, nbytes: int) -> tuple[int, ...]:
    """The ranks that write a REPLICATED component of ``nbytes`` tensor bytes: enough
    that each writes ``CKPTSVC_REPLICATED_WRITER_MIN_BYTES`` or more (every rank when the
    replicas' bytes are compared: each stages them), spread evenly over the ranks (so
    over the nodes). The same on every rank (the same state, the same sizes)."""
    ranks = tuple(range(world_size))
    if c.validate_replication and c.validation_level in ("tensor", "full"):
        return ranks
    k = max(1, min(world_size, -(-nbytes // knobs.REPLICATED_WRITER_MIN_BYTES.get())))
    return tuple(ranks[i * world_size // k] for i in range(k))


def component_state(c: StateComponent) -> Any:
    """``c.stateful.state_dict()``; a failure is an :class:`InvalidStateError` naming ``c``."""
    try:
        return c.stateful.state_dict()
    except Exception as e:
        raise InvalidStateError(
            f"component {c.key!r}: state_dict() failed ({type(e).__name__}: {e})"
        ) from e


def plan_components(
    components: Sequence[StateComponent],
    *,
    info: RankInfo,
    process_groups: Mapping[str, Any] | None,
    max_shard_size: int,
    user_metadata: Mapping[str, Any],
    incremental: bool = False,
    reuse: PlanReuse | None = None,
) -> list[ComponentPlan]:
    """Plan every component for this rank (calls each ``stateful.state_dict()``).

    With ``incremental``, frozen parameters (``requires_grad=False``) get files of their
    own, listed in ``ComponentPlan.frozen_files`` (see :mod:`ckptsvc.stage.incremental`).
    With ``reuse``, a component whose state has the signature of its last save takes
    that plan rebound to the new tensors instead (:mod:`ckptsvc.stage.plan_reuse`); the
    hook point ``plan.component`` reports each component planned or reused."""
    check_unique_keys(list(components))
    names = {
        c.process_group_name for c in components if c.sharing_pattern is SharingPattern.PER_GROUP
    }
    groups = resolve_groups({n for n in names if n}, process_groups, info)
    out: list[ComponentPlan | None] = []
    flats: list[FlatState | None] = []
    states: list[Any] = []
    problems: list[tuple[str, str]] = []
    for c in components:  # every component is checked before any is planned
        state = component_state(c)
        states.append(state)
        reused = None
        if reuse is not None:
            # a reused plan has the same tensors, so the bytes of the last save's
            suffix, writers = _writers(c, info, groups, reuse.tensor_nbytes(c.key))
            reused = reuse.rebind(
                c, state, suffix=suffix, writers=writers, user_metadata=user_metadata
            )
            reused = None if reused is None else fold_document(reused)
        out.append(reused)
        if reused is not None:
            flats.append(None)
            continue
        try:
            # keys in messages are dotted from what the caller handed over
            prefix = "" if c.metadata.get(STATE_ROOT) else c.key
            flats.append(flatten_state(state, allow_dtensor=True, key_prefix=prefix))
        except InvalidStateError as e:
            if not e.problems:
                raise
            problems += e.problems
    if problems:
        raise invalid_state_error(problems, what="the components' state")
    for i, (c, flat) in enumerate(zip(components, flats, strict=True)):
        hooks.point("plan.component", key=c.key, reused=flat is None)
        if flat is not None:
            out[i] = _plan_flat(
                c,
                flat,
                states[i],
                info=info,
                groups=groups,
                max_shard_size=max_shard_size,
                user_metadata=user_metadata,
                incremental=incremental,
                reuse=reuse,
            )
    plans = [p for p in out if p is not None]
    _check_files_unique(plans)
    return plans


def _plan_flat(
    c: StateComponent,
    flat: FlatState,
    state: Any,
    *,
    info: RankInfo,
    groups: Mapping[str, tuple[int, ...]],
    max_shard_size: int,
    user_metadata: Mapping[str, Any],
    incremental: bool,
    reuse: PlanReuse | None,
) -> ComponentPlan:
    """Plan one flattened component (sharded when it holds DTensors)."""
    if incremental and isinstance(c.stateful, torch.nn.Module):  # state_dict() detached
        frozen = flat.frozen | frozen_parameter_names(c.stateful)
        flat = replace(flat, frozen=frozenset(n for n, _ in flat.tensors if n in frozen))
    if any(is_dtensor(t) for _, t in flat.tensors):
        if c.files:
            raise ConfigError(
                f"StateComponent {c.key!r} holds DTensors and files {sorted(c.files)}: "
                "sharded components take no files; put them in a GLOBAL component"
            )
        return plan_sharded(c, flat, info=info, max_shard_size=max_shard_size)
    nbytes = sum(t.numel() * t.element_size() for _, t in flat.tensors)
    suffix, writers = _writers(c, info, groups, nbytes)
    plan = _plan_plain(
        c,
        flat,
        info=info,
        suffix=suffix,
        writers=writers,
        max_shard_size=max_shard_size,
        user_metadata=user_metadata,
        incremental=incremental,
    )
    if reuse is not None:
        reuse.remember(c, state, flat, plan, suffix=suffix, writers=writers)
    return fold_document(plan)


def fold_document(plan: ComponentPlan) -> ComponentPlan:
    """``plan`` with its instance document moved into the ``__metadata__`` of its first
    written tensor file (by name; not a file of frozen tensors that an incremental save
    may take from an older checkpoint), when this rank publishes the document (any
    pattern: GLOBAL, REPLICATED, per rank, node or group) and writes such a file, and the
    document is at most ``MAX_FOLDED_DOC_BYTES``: one object per instance instead of two.
    Other plans as they are (a component without tensors keeps ``<key>_state.json``)."""
    inputs, part = plan.doc_inputs, plan.part
    if inputs is None or part.instance is None or inputs.doc_file not in plan.docs:
        return plan
    if len(plan.docs[inputs.doc_file]) > MAX_FOLDED_DOC_BYTES:
        return plan
    ours = [
        i for i, f in enumerate(plan.files)
        if f.write and f.plan.file_name not in plan.frozen_files
    ]  # fmt: skip
    if not ours:
        return plan
    i = min(ours, key=lambda i: plan.files[i].plan.file_name)
    old = plan.files[i]
    docs = dict(plan.docs)
    doc = docs.pop(inputs.doc_file).decode("ascii")
    layout = with_metadata(old.plan.layout, {**SHARD_META, DOC_META_KEY: doc})
    files = list(plan.files)
    files[i] = replace(
        old, plan=FilePlan(old.plan.file_name, layout), arena_header=old.plan.layout.header
    )
    grown = layout.file_nbytes - old.plan.layout.file_nbytes - len(doc)
    part = replace(
        part,
        doc=old.plan.file_name,
        files=tuple(f for f in part.files if f != inputs.doc_file),
        nbytes=part.nbytes + grown,
    )
    return replace(plan, part=part, files=files, docs=docs)


def _check_files_unique(plans: Sequence[ComponentPlan]) -> None:
    """A component's ``files`` must not name a file another component writes here."""
    for p in plans:
        others = {f for q in plans if q is not p for f in q.part.files}
        clash = sorted(set(p.component.files) & others)
        if clash:
            raise ConfigError(
                f"StateComponent {p.component.key!r}: files {clash} would overwrite files "
                "another component writes in the checkpoint; rename them"
            )


def dtype_name(t: torch.Tensor, fqn: str) -> str:
    return dtype_from_torch(t.dtype, name=fqn)
