"""Nested training state <-> flat named tensors + a JSON skeleton of everything else.

``flatten_state`` walks the state a user hands to ``save`` (an ``nn.Module``, a state dict,
an optimizer, or nested dicts / lists / tuples of tensors and JSON scalars) and returns
:class:`FlatState`: the tensors by fully qualified name (FQN, the path joined with ``.``,
so a module's state dict keeps its own keys) and a JSON *skeleton* that records the
structure and every non-tensor value. ``unflatten_state`` is the inverse.

Skeleton encoding (``SKELETON_NAME`` in a checkpoint; plain JSON, never pickle):

- ``None``, ``bool``, ``int``, ``str``, finite ``float`` -> themselves;
- ``nan`` / ``inf`` -> ``{"__float__": "nan" | "inf" | "-inf"}``;
- a tensor -> ``{"__tensor__": fqn}``;
- a list -> a JSON array; a tuple -> ``{"__tuple__": [...]}``;
- a dict with string keys -> a JSON object; any other dict (``int`` keys, as in an
  optimizer's ``state``) -> ``{"__dict__": [[key, value], ...]}`` so key types survive;
- an object with a ``state_dict()`` method (module, optimizer, scheduler) -> its state dict.

Tensors that are the very same view of one storage (tied weights) are stored once, under
the first name in sorted order; every group is listed in ``param_sharing`` (the HF index
convention) and the names are re-tied to one tensor object on load. Views that overlap
only partially are stored as independent copies.

The walk checks the whole state before anything is stored and raises one
:class:`InvalidStateError` listing the dotted key of every unsupported value: NumPy arrays
(any shape; NumPy scalars become their Python value), keys that are not ``str``/``int``/
``float``/``bool``/``None`` or not valid UTF-8, ints of more than :data:`MAX_INT_DIGITS`
digits, cycles, states nested more than :data:`MAX_DEPTH` levels, and tensors without a
raw-bytes form (sparse, nested, quantized, meta, subclasses).
"""

from __future__ import annotations

import json
import math
import reprlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckptsvc.errors import CheckpointError, CorruptCheckpointError, InvalidStateError
from ckptsvc.format.skeleton import SKELETON_FORMAT, SKELETON_NAME, SKELETON_VERSION, parse_skeleton
from ckptsvc.stage.tensors import dtype_from_torch
from ckptsvc.stage.tied_params import shared_tensor_groups

__all__ = [
    "MARKERS",
    "MAX_INT_DIGITS",
    "SKELETON_FORMAT",
    "SKELETON_NAME",
    "FlatState",
    "flatten_state",
    "frozen_parameter_names",
    "invalid_state_error",
    "is_dtensor",
    "parse_skeleton",
    "unflatten_state",
    "with_frozen_parameters",
]

#: the JSON file of a checkpoint that holds the non-tensor state and the structure

#: containers (dicts, lists, tuples, objects with ``state_dict()``) nested below the root
#: at most; deeper states are refused (the skeleton stays far from JSON recursion limits)
MAX_DEPTH = 100
#: ints in the skeleton have at most this many decimal digits (|v| < 10**1000); the loader
#: refuses ~4,300, Python's own int/str conversion limit
MAX_INT_DIGITS = 1000
_INT_LIMIT = 10**MAX_INT_DIGITS
#: problems spelled out in one InvalidStateError message (``.problems`` holds them all)
MAX_PROBLEMS_SHOWN = 20

_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"
_MARKERS = frozenset({_TENSOR, _TUPLE, _DICT, _FLOAT})
#: the skeleton's marker keys by what they mark (:mod:`ckptsvc.stage.plan_reuse` rebuilds them)
MARKERS = {"tensor": _TENSOR, "tuple": _TUPLE, "dict": _DICT, "float": _FLOAT}
_DTYPE_NAMES: dict[torch.dtype, str] = {}


