"""Small Stateful building blocks a training loop hands to :class:`CheckpointManager`.

- :class:`TrainingProgress`: global step, epoch, samples and tokens seen, plus free-form
  JSON extras - the "where was I" of a run;
- :class:`NamedStates`: several Statefuls saved as one component, keyed by *name* (so
  adding, removing or reordering callbacks never hands one callback another's state);
- :class:`SimpleStatefulProvider`: a :class:`~ckptsvc.stage.components.StatefulProvider` built
  from ``{key: stateful}`` with the usual sharing patterns;
- :class:`DistInfo`: this process's rank, world size and node position.

Dataloader position: pass any Stateful. ``torchdata.stateful_dataloader.StatefulDataLoader``
(torchdata 0.11, works with torch 2.13) is one; its state dict holds tensors, ints and
``None``, which ckptsvc stores without pickle.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptsvc.errors import CheckpointError, ConfigError, StateMismatchError
from ckptsvc.ranks import RankInfo
from ckptsvc.stage.components import SharingPattern, StateComponent, Stateful

__all__ = [
    "DistInfo",
    "NamedStates",
    "SimpleStatefulProvider",
    "TrainingProgress",
    "stateful_name",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainingProgress:
    """How far training got. ``extra`` must hold JSON values (or tensors)."""

    global_step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "extra": dict(self.extra),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.global_step = int(state_dict["global_step"])
        self.epoch = int(state_dict.get("epoch", 0))
        self.samples_seen = int(state_dict.get("samples_seen", 0))
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
        self.extra = dict(state_dict.get("extra") or {})


def stateful_name(obj: object) -> str:
    """A callback's name: its ``name`` attribute (Forgather's TrainerCallback) or class name."""
    name = getattr(obj, "name", None)
    return name if isinstance(name, str) and name else type(obj).__name__


def _is_stateful(obj: object) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


class NamedStates:
    """Many Statefuls as one: ``state_dict() == {name: item.state_dict()}``.

    Loading restores each item from the entry with its name. An item the checkpoint
    does not have keeps its state (a warning: e.g. a callback added since); an entry with
    no item is ignored (info); an item whose ``load_state_dict`` raises is an error.
    """

    def __init__(self, items: Mapping[str, Stateful], *, what: str = "state") -> None:
        for name, item in items.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{what} names must be non-empty strings, got {name!r}")
            if not _is_stateful(item):
                raise ConfigError(f"{what} {name!r} has no state_dict()/load_state_dict()")
        self.items = dict(items)
        self.what = what

    @classmethod
    def from_objects(cls, objects: Sequence[object], *, what: str = "callback") -> NamedStates:
        """Keep the Stateful ones, named by :func:`stateful_name`; duplicates are an error
        (give them distinct ``name`` attributes, or pass a mapping)."""
        items: dict[str, Stateful] = {}
        for obj in objects:
            if not _is_stateful(obj):
                continue
            name = stateful_name(obj)
            if name in items:
                raise ConfigError(
                    f"two Stateful {what}s are both named {name!r}; give them distinct `name` "
                    f"attributes or pass a {{name: {what}}} mapping"
                )
            items[name] = obj  # type: ignore[assignment]
        return cls(items, what=what)

    def __len__(self) -> int:
        return len(self.items)

    def state_dict(self) -> dict[str, Any]:
        return {name: item.state_dict() for name, item in self.items.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for name, item in self.items.items():
            if name not in state_dict:
                logger.warning(
                    "the checkpoint has no state for %s %r; keeping its current state",
                    self.what,
                    name,
                )
                continue
            try:
                item.load_state_dict(state_dict[name])
            except CheckpointError:
                raise
            except Exception as e:
                raise StateMismatchError(
                    f"restoring {self.what} {name!r} failed: {type(e).__name__}: {e}"
                ) from e
        extra = sorted(set(state_dict) - set(self.items))
        if extra:
            logger.info(
                "the checkpoint holds state for %ss no longer present: %s", self.what, extra
            )


class SimpleStatefulProvider:
    """A StatefulProvider from ``{key: stateful}``: ``"rng"`` is PER_RANK, the rest GLOBAL
    (single-process and replicated-data-parallel training). ``optional`` keys may be
    missing from a checkpoint.

    What :class:`~ckptsvc.manager.CheckpointManager`'s ``stateful_provider`` must be when
    there is no trainer object providing ``get_state_components()``. ``patterns`` overrides
    the sharing pattern of some keys::

        provider = SimpleStatefulProvider(
            {"optimizer": opt, "scheduler": sched, "rng": RNGState()},
            patterns={"optimizer": SharingPattern.REPLICATED},
            optional=["scheduler"],
        )
    """

    def __init__(
        self,
        statefuls: Mapping[str, Stateful],
        *,
        patterns: Mapping[str, SharingPattern] | None = None,
        optional: Sequence[str] = (),
    ) -> None:
        self._statefuls = dict(statefuls)
        self._patterns = dict(patterns or {})
        self._optional = set(optional)

    def get_state_components(self) -> list[StateComponent]:
        """One :class:`~ckptsvc.stage.components.StateComponent` per key, in the mapping's order."""
        return [
            StateComponent(
                key=key,
                stateful=obj,
                sharing_pattern=self._patterns.get(
                    key, SharingPattern.PER_RANK if key == "rng" else SharingPattern.GLOBAL
                ),
                required=key not in self._optional,
            )
            for key, obj in self._statefuls.items()
        ]

    def get_process_groups(self) -> dict[str, Any]:
        """No named process groups (``{}``)."""
        return {}


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (all 0/1 for a single process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)

    @classmethod
    def detect(cls, dist: object | None = None) -> DistInfo:
        """From ``dist`` (anything with ``rank``/``world_size``/``local_rank``, such as
        Forgather's DistributedEnvInterface), else from ``torch.distributed`` when it is
        initialised (local ranks from torchrun's environment), else a single process."""
        if dist is not None:
            world = int(getattr(dist, "world_size", 1))
            local_world = getattr(dist, "local_world_size", None)
            return cls(
                rank=int(getattr(dist, "rank", 0)),
                local_rank=int(getattr(dist, "local_rank", 0)),
                world_size=world,
                local_world_size=int(
                    local_world if local_world is not None else RankInfo.current().local_world_size
                ),
            )
        td = torch.distributed
        if td.is_available() and td.is_initialized():
            info = RankInfo.current()  # the one parse of the launcher's environment
            return cls(
                rank=info.rank,
                local_rank=info.local_rank,
                world_size=info.world_size,
                local_world_size=info.local_world_size,
            )
        return cls()
