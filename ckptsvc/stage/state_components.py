"""The components of a plain training state: how ``save(step, state)`` becomes
``save_components``.

``AsyncCheckpointer.save(step, state)`` writes exactly what ``save_components`` writes for
the components :func:`components_of_state` derives (one pipeline, one layout):

- a mapping with string keys: one GLOBAL component per key, in the mapping's order. A
  value with ``state_dict()`` and ``load_state_dict()`` (a module, optimizer, scheduler,
  any stateful) is the component's stateful; any other value (a state dict, a tensor, a
  number, nested containers) is held as is. So ``{"model": model, "optimizer": opt,
  "step": 7}`` writes the model as plain Hugging Face weights (``model.safetensors`` or
  ``model-0000k-of-0000N`` shards, keys exactly ``model.state_dict()``'s), the optimizer in ``optimizer_state*`` files and
  the step in ``step_state.json``;
- an ``nn.Module``, or a non-empty mapping whose values are all tensors (a state dict,
  ``model.state_dict()``): the component ``model`` (plain Hugging Face shards of exactly
  those keys), marked as the root of the state - not one component and one file per
  tensor;
- anything else (a list, a tuple, a tensor, a mapping with a key that cannot name a
  component): the single component ``state``, marked as the root.

:func:`ckptsvc.read.component_load.load_state` inverts it: a mapping of every component's
state, or the root component's state alone (:data:`STATE_ROOT` in its metadata).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ckptsvc.stage.components import SharingPattern, StateComponent

__all__ = ["STATE_ROOT", "HeldState", "components_of_state"]

#: component metadata flag: this component's state *is* the saved state (not one key of it)
STATE_ROOT = "state_root"
#: the component key of a root state that is not a module or a string-keyed mapping
ROOT_KEY = "state"
#: keys that become components as they are (and name their files: ``<key>_state*``)
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class HeldState:
    """The stateful of a plain value: ``state_dict()`` returns it, ``load_state_dict``
    replaces it."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state_dict: Any) -> None:
        self.value = state_dict


def _is_stateful(value: object) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def _component(key: str, value: Any, *, root: bool = False) -> StateComponent:
    return StateComponent(
        key=key,
        stateful=value if _is_stateful(value) else HeldState(value),
        sharing_pattern=SharingPattern.GLOBAL,
        metadata={STATE_ROOT: True} if root else {},
    )


def _is_tensor_dict(state: object) -> bool:
    """A non-empty mapping of tensors only: a state dict, saved as one model component."""
    return (
        isinstance(state, Mapping)
        and len(state) > 0
        and all(isinstance(v, torch.Tensor) for v in state.values())
    )


def components_of_state(state: Any) -> list[StateComponent]:
    """The GLOBAL components ``save(step, state)`` writes (see the module docstring)."""
    if isinstance(state, torch.nn.Module) or _is_tensor_dict(state):
        return [_component("model", state, root=True)]
    if isinstance(state, Mapping) and all(isinstance(k, str) and _KEY_RE.match(k) for k in state):
        return [_component(k, v) for k, v in state.items()]
    return [_component(ROOT_KEY, state, root=True)]