@dataclass(frozen=True)
class FlatState:
    """A flattened state: stored tensors in traversal order, skeleton, tied groups.

    ``tensors`` holds one entry per distinct tensor (aliases removed); ``dtypes`` gives the
    safetensors dtype name of each, in the same order. ``frozen`` names the stored tensors
    that are frozen parameters (``requires_grad=False``: of a module found in the state,
    or an ``nn.Parameter`` met as a value); they get shards of their own, so an
    incremental save can reuse those files unchanged.
    """

    tensors: tuple[tuple[str, torch.Tensor], ...]
    dtypes: tuple[str, ...]
    skeleton: Mapping[str, Any]
    param_sharing: tuple[tuple[str, ...], ...]
    frozen: frozenset[str] = frozenset()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors)

    def signature(self) -> tuple[Any, ...]:
        """What a layout plan depends on: names, dtypes, shapes, tied groups (hashable)."""
        specs = tuple(
            (name, dtype, tuple(t.shape))
            for (name, t), dtype in zip(self.tensors, self.dtypes, strict=True)
        )
        return (specs, self.param_sharing, self.frozen)

    def skeleton_json(self) -> bytes:
        return json.dumps(self.skeleton, ensure_ascii=True, allow_nan=False).encode("ascii")


def _dtype_name(t: torch.Tensor, fqn: str) -> str:
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        name = _DTYPE_NAMES[t.dtype] = dtype_from_torch(t.dtype, name=fqn)
    return name


