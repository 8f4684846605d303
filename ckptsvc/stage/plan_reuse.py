"""Reusing a component's save plan while its state keeps the same signature.

The first save of a component plans it (:func:`~ckptsvc.stage.component_plan.plan_components`);
:meth:`PlanReuse.remember` then keeps a *template* of the state it planned: its structure
(mapping keys, list lengths, which values are tensors, in walk order), the signature of
every tensor (type, dtype, shape, data pointer, and ``requires_grad`` of parameters) and the parts of its documents that depend on the structure only, encoded
once. A later save walks the component's new ``state_dict()`` along the template
(:meth:`PlanReuse.rebind`): a mapping of tensors is taken whole (one comparison of its
keys, its values in one call), the signatures are compared tuple against tuple, and only
the non-tensor values are encoded again; the plan's files get the new tensors as sources.
No per-tensor storage walk, layout, header or JSON encoding is repeated.

Any difference - a key, a shape, a dtype, a tensor newly tied or untied, a tensor
without storage, a value of another kind, a frozen parameter (``incremental``) - returns None and
the component is planned afresh (and that plan remembered). Data pointers: the same
tensors at the same addresses cannot have changed their sharing; when pointers moved
(new tensors), the tied groups are recomputed from the signatures already taken
(:func:`~ckptsvc.stage.tied_params.groups_of_views`) and must be the same.

Planned every save: components holding DTensors (sharded), states holding objects with
``state_dict()`` below the component itself, and values other than tensors, mappings,
lists, tuples and JSON scalars (NumPy scalars, say).
"""

from __future__ import annotations

import functools
import json
import math
import operator
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ckptsvc.format.layout import SAFE_WEIGHTS_INDEX_NAME, FilePlan
from ckptsvc.stage.component_plan import (
    add_component_files,
    files_nbytes,
    index_bytes,
    model_files,
)
from ckptsvc.stage.components import StateComponent
from ckptsvc.stage.flatten import MARKERS, MAX_INT_DIGITS, FlatState, frozen_parameter_names
from ckptsvc.stage.parts import (
    ComponentPlan,
    DocInputs,
    OrderedSources,
    PartReport,
    StagedFile,
    component_doc,
    json_bytes,
    signature_of,
    spec_digest,
)
from ckptsvc.stage.tied_params import groups_of_views, view_key

__all__ = ["PlanReuse"]

_TENSOR, _TENSORS, _VALUE, _MAP, _DICT, _LIST, _TUPLE = range(7)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_PLAIN_MARKERS = frozenset(MARKERS.values())
_INT_LIMIT = 10**MAX_INT_DIGITS
#: components whose last plan is kept (one checkpointer rarely saves more)
MAX_COMPONENTS = 64


class _Mismatch(Exception):
    """The state does not fit the template (internal: the component is planned afresh)."""


@dataclass(frozen=True, eq=False)
class _Node:
    """One value of the state as planned: a tensor, a mapping of tensors (``placeholder``
    stands for its skeleton, pre-encoded), a JSON scalar, or a container of nodes."""

    kind: int
    keys: tuple[Any, ...] = ()
    children: tuple[_Node, ...] = ()
    fqns: tuple[str, ...] = ()
    placeholder: str = ""
    key_types: tuple[type, ...] = ()
    key_skeletons: tuple[Any, ...] = ()


_VALUE_NODE = _Node(_VALUE)


