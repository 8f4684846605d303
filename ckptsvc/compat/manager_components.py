"""The components of a :class:`~ckptsvc.manager.CheckpointManager` save or load: the model
(a :class:`~ckptsvc.compat.model_state.ModelState` over the model parts, lending its sharing
pattern from the provider's ``"model"`` component if it has one), the provider's other
components, and the callbacks' states by name (:data:`~ckptsvc.compat.restore.CALLBACKS_KEY`);
at save time the model's snapshot goes in as a component of its own (:func:`snapshot_component`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ckptsvc.compat.model_state import ModelState
from ckptsvc.compat.restore import CALLBACKS_KEY
from ckptsvc.compat.training_state import NamedStates
from ckptsvc.errors import ConfigError, LifecycleError
from ckptsvc.stage.components import (
    SharingPattern,
    StateComponent,
    StatefulProvider,
    check_unique_keys,
)

__all__ = [
    "callback_source",
    "callback_states",
    "manager_components",
    "process_groups",
    "snapshot_component",
]


def callback_source(callbacks: Any, trainer: Any) -> Mapping[str, Any] | Sequence[Any] | None:
    """The manager's ``callbacks``, else its ``trainer``'s ``callbacks`` list (Forgather)."""
    source = callbacks
    if source is None and trainer is not None:
        source = getattr(trainer, "callbacks", None)
    return source


def callback_states(source: Mapping[str, Any] | Sequence[Any] | None) -> NamedStates | None:
    """The callbacks' states by name, or ``None`` without callbacks."""
    if not source:
        return None
    states = (
        NamedStates(source, what="callback")
        if isinstance(source, Mapping)
        else NamedStates.from_objects(list(source), what="callback")
    )
    return states if len(states) else None


def manager_components(
    provider: StatefulProvider, model_state: ModelState, callbacks: NamedStates | None
) -> tuple[StateComponent, list[StateComponent]]:
    """(model component, other components) for the current save or load.

    Raises :class:`~ckptsvc.errors.ConfigError` when ``provider`` is not a
    :class:`~ckptsvc.stage.components.StatefulProvider` or lists something other than
    :class:`~ckptsvc.stage.components.StateComponent` objects.
    """
    get = getattr(provider, "get_state_components", None)
    if not callable(get):
        raise ConfigError(
            "stateful_provider must be a StatefulProvider: an object with "
            "get_state_components() returning StateComponents (and get_process_groups()), "
            "e.g. ckptsvc.SimpleStatefulProvider({'optimizer': opt, 'rng': RNGState()}) "
            f"or your trainer; got a {type(provider).__module__}.{type(provider).__qualname__}"
        )
    comps = list(get() or [])
    bad = [c for c in comps if not isinstance(c, StateComponent)]
    if bad:
        raise ConfigError(
            f"stateful_provider.get_state_components() must return StateComponent objects; "
            f"got a {type(bad[0]).__qualname__} ({bad[0]!r:.80}): wrap each stateful as "
            "StateComponent(key, stateful, SharingPattern.GLOBAL)"
        )
    model_comp = next((c for c in comps if c.key == "model"), None)
    others = [c for c in comps if c.key != "model"]
    if callbacks is not None:
        others.append(StateComponent(CALLBACKS_KEY, callbacks, SharingPattern.GLOBAL))
    pattern = model_comp.sharing_pattern if model_comp else SharingPattern.GLOBAL
    model = StateComponent(
        key="model",
        stateful=model_state,
        sharing_pattern=pattern,
        process_group_name=model_comp.process_group_name if model_comp else None,
        validate_replication=model_comp.validate_replication if model_comp else False,
        validation_level=model_comp.validation_level if model_comp else "tensor",
    )
    check_unique_keys([model, *others])
    return model, others


def process_groups(provider: StatefulProvider) -> dict[str, Any]:
    """The provider's named process groups (``get_process_groups``), if it has any."""
    get = getattr(provider, "get_process_groups", None)
    return dict(get() or {}) if callable(get) else {}


def snapshot_component(
    model_comp: StateComponent, state: dict[str, Any], *, model: object = None
) -> StateComponent:
    """The model component of one save: ``state`` (computed before the save is submitted)
    with ``model_comp``'s sharing pattern and validation."""
    return StateComponent(
        key="model",
        stateful=_Snapshot(state, model=model),
        sharing_pattern=model_comp.sharing_pattern,
        process_group_name=model_comp.process_group_name,
        validate_replication=model_comp.validate_replication,
        validation_level=model_comp.validation_level,
    )


class _Snapshot:
    """A component whose state is a dict computed before the save was submitted; for a
    ``transformers`` model it carries the model's ``config`` and ``generation_config``, so
    the checkpoint gets ``config.json`` like any save of the model (from_pretrained works)."""

    def __init__(self, state: dict[str, Any], *, model: object = None) -> None:
        self._state = state
        self.config = getattr(model, "config", None)
        self.generation_config = getattr(model, "generation_config", None)

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # pragma: no cover
        raise LifecycleError("a save snapshot cannot be loaded into")
