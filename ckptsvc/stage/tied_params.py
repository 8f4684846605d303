"""Tied (shared) parameters: detect them, store one copy, re-tie them on load.

Safetensors cannot hold two names for one storage, so a save writes each tied group once
(under its canonical name) and records every group in the index's
``metadata.param_sharing`` (a list of lists of FQNs). Unlike Forgather, every order here
is deterministic: names follow the module's ``state_dict`` order, and the canonical name
is the first member present (the input embedding before a tied head, as in HF).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "create_sharing_metadata",
    "get_all_fqns",
    "groups_of_views",
    "id_to_fqn",
    "make_cannonical_names",
    "map_cannonical_names",
    "retie_parameters",
    "shared_tensor_groups",
    "stored_aliases",
    "view_key",
]

logger = logging.getLogger(__name__)


def id_to_fqn(module: nn.Module) -> dict[int, set[str]]:
    """Map ``id(tensor)`` to the set of FQNs (parameters and buffers) naming it."""
    mapping: dict[int, set[str]] = defaultdict(set)
    for name, p in module.state_dict(keep_vars=True).items():
        mapping[id(p)].add(name)
    for name, b in module.named_buffers(remove_duplicate=False):
        mapping[id(b)].add(name)
    return mapping


def get_all_fqns(module: nn.Module) -> set[str]:
    """Every parameter and buffer FQN, including non-persistent buffers and aliases."""
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    buffers = {name for name, _ in module.named_buffers(remove_duplicate=False)}
    return params | buffers


def make_cannonical_names(
    fqns: Iterable[str], sharing_metadata: Sequence[Sequence[str]]
) -> dict[str, list[str]]:
    """``{canonical name: [aliases]}`` for each sharing group, restricted to ``fqns``.

    The canonical name is the first member of the group (in the group's order) that is in
    ``fqns``. (The spelling "cannonical" is Forgather's and kept for compatibility.)
    """
    present = set(fqns)
    cnames: dict[str, list[str]] = {}
    for group in sharing_metadata:
        names = [n for n in group if n in present]
        names = list(dict.fromkeys(names))
        if names:
            cnames[names[0]] = names[1:]
    return cnames


def map_cannonical_names(cnames: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Invert :func:`make_cannonical_names`: ``{alias: canonical name}``."""
    return {alias: cname for cname, aliases in cnames.items() for alias in aliases}


def stored_aliases(groups: Sequence[Sequence[str]], stored: Iterable[str]) -> dict[str, str]:
    """``{alias: stored name}`` for tied names absent from a checkpoint whose group has a
    member that is stored (the first such member, in group order, holds the bytes)."""
    present = set(stored)
    out: dict[str, str] = {}
    for group in groups:
        holder = next((n for n in group if n in present), None)
        if holder is not None:
            out.update({n: holder for n in group if n not in present})
    return out


def create_sharing_metadata(model: nn.Module) -> list[list[str]]:
    """Groups of FQNs that share one tensor, in the module's ``state_dict`` order (within
    and across groups). The first name of a group is the one stored, so an input embedding
    registered before a tied output head is kept under its own name, as Hugging Face does
    (``transformer.wte.weight`` rather than ``lm_head.weight``)."""
    order = {name: i for i, name in enumerate(model.state_dict(keep_vars=True))}

    def position(name: str) -> tuple[int, str]:
        return (order.get(name, len(order)), name)

    groups = [sorted(names, key=position) for names in id_to_fqn(model).values() if len(names) > 1]
    return sorted(groups, key=lambda g: [position(n) for n in g])


def view_key(t: torch.Tensor) -> tuple[object, ...]:
    """What makes two tensors the *same view*: device, data pointer, dtype, shape, strides
    (the data pointer is the storage's plus the offset: no storage object is built)."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def groups_of_views(
    names: Sequence[str], keys: Sequence[tuple[object, ...] | None]
) -> list[list[str]]:
    """Names whose :func:`view_key` is equal (``None``: never grouped), in input order."""
    by_view: dict[tuple[object, ...], list[str]] = defaultdict(list)
    for name, key in zip(names, keys, strict=True):
        if key is not None:
            by_view[key].append(name)
    return [g for g in by_view.values() if len(g) > 1]


def shared_tensor_groups(state_dict: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names in a raw state dict that are the *same view* of one storage (aliases).

    Same device, data pointer, dtype, shape and strides (:func:`view_key`). Partially
    overlapping views are not aliases: each is saved as its own bytes.
    """
    names = list(state_dict)
    keys = [
        view_key(t)
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() != 0
        else None
        for t in state_dict.values()
    ]
    return groups_of_views(names, keys)  # state-dict order, like the module


def _resolve(module: nn.Module, fqn: str) -> object:
    obj: object = module
    for atom in fqn.split("."):
        obj = getattr(obj, atom)
    return obj


@torch.no_grad()
def retie_parameters(module: nn.Module, sharing_metadata: Sequence[Sequence[str]]) -> None:
    """Make every alias in ``sharing_metadata`` the very same tensor as its canonical name.

    Needed after ``load_state_dict(assign=True)`` or a sharded load, which break sharing.
    Groups whose names are not in ``module`` are ignored.
    """
    all_fqns = get_all_fqns(module)
    cnames = make_cannonical_names(all_fqns, sharing_metadata)
    for alias, cname in sorted(map_cannonical_names(cnames).items()):
        tensor = _resolve(module, cname)
        parent_name, _, leaf = alias.rpartition(".")
        parent = _resolve(module, parent_name) if parent_name else module
        logger.debug("retie %s -> %s", alias, cname)
        setattr(parent, leaf, tensor)