def _template(v: Any, skel: Any, fragments: dict[str, bytes], nonce: str) -> _Node:
    """The node of value ``v`` whose skeleton (from :func:`flatten_state`) is ``skel``."""
    if isinstance(v, torch.Tensor):
        if type(v) not in _TENSOR_TYPES:
            raise _Mismatch
        return _Node(_TENSOR, fqns=(skel[MARKERS["tensor"]],))
    if v is None or isinstance(v, (bool, int, float, str)):
        return _VALUE_NODE
    if isinstance(v, Mapping):
        keys = tuple(v)
        if all(isinstance(k, str) for k in keys) and not (
            len(keys) == 1 and keys[0] in _PLAIN_MARKERS
        ):
            if keys and all(type(x) in _TENSOR_TYPES for x in v.values()):
                placeholder = f"{nonce}-{len(fragments)}"
                fragments[placeholder] = json_bytes(skel)
                fqns = tuple(skel[k][MARKERS["tensor"]] for k in keys)
                return _Node(_TENSORS, keys=keys, fqns=fqns, placeholder=placeholder)
            children = tuple(_template(v[k], skel[k], fragments, nonce) for k in keys)
            return _Node(_MAP, keys=keys, children=children)
        pairs = skel[MARKERS["dict"]]
        if len(pairs) != len(keys):
            raise _Mismatch
        return _Node(
            _DICT,
            keys=keys,
            children=tuple(
                _template(v[k], x, fragments, nonce) for k, (_, x) in zip(keys, pairs, strict=True)
            ),
            key_types=tuple(map(type, keys)),
            key_skeletons=tuple(k for k, _ in pairs),
        )
    if isinstance(v, list):
        return _Node(_LIST, children=_items(v, skel, fragments, nonce))
    if isinstance(v, tuple):
        return _Node(_TUPLE, children=_items(v, skel[MARKERS["tuple"]], fragments, nonce))
    raise _Mismatch  # objects with state_dict(), NumPy values, ...: planned every save


def _items(
    v: Sequence[Any], skel: Sequence[Any], fragments: dict[str, bytes], nonce: str
) -> tuple[_Node, ...]:
    if len(v) != len(skel):
        raise _Mismatch
    return tuple(_template(x, s, fragments, nonce) for x, s in zip(v, skel, strict=True))


