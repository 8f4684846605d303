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
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointError, CorruptCheckpointError, InvalidStateError
from .safetensors_stream import dtype_from_torch
from .tied_params import shared_tensor_groups

__all__ = [
    "SKELETON_FORMAT",
    "SKELETON_NAME",
    "FlatState",
    "flatten_state",
    "frozen_parameter_names",
    "is_dtensor",
    "load_state",
    "parse_skeleton",
    "unflatten_state",
    "with_frozen_parameters",
]

#: the JSON file of a checkpoint that holds the non-tensor state and the structure
SKELETON_NAME = "ckptsvc_state.json"
SKELETON_FORMAT = "ckptsvc-state"
SKELETON_VERSION = 1

_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"
_MARKERS = frozenset({_TENSOR, _TUPLE, _DICT, _FLOAT})
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


def _where(path: tuple[str, ...]) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel state)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "device_mesh")


class _Flattener:
    """One walk over a state: collects tensors by FQN and builds the skeleton."""

    def __init__(self, *, allow_dtensor: bool = False) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.allow_dtensor = allow_dtensor
        self.frozen: set[str] = set()  # names of frozen parameters (requires_grad=False)

    def fqn(self, path: tuple[str, ...]) -> str:
        for part in path:
            if part == "":
                raise InvalidStateError(
                    f"{_where(path)}: an empty key cannot name a tensor (its name would be ambiguous)"
                )
        name = ".".join(path)
        if name in self.tensors:
            raise InvalidStateError(
                f"{_where(path)}: the tensor name {name!r} is produced twice (keys containing "
                "'.' collide with nested keys); rename one of them"
            )
        return name

    def tensor(self, t: torch.Tensor, path: tuple[str, ...]) -> dict[str, str]:
        fqn = self.fqn(path)
        if t.layout != torch.strided:
            raise InvalidStateError(
                f"{_where(path)}: {t.layout} tensors cannot be checkpointed; convert with .to_dense()"
            )
        if t.device.type == "meta":
            raise InvalidStateError(f"{_where(path)}: tensor is on the meta device and has no data")
        if is_dtensor(t) and not self.allow_dtensor:
            raise InvalidStateError(
                f"{_where(path)}: DTensor (FSDP2 / tensor parallel) is not supported by this "
                "save path yet; pass .full_tensor() or a local shard"
            )
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and not is_dtensor(t):
            raise InvalidStateError(
                f"{_where(path)}: tensor subclass {type(t).__name__} has no raw-bytes form; "
                "torchao-quantized models save through CheckpointManager (or split them with "
                "ckptsvc.quantized.split_quantized first)"
            )
        _dtype_name(t, fqn)
        if isinstance(t, torch.nn.Parameter) and not t.requires_grad:
            self.frozen.add(fqn)
        self.tensors[fqn] = t.detach()
        return {_TENSOR: fqn}

    def value(self, v: Any, path: tuple[str, ...]) -> Any:
        if isinstance(v, torch.Tensor):
            return self.tensor(v, path)
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {_FLOAT: repr(v)}
        if isinstance(v, Mapping):
            return self.mapping(v, path)
        if isinstance(v, list):
            return [self.value(x, (*path, str(i))) for i, x in enumerate(v)]
        if isinstance(v, tuple):
            return {_TUPLE: [self.value(x, (*path, str(i))) for i, x in enumerate(v)]}
        state_dict = getattr(v, "state_dict", None)
        if callable(state_dict):  # nn.Module, Optimizer, LR scheduler: the Stateful protocol
            if isinstance(v, torch.nn.Module):  # state_dict() detaches: requires_grad is lost
                self.frozen |= frozen_parameter_names(v, prefix=".".join(path))
            return self.value(state_dict(), path)
        item = getattr(v, "item", None)
        if type(v).__module__ == "numpy" and callable(item):  # numpy scalar
            return self.value(item(), path)
        raise InvalidStateError(
            f"{_where(path)}: a {type(v).__module__}.{type(v).__qualname__} cannot be "
            "checkpointed; use tensors, int, float, str, bool, None, and lists, tuples or "
            "dicts of them (or an object with state_dict())"
        )

    def mapping(self, m: Mapping[Any, Any], path: tuple[str, ...]) -> Any:
        keys = list(m.keys())
        plain = all(isinstance(k, str) for k in keys) and not (
            len(keys) == 1 and keys[0] in _MARKERS
        )
        if plain:
            return {k: self.value(m[k], (*path, k)) for k in keys}
        pairs = []
        for k in keys:
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise InvalidStateError(
                    f"{_where(path)}: dict key {k!r} ({type(k).__name__}) cannot be "
                    "checkpointed; keys must be str, int, float, bool or None"
                )
            pairs.append([self.value(k, path), self.value(m[k], (*path, str(k)))])
        return {_DICT: pairs}