def _utf8_ok(s: str) -> bool:
    """False for a str that UTF-8 cannot encode (lone surrogates, e.g. ``"\\udc80"``)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _part_text(part: str) -> str:
    if part.isprintable() and _utf8_ok(part):
        return part
    return part.encode("unicode_escape", "backslashreplace").decode("ascii")


def _key_text(path: tuple[str, ...]) -> str:
    """A path as the dotted key a user recognises (``optimizer.state.3.foo``); lone
    surrogates and control characters are escaped so the message itself always prints."""
    if not path:
        return "(the state itself)"
    text = ".".join(_part_text(p) for p in path)
    return text if len(text) <= 240 else f"{text[:110]} ... {text[-110:]}"


def _where_text(path: tuple[str, ...]) -> str:
    return f"the key '{_key_text(path)}'" if path else "the state itself"


def _key_part(k: object) -> str:
    """A dict key as one part of a path (``str`` of it; never fails, never huge)."""
    if isinstance(k, int) and not isinstance(k, bool) and not -_INT_LIMIT < k < _INT_LIMIT:
        return f"<int of {k.bit_length()} bits>"
    if k is None or isinstance(k, (bool, int, float, str)):
        return str(k)
    return f"<{type(k).__name__} key>"


def _type_name(v: object) -> str:
    t = type(v)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def invalid_state_error(
    problems: Sequence[tuple[str, str]], *, what: str = "the state"
) -> InvalidStateError:
    """One :class:`InvalidStateError` listing ``problems`` (``(key, reason)`` pairs, the
    first :data:`MAX_PROBLEMS_SHOWN` spelled out) and what to do about them."""
    n = len(problems)
    lines = [
        f"{n} value{'s' if n != 1 else ''} in {what} cannot be checkpointed (nothing was saved):"
    ]
    lines += [f"  - '{key}': {reason}" for key, reason in problems[:MAX_PROBLEMS_SHOWN]]
    if n > MAX_PROBLEMS_SHOWN:
        lines.append(
            f"  ... and {n - MAX_PROBLEMS_SHOWN} more (InvalidStateError.problems lists all)"
        )
    lines.append(
        "A checkpointable state holds tensors, int, float, str, bool and None, in dicts, "
        "lists and tuples (or objects with state_dict()); convert or remove these values "
        "and save again."
    )
    return InvalidStateError("\n".join(lines), problems=tuple(problems))


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel state)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "device_mesh")


class _Flattener:
    """One walk over a state: collects tensors by FQN and builds the skeleton.

    Nothing is raised during the walk: every unsupported value is recorded in
    ``problems`` (as ``(key, reason)``) and replaced by ``None``, so one error can list
    them all. ``active`` holds the containers on the current path (by ``id``), which finds
    cycles; ``depth`` counts containers and ``state_dict()`` objects from the root.
    """

    def __init__(self, *, allow_dtensor: bool = False, prefix: tuple[str, ...] = ()) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.allow_dtensor = allow_dtensor
        self.frozen: set[str] = set()  # names of frozen parameters (requires_grad=False)
        self.problems: list[tuple[str, str]] = []
        self.prefix = prefix  # shown before keys in problems only (a component's key)
        self.active: dict[int, tuple[str, ...]] = {}

    def problem(self, path: tuple[str, ...], reason: str) -> None:
        self.problems.append((_key_text((*self.prefix, *path)), reason))

    def fqn(self, path: tuple[str, ...]) -> str | None:
        if any(part == "" for part in path):
            self.problem(path, "an empty key cannot name a tensor (its name would be ambiguous)")
            return None
        # a tensor at the root is named by the component's key (``{"w": t}`` -> ``w``)
        name = ".".join(path) or ".".join(self.prefix)
        if name in self.tensors:
            self.problem(
                path,
                f"the tensor name {name!r} is produced twice (keys containing '.' collide "
                "with nested keys); rename one of them",
            )
            return None
        return name

    def tensor_problem(self, t: torch.Tensor) -> str | None:
        """Why ``t`` cannot be stored as raw bytes, or None."""
        if t.is_nested:
            return (
                "nested tensors (torch.nested) cannot be checkpointed; store the "
                "components instead (list(t.unbind()))"
            )
        if t.layout != torch.strided:
            return f"{t.layout} tensors cannot be checkpointed; convert with .to_dense()"
        if t.device.type == "meta":
            return "the tensor is on the meta device and has no data"
        if is_dtensor(t):
            if self.allow_dtensor:
                return None
            return (
                "DTensor (FSDP2 / tensor parallel) is not supported by this save path yet; "
                "pass .full_tensor() or a local shard"
            )
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return (
                f"tensor subclass {type(t).__name__} has no raw-bytes form; torchao-quantized "
                "models save through CheckpointManager (or split them with "
                "ckptsvc.stage.quantized.split_quantized first)"
            )
        if t.is_quantized:
            return (
                f"quantized tensors ({t.dtype}) cannot be checkpointed; store "
                "t.int_repr() and the quantization parameters, or t.dequantize()"
            )
        return None

    def tensor(self, t: torch.Tensor, path: tuple[str, ...]) -> dict[str, str] | None:
        reason = self.tensor_problem(t)
        if reason is not None:
            self.problem(path, reason)
            return None
        fqn = self.fqn(path)
        if fqn is None:
            return None
        try:
            _dtype_name(t, fqn)
        except InvalidStateError:
            self.problem(path, f"dtype {t.dtype} cannot be stored in safetensors")
            return None
        if isinstance(t, torch.nn.Parameter) and not t.requires_grad:
            self.frozen.add(fqn)
        self.tensors[fqn] = t.detach()
        return {_TENSOR: fqn}

    def value(self, v: Any, path: tuple[str, ...], depth: int = 0) -> Any:
        if isinstance(v, torch.Tensor):
            return self.tensor(v, path)
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            if -_INT_LIMIT < v < _INT_LIMIT:
                return v
            self.problem(
                path,
                f"an int of {v.bit_length()} bits is too large for the state skeleton (at most "
                f"{MAX_INT_DIGITS} decimal digits); store it as a str or split it",
            )
            return None
        if isinstance(v, float):
            return v if math.isfinite(v) else {_FLOAT: repr(v)}
        np = sys.modules.get("numpy")
        if np is not None and isinstance(v, np.ndarray):
            self.problem(
                path,
                f"a numpy array (shape {tuple(v.shape)}, dtype {v.dtype}) is not converted "
                "silently; store torch.from_numpy(a) (it loads as a tensor) or a.tolist()",
            )
            return None
        if np is not None and isinstance(v, np.generic):  # numpy scalar: its Python value
            return self.value(v.item(), path, depth)
        if isinstance(v, (Mapping, list, tuple)) or callable(getattr(v, "state_dict", None)):
            return self.container(v, path, depth + 1)
        self.problem(
            path,
            f"a value of type {_type_name(v)} cannot be checkpointed; use tensors, int, float, str, bool, "
            "None, and lists, tuples or dicts of them (or an object with state_dict())",
        )
        return None

    def container(self, v: Any, path: tuple[str, ...], depth: int) -> Any:
        if depth > MAX_DEPTH:
            self.problem(
                path,
                f"the state is nested more than {MAX_DEPTH} levels deep here; flatten this "
                "part of the state",
            )
            return None
        seen = self.active.get(id(v))
        if seen is not None:
            self.problem(
                path,
                f"a cycle: this {_type_name(v)} contains itself (it is also "
                f"{_where_text((*self.prefix, *seen))}); a state must be a tree",
            )
            return None
        self.active[id(v)] = path
        try:
            if isinstance(v, Mapping):
                return self.mapping(v, path, depth)
            if isinstance(v, list):
                return [self.value(x, (*path, str(i)), depth) for i, x in enumerate(v)]
            if isinstance(v, tuple):
                return {_TUPLE: [self.value(x, (*path, str(i)), depth) for i, x in enumerate(v)]}
            # nn.Module, Optimizer, LR scheduler: the Stateful protocol
            if isinstance(v, torch.nn.Module):  # state_dict() detaches: requires_grad is lost
                self.frozen |= frozen_parameter_names(v, prefix=".".join(path))
            return self.value(v.state_dict(), path, depth)
        finally:
            del self.active[id(v)]

    def key_problem(self, k: object) -> str | None:
        """Why ``k`` cannot be a key in the skeleton, or None."""
        if isinstance(k, str):
            if _utf8_ok(k):
                return None
            return (
                "the key is not valid UTF-8 (it holds a lone surrogate, as from "
                "os.fsdecode of undecodable bytes); use a clean str key"
            )
        if isinstance(k, int) and not isinstance(k, bool) and not -_INT_LIMIT < k < _INT_LIMIT:
            return (
                f"an int key of {k.bit_length()} bits is too large for the state skeleton "
                f"(at most {MAX_INT_DIGITS} decimal digits)"
            )
        if k is None or isinstance(k, (bool, int, float)):
            return None
        return (
            f"dict key {reprlib.repr(k)} ({_type_name(k)}) cannot be checkpointed; keys must "
            "be str, int, float, bool or None"
        )

    def mapping(self, m: Mapping[Any, Any], path: tuple[str, ...], depth: int) -> Any:
        keys = list(m.keys())
        plain = all(isinstance(k, str) for k in keys) and not (
            len(keys) == 1 and keys[0] in _MARKERS
        )
        pairs = []
        for k in keys:
            where = (*path, _key_part(k))
            reason = self.key_problem(k)
            if reason is not None:
                self.problem(where, reason)
                continue
            pairs.append((k, self.value(m[k], where, depth)))
        if plain:
            return dict(pairs)
        return {_DICT: [[self.value(k, path, depth), x] for k, x in pairs]}


def flatten_state(state: Any, *, allow_dtensor: bool = False, key_prefix: str = "") -> FlatState:
    """Split ``state`` into stored tensors and a JSON skeleton (see the module docstring).

    With ``allow_dtensor`` a DTensor is kept as is in ``tensors`` (the component saver
    stores its local shard with global offsets, :mod:`ckptsvc.stage.sharded_plan`); without, it
    is refused. The whole state is checked first: one :class:`InvalidStateError` lists
    the key of every value that has no safe form (``key_prefix``, e.g. a component's key,
    is shown before each), with ``problems`` holding them all.
    """
    walker = _Flattener(allow_dtensor=allow_dtensor, prefix=(key_prefix,) if key_prefix else ())
    root = walker.value(state, ())
    if walker.problems:
        raise invalid_state_error(walker.problems)
    locals_ = {
        k: (t.to_local() if is_dtensor(t) else t)  # type: ignore[attr-defined]
        for k, t in walker.tensors.items()
    }
    groups = shared_tensor_groups(locals_)
    aliases = {name for group in groups for name in group[1:]}
    stored = tuple((k, t) for k, t in walker.tensors.items() if k not in aliases)
    sharing = tuple(tuple(g) for g in groups)
    skeleton = {
        "format": SKELETON_FORMAT,
        "version": SKELETON_VERSION,
        "param_sharing": [list(g) for g in sharing],
        "state": root,
    }
    dtypes = tuple(_dtype_name(t, k) for k, t in stored)
    frozen = frozenset(k for k, _ in stored if k in walker.frozen)
    return FlatState(
        tensors=stored, dtypes=dtypes, skeleton=skeleton, param_sharing=sharing, frozen=frozen
    )


def with_frozen_parameters(
    tensors: Mapping[str, torch.Tensor], modules: Sequence[torch.nn.Module]
) -> dict[str, torch.Tensor]:
    """``tensors`` (a merged, detached state dict of ``modules``) with each frozen
    parameter's entry replaced by the ``nn.Parameter`` itself (the same bytes), so that
    :func:`flatten_state` sees ``requires_grad=False`` and marks it frozen."""
    out = dict(tensors)
    for module in modules:
        for name, p in module.named_parameters(remove_duplicate=False):
            t = out.get(name)
            if (
                p.requires_grad
                or t is None
                or type(t) is not torch.Tensor
                or type(p) is not torch.nn.Parameter
                or t.data_ptr() != p.data_ptr()
                or t.shape != p.shape
                or t.stride() != p.stride()
                or t.dtype != p.dtype
            ):
                continue
            out[name] = p
    return out


def frozen_parameter_names(module: torch.nn.Module, *, prefix: str = "") -> set[str]:
    """State-dict names of ``module``'s parameters with ``requires_grad=False`` (tied
    names included), under ``prefix``."""
    lead = f"{prefix}." if prefix else ""
    return {
        lead + name
        for name, p in module.named_parameters(remove_duplicate=False)
        if not p.requires_grad
    }


def unflatten_state(skeleton: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the nested state from a skeleton document and tensors by FQN.

    Tied names resolve to the one stored tensor object. A tensor named by the skeleton
    but absent from ``tensors`` raises :class:`CorruptCheckpointError` naming it.
    """
    try:
        return _unflatten(skeleton, tensors)
    except CheckpointError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as e:
        # the skeleton is untrusted input: any structural surprise is corruption
        raise CorruptCheckpointError(
            f"the state skeleton is malformed ({type(e).__name__}: {e})"
        ) from e


def _unflatten(skeleton: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    alias_of: dict[str, str] = {}
    for group in skeleton.get("param_sharing") or []:
        holder = next((n for n in group if n in tensors), None)
        if holder is not None:
            alias_of.update({n: holder for n in group if n not in tensors})

    def decode(v: Any) -> Any:
        if isinstance(v, list):
            return [decode(x) for x in v]
        if not isinstance(v, dict):
            return v
        if len(v) == 1:
            ((key, inner),) = v.items()
            if key == _TENSOR:
                name = alias_of.get(inner, inner)
                if not isinstance(name, str) or name not in tensors:
                    raise CorruptCheckpointError(
                        f"the state skeleton names tensor {inner!r} but the checkpoint has no such tensor"
                    )
                return tensors[name]
            if key == _TUPLE:
                return tuple(decode(x) for x in inner)
            if key == _DICT:
                return {decode(k): decode(x) for k, x in inner}
            if key == _FLOAT:
                return float(inner)
        return {k: decode(x) for k, x in v.items()}

    return decode(skeleton["state"])