def _scalar(v: Any) -> Any:
    """``v``'s skeleton, as :func:`flatten_state` writes it; _Mismatch if not a scalar."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        if -_INT_LIMIT < v < _INT_LIMIT:
            return v
        raise _Mismatch
    if isinstance(v, float):
        return v if math.isfinite(v) else {MARKERS["float"]: repr(v)}
    raise _Mismatch


def _bind(node: _Node, v: Any, out: list[torch.Tensor]) -> Any:
    """The skeleton of ``v`` (mappings of tensors as their placeholders); its tensors are
    appended to ``out`` in walk order. _Mismatch if ``v`` does not fit ``node``."""
    kind = node.kind
    if kind == _TENSORS:
        if not isinstance(v, Mapping) or len(v) != len(node.keys) or tuple(v) != node.keys:
            raise _Mismatch
        out.extend(v.values())
        return node.placeholder
    if kind == _TENSOR:
        if not isinstance(v, torch.Tensor):
            raise _Mismatch
        out.append(v)
        return {MARKERS["tensor"]: node.fqns[0]}
    if kind == _VALUE:
        return _scalar(v)
    if kind == _MAP:
        if not isinstance(v, Mapping) or len(v) != len(node.keys) or tuple(v) != node.keys:
            raise _Mismatch
        return {k: _bind(c, v[k], out) for k, c in zip(node.keys, node.children, strict=True)}
    if kind == _DICT:
        if not isinstance(v, Mapping) or len(v) != len(node.keys):
            raise _Mismatch
        keys = tuple(v)
        if keys != node.keys or tuple(map(type, keys)) != node.key_types:
            raise _Mismatch
        pairs = zip(keys, node.key_skeletons, node.children, strict=True)
        return {MARKERS["dict"]: [[ks, _bind(c, v[k], out)] for k, ks, c in pairs]}
    seq = list if kind == _LIST else tuple
    if not isinstance(v, seq) or len(v) != len(node.children):
        raise _Mismatch
    items = [_bind(c, x, out) for c, x in zip(node.children, v, strict=True)]
    return items if kind == _LIST else {MARKERS["tuple"]: items}


def _names(node: _Node, out: list[str]) -> list[str]:
    """Every tensor name under ``node``, in walk order (aliases included)."""
    if node.kind in (_TENSOR, _TENSORS):
        out.extend(node.fqns)
    for c in node.children:
        _names(c, out)
    return out


@dataclass(frozen=True)
class _Signature:
    """Every tensor's type, dtype, number of dimensions and of elements and data pointer,
    in walk order; the full shapes of the tensors of 2 or more dimensions only (a 1-d
    tensor's shape is its numel, and ``torch.Size`` objects are the slowest part to
    build); ``requires_grad`` of the parameters among them.

    Not in it: devices (the plan does not depend on them: the copy looks at each save's
    tensors; a tensor without storage, on the meta device, has data pointer 0, and any 0
    makes :meth:`PlanReuse.rebind` replan) and strides (they matter only for tied views:
    with every pointer where it was and all distinct, nothing can be tied; otherwise the
    groups are recomputed with strides)."""

    types: tuple[type, ...]
    dtypes: tuple[torch.dtype, ...]
    dims: tuple[int, ...]
    numels: tuple[int, ...]
    ptrs: tuple[int, ...]
    shapes: tuple[torch.Size, ...]
    grads: tuple[bool, ...]

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> _Signature:
        """Taken with C-level iteration (no Python code per plain 1-d tensor). Tensors
        without strides or sizes (sparse, nested) raise RuntimeError: the caller replans."""
        types = tuple(map(type, tensors))
        dims = tuple(map(torch.Tensor.dim, tensors))
        grads: tuple[bool, ...] = ()
        if torch.nn.Parameter in set(types):
            params = [t for t, ty in zip(tensors, types, strict=True) if ty is torch.nn.Parameter]
            grads = tuple(map(_GRAD, params))
        shapes: tuple[torch.Size, ...] = ()
        if dims and max(dims) > 1:
            shapes = tuple(t.shape for t, d in zip(tensors, dims, strict=True) if d > 1)
        return cls(
            types,
            tuple(map(_DTYPE, tensors)),
            dims,
            tuple(map(torch.Tensor.numel, tensors)),
            tuple(map(torch.Tensor.data_ptr, tensors)),
            shapes,
            grads,
        )

    def same_layout(self, other: _Signature) -> bool:
        """Everything but the data pointers is equal."""
        return (
            self.types == other.types
            and self.dtypes == other.dtypes
            and self.dims == other.dims
            and self.numels == other.numels
            and self.shapes == other.shapes
            and self.grads == other.grads
        )

    @functools.cached_property
    def pointers_distinct(self) -> bool:
        """No two tensors start at the same address: none can be tied, whatever strides."""
        return len(set(self.ptrs)) == len(self.ptrs) and 0 not in self.numels


def _groups(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Tied groups, exactly as :func:`~ckptsvc.stage.tied_params.shared_tensor_groups`."""
    keys = [None if t.device.type == "meta" or t.numel() == 0 else view_key(t) for t in tensors]
    return tuple(tuple(g) for g in groups_of_views(names, keys))


_DTYPE = operator.attrgetter("dtype")
_GRAD = operator.attrgetter("requires_grad")


@dataclass(frozen=True, eq=False)
class _StagedTemplate:
    """One staged file of the plan (without its sources): its entries' names and where
    their tensors are in the walk order."""

    plan: FilePlan
    write: bool
    names: tuple[str, ...]
    take: Callable[[Sequence[torch.Tensor]], Any]
    single: bool

    def bind(self, tensors: Sequence[torch.Tensor]) -> StagedFile:
        taken: Any = self.take(tensors) if self.names else ()
        values: Sequence[torch.Tensor] = (taken,) if self.single else taken
        return StagedFile(self.plan, OrderedSources(self.names, values), self.write)