def flatten_state(state: Any, *, allow_dtensor: bool = False) -> FlatState:
    """Split ``state`` into stored tensors and a JSON skeleton (see the module docstring).

    With ``allow_dtensor`` a DTensor is kept as is in ``tensors`` (the component saver
    stores its local shard with global offsets, :mod:`ckptsvc.resharding`); without, it
    is refused. Raises :class:`InvalidStateError` naming the key for anything that has
    no safe form.
    """
    walker = _Flattener(allow_dtensor=allow_dtensor)
    root = walker.value(state, ())
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


def parse_skeleton(raw: bytes, *, where: str) -> dict[str, Any]:
    """Decode and check a skeleton file's JSON; ``where`` names it in errors."""
    from .json_doc import parse_json_doc

    doc = parse_json_doc(raw, where=where, what="state skeleton")
    if not isinstance(doc, dict) or doc.get("format") != SKELETON_FORMAT or "state" not in doc:
        raise CorruptCheckpointError(f"{where}: not a ckptsvc state skeleton")
    version = doc.get("version")
    if not isinstance(version, int) or version > SKELETON_VERSION:
        raise CorruptCheckpointError(
            f"{where}: state skeleton version {version!r} is newer than this ckptsvc "
            f"understands ({SKELETON_VERSION}); upgrade ckptsvc"
        )
    return doc


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


def load_state(
    path_or_url: str, *, storage_options: dict[str, Any] | None = None, device: str = "cpu"
) -> Any:
    """Rebuild the nested state of a checkpoint written by ``AsyncCheckpointer``.

    Tensors load through :func:`ckptsvc.sharded_checkpoint.load_checkpoint` (tied names
    come back as one tensor); a checkpoint without a state skeleton (written by
    ``save_checkpoint``) returns its flat ``{fqn: tensor}`` dict.

    When the checkpoint has a manifest, the skeleton (like the index and every shard) must
    match its size and CRC-32C record: a skeleton from another save is corruption.
    """
    from .discovery import read_manifest
    from .errors import StorageNotFoundError
    from .json_doc import check_doc_against_manifest, read_doc_bytes
    from .sharded_checkpoint import load_checkpoint
    from .storage import Location

    ckpt = Location.parse(path_or_url, storage_options)
    manifest = read_manifest(ckpt)
    tensors = load_checkpoint(path_or_url, device=device, storage_options=storage_options) or {}
    skeleton_loc = ckpt.join(SKELETON_NAME)
    try:
        raw = read_doc_bytes(skeleton_loc, what="state skeleton")
    except StorageNotFoundError:
        if manifest is not None and manifest.file(SKELETON_NAME) is not None:
            raise CorruptCheckpointError(
                f"{skeleton_loc.url}: the manifest lists the state skeleton but it is missing; "
                "resume from an intact checkpoint"
            ) from None
        return tensors
    check_doc_against_manifest(
        raw, rel_path=SKELETON_NAME, url=skeleton_loc.url, manifest=manifest, what="state skeleton"
    )
    return unflatten_state(parse_skeleton(raw, where=skeleton_loc.url), tensors)