@dataclass(frozen=True, eq=False)
class _Template:
    """Everything a save of one component reuses (see the module docstring). It holds no
    tensor and nothing of the component's state: a template never keeps an old state
    alive."""

    config: tuple[Any, ...]
    root: _Node
    names: tuple[str, ...]
    signature: _Signature
    groups: tuple[tuple[str, ...], ...]
    module_frozen: frozenset[str] | None
    files: tuple[_StagedTemplate, ...]
    fragments: dict[str, bytes]  # placeholder -> a mapping of tensors' skeleton
    doc_fragments: dict[str, bytes]  # the same plus the document's "tensors"
    digest: Any
    skeleton_head: dict[str, Any]
    part: PartReport
    crc_names: tuple[str, ...]
    frozen_files: frozenset[str]
    doc_inputs: DocInputs | None
    doc_head: dict[str, Any] | None
    index: list[tuple[str, bytes]]  # (the user metadata's JSON, the index bytes), last only
    nbytes: int = 0  # the tensors' bytes (what a REPLICATED component's writers depend on)

    @staticmethod
    def encode(obj: Any, fragments: Mapping[str, bytes]) -> bytes | None:
        """``json_bytes(obj)`` with every placeholder replaced by its fragment (None if a
        placeholder is not there exactly once: the caller replans)."""
        raw = json_bytes(obj)
        for placeholder, fragment in fragments.items():
            token = b'"' + placeholder.encode("ascii") + b'"'
            if raw.count(token) != 1:
                return None
            raw = raw.replace(token, fragment)
        return raw


class PlanReuse:
    """The last plan of each component of one checkpointer, reused while the component's
    state has the same signature (see the module docstring). ``planned`` / ``reused``
    count components (the hook point ``plan.component`` reports each too)."""

    def __init__(self, *, incremental: bool = False) -> None:
        self._incremental = incremental
        self._templates: OrderedDict[str, _Template] = OrderedDict()

    def _config(self, c: StateComponent, suffix: str, writers: tuple[int, ...]) -> tuple[Any, ...]:
        """What a plan depends on besides the state itself."""
        return (
            c.sharing_pattern,
            c.process_group_name,
            c.validate_replication,
            c.validation_level,
            suffix,
            writers,
            type(c.stateful),
        )

    def _module_frozen(self, c: StateComponent) -> frozenset[str] | None:
        if self._incremental and isinstance(c.stateful, torch.nn.Module):
            return frozenset(frozen_parameter_names(c.stateful))
        return None

    def remember(
        self,
        c: StateComponent,
        state: Any,
        flat: FlatState,
        plan: ComponentPlan,
        *,
        suffix: str,
        writers: tuple[int, ...],
    ) -> None:
        """Keep ``plan`` (just made from ``state``, flattened to ``flat``) for the next saves
        of ``c``; a state the template cannot describe is not kept."""
        self._templates.pop(c.key, None)
        if plan.sharded_doc is not None:
            return
        fragments: dict[str, bytes] = {}
        nonce = uuid.uuid4().hex  # placeholders no user string can contain by chance
        try:
            root = _template(state, flat.skeleton["state"], fragments, nonce)
            tensors: list[torch.Tensor] = []
            _bind(root, state, tensors)
            signature = _Signature.of(tensors)
        except (_Mismatch, KeyError, TypeError, RuntimeError):
            return
        names = tuple(_names(root, []))
        if len(names) != len(tensors):
            return
        position = {n: i for i, n in enumerate(names)}
        files = []
        for f in plan.files:
            entry_names = tuple(e.name for e in f.plan.layout.entries)
            where = [position[n] for n in entry_names]
            take = operator.itemgetter(*where) if where else (lambda _: ())
            files.append(_StagedTemplate(f.plan, f.write, entry_names, take, len(where) == 1))
        doc_head = None
        doc_fragments = dict(fragments)
        inputs = plan.doc_inputs
        if inputs is not None:
            placeholder = f"{nonce}-tensors"
            doc_fragments[placeholder] = json_bytes(inputs.tensors)
            doc_head = component_doc(c, flat, {})
            doc_head["state"] = None  # each save's own
            doc_head["tensors"] = placeholder
        specs = [
            (n, d, tuple(t.shape)) for (n, t), d in zip(flat.tensors, flat.dtypes, strict=True)
        ]
        template = _Template(
            config=self._config(c, suffix, writers),
            root=root,
            names=names,
            signature=signature,
            groups=flat.param_sharing,
            module_frozen=self._module_frozen(c),
            files=tuple(files),
            fragments=fragments,
            doc_fragments=doc_fragments,
            digest=spec_digest(specs),
            skeleton_head={k: v for k, v in flat.skeleton.items() if k != "state"},
            part=plan.part,
            crc_names=plan.crc_names,
            frozen_files=plan.frozen_files,
            doc_inputs=plan.doc_inputs,
            doc_head=doc_head,
            index=[],
            nbytes=sum(t.numel() * t.element_size() for _, t in flat.tensors),
        )
        self._templates[c.key] = template
        while len(self._templates) > MAX_COMPONENTS:
            self._templates.popitem(last=False)

    def tensor_nbytes(self, key: str) -> int:
        """The tensor bytes of component ``key``'s last plan (0: none kept)."""
        t = self._templates.get(key)
        return 0 if t is None else t.nbytes

    def rebind(
        self,
        c: StateComponent,
        state: Any,
        *,
        suffix: str,
        writers: tuple[int, ...],
        user_metadata: Mapping[str, Any],
    ) -> ComponentPlan | None:
        """The plan of ``c``'s last save with ``state``'s tensors as sources and its
        documents re-encoded where values changed; None when the signature differs."""
        t = self._templates.get(c.key)
        if t is None or t.config != self._config(c, suffix, writers):
            return None
        tensors: list[torch.Tensor] = []
        try:
            skeleton_state = _bind(t.root, state, tensors)
            if len(tensors) != len(t.names):
                return None
            signature = _Signature.of(tensors)
        except (_Mismatch, RuntimeError, TypeError):  # TypeError: a value in place of a tensor
            return None
        if 0 in signature.ptrs or not signature.same_layout(t.signature):
            return None  # (a pointer 0: an empty or meta tensor; the planner decides)
        same_views = signature.ptrs == t.signature.ptrs and t.signature.pointers_distinct
        if not same_views and _groups(tensors, t.names) != t.groups:
            return None  # (with distinct pointers as before no tensor can be tied now)
        if t.module_frozen is not None and self._module_frozen(c) != t.module_frozen:
            return None
        skeleton = t.encode({**t.skeleton_head, "state": skeleton_state}, t.fragments)
        if skeleton is None:
            return None
        docs: dict[str, bytes] = {}
        inputs = t.doc_inputs
        if inputs is not None and t.doc_head is not None:
            doc = t.encode({**t.doc_head, "state": skeleton_state}, t.doc_fragments)
            if doc is None:
                return None
            docs[inputs.doc_file] = doc
            if inputs.weight_map is not None:
                docs[SAFE_WEIGHTS_INDEX_NAME] = self._index(t, inputs, user_metadata)
            docs.update(model_files(c, suffix))
        staged = [f.bind(tensors) for f in t.files]
        mine = tuple(f.plan.file_name for f in staged if f.write)
        if inputs is not None:
            add_component_files(c, docs, mine)
        part = _part(t.part, c, mine, docs, staged, signature_of(t.digest, skeleton))
        return ComponentPlan(
            c,
            part,
            staged,
            docs,
            crc_names=t.crc_names,
            frozen_files=t.frozen_files,
            doc_inputs=inputs,
        )

    @staticmethod
    def _index(t: _Template, inputs: DocInputs, user_metadata: Mapping[str, Any]) -> bytes:
        """The HF index, re-encoded only when the user's metadata changed."""
        key = json.dumps(user_metadata, sort_keys=True)
        if not t.index or t.index[0][0] != key:
            t.index[:] = [(key, index_bytes(inputs, user_metadata))]
        return t.index[0][1]


def _part(
    part: PartReport,
    c: StateComponent,
    mine: tuple[str, ...],
    docs: Mapping[str, bytes],
    staged: Sequence[StagedFile],
    signature: str,
) -> PartReport:
    """The cached part with this save's files, sizes, signature and metadata."""
    return replace(
        part,
        files=tuple(sorted([*mine, *docs])),
        nbytes=files_nbytes(staged) + sum(map(len, docs.values())),
        signature=signature,
        metadata=dict(c.metadata),
    )
