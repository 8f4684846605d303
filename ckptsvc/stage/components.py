"""State components: what to checkpoint and how it is shared across ranks.

Forgather's types, same names and validation: :class:`SharingPattern`,
:class:`StateComponent`, the :class:`StatefulProvider` protocol, plus :class:`RNGState`,
which captures every random generator a training run depends on.
"""

from __future__ import annotations

import enum
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ckptsvc.errors import ConfigError, InvalidStateError

__all__ = [
    "RNGState",
    "SharingPattern",
    "StateComponent",
    "Stateful",
    "StatefulProvider",
    "check_unique_keys",
]


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class SharingPattern(enum.Enum):
    """How a component is distributed across ranks, hence who saves it.

    - ``GLOBAL``: one copy for the job, saved by rank 0, loaded by every rank;
    - ``PER_RANK``: each rank its own file;
    - ``REPLICATED``: identical on every rank, saved once (the write may be split across
      the replicas), optionally validated by comparing per-tensor checksums;
    - ``PER_GROUP``: once per named process group (``process_group_name``);
    - ``PER_NODE``: once per node.
    """

    GLOBAL = "global"
    PER_RANK = "per_rank"
    REPLICATED = "replicated"
    PER_GROUP = "per_group"
    PER_NODE = "per_node"


VALIDATION_LEVELS = ("none", "quick", "tensor", "full")
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


@dataclass
class StateComponent:
    """One checkpointable piece of training state and its sharing semantics.

    Raises ``ValueError`` (as Forgather does) for a PER_GROUP component without a group
    name, ``validate_replication`` on a non-REPLICATED component, or an unknown
    ``validation_level``.

    With ``validate_replication`` a save fails (on every rank, no manifest) when the
    replicas differ. ``validation_level``: ``"none"`` checks nothing; ``"quick"`` compares
    the structure (names, shapes, dtypes, non-tensor values) - which every REPLICATED save
    does anyway, since the ranks split the write by it; ``"tensor"`` (default) and
    ``"full"`` also compare a CRC-32C of every tensor's bytes through the job's store
    (each replica then stages the whole component, and checksums it at ~10 GB/s during
    the snapshot). A component holding DTensors is saved as shards with global offsets
    whatever its pattern (:mod:`ckptsvc.stage.sharded_plan`).
    """

    key: str
    stateful: Stateful
    sharing_pattern: SharingPattern
    process_group_name: str | None = None
    required: bool = True
    validate_replication: bool = False
    validation_level: str = "tensor"
    metadata: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.key or "/" in self.key or self.key.startswith("."):
            raise ConfigError(
                f"StateComponent key {self.key!r} must be a non-empty name without '/'"
            )
        if not isinstance(self.sharing_pattern, SharingPattern):
            raise ConfigError(
                f"StateComponent '{self.key}': sharing_pattern must be a SharingPattern"
            )
        if self.sharing_pattern is SharingPattern.PER_GROUP and not self.process_group_name:
            raise ConfigError(
                f"StateComponent '{self.key}' with PER_GROUP pattern must specify process_group_name"
            )
        if self.validate_replication and self.sharing_pattern is not SharingPattern.REPLICATED:
            raise ConfigError(
                f"StateComponent '{self.key}' has validate_replication=True but sharing_pattern is "
                f"{self.sharing_pattern.value}. Replication validation only applies to REPLICATED pattern."
            )
        if self.validation_level not in VALIDATION_LEVELS:
            raise ConfigError(
                f"StateComponent '{self.key}': validation_level must be one of {VALIDATION_LEVELS}"
            )
        for name, data in self.files.items():
            if not isinstance(name, str) or not _FILE_NAME_RE.fullmatch(name):
                raise ConfigError(
                    f"StateComponent '{self.key}': file name {name!r} must be a plain name of "
                    "[A-Za-z0-9._-] not starting with '.'"
                )
            if not isinstance(data, bytes):
                raise ConfigError(
                    f"StateComponent '{self.key}': file {name!r} must be bytes, not "
                    f"{type(data).__name__}"
                )


@runtime_checkable
class StatefulProvider(Protocol):
    """A trainer: lists its components and its named process groups."""

    def get_state_components(self) -> list[StateComponent]: ...
    def get_process_groups(self) -> dict[str, Any]: ...


def check_unique_keys(components: list[StateComponent]) -> None:
    """Reject duplicate component keys (``ValueError`` naming them)."""
    counts = Counter(c.key for c in components)
    dups = sorted(k for k, n in counts.items() if n > 1)
    if dups:
        raise ConfigError(f"duplicate StateComponent keys: {dups}")
    names = Counter(name for c in components for name in c.files)
    dup_files = sorted(n for n, k in names.items() if k > 1)
    if dup_files:
        raise ConfigError(f"StateComponent files named by more than one component: {dup_files}")


class RNGState:
    """Every generator a run draws from: Python ``random``, NumPy's global generator, torch
    CPU and *every* CUDA device (Forgather kept only CPU and the current device).

    ``state_dict`` holds tensors (torch states, NumPy's key) and JSON-able values only,
    so it saves without pickle.
    """

    def state_dict(self) -> dict[str, Any]:
        py_version, py_state, py_gauss = random.getstate()
        np_state = np.random.get_state(legacy=False)
        if not isinstance(np_state, dict):  # pragma: no cover - legacy=False returns a dict
            raise InvalidStateError(
                "unexpected NumPy RNG state: get_state(legacy=False) gave no dict"
            )
        state: dict[str, Any] = {
            "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
            "numpy": {
                "bit_generator": np_state["bit_generator"],
                "key": torch.from_numpy(
                    np.asarray(np_state["state"]["key"], dtype=np.uint32).copy()
                ),
                "pos": int(np_state["state"]["pos"]),
                "has_gauss": int(np_state["has_gauss"]),
                "gauss": float(np_state["gauss"]),
            },
            "torch_cpu": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        py = state_dict["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss"]))
        npd = state_dict["numpy"]
        np.random.set_state(
            {
                "bit_generator": npd["bit_generator"],
                "state": {
                    "key": np.asarray(torch.as_tensor(npd["key"]).numpy(), dtype=np.uint32),
                    "pos": int(npd["pos"]),
                },
                "has_gauss": int(npd["has_gauss"]),
                "gauss": float(npd["gauss"]),
            }
        )
        torch.set_rng_state(torch.as_tensor(state_dict["torch_cpu"], dtype=torch.uint8))
        cuda = state_dict.get("torch_cuda")
        if cuda and torch.cuda.is_available():
            if len(cuda) != torch.cuda.device_count():
                raise ConfigError(
                    f"RNG state holds {len(cuda)} CUDA generators but this process sees "
                    f"{torch.cuda.device_count()} devices"
                )
            torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in cuda])
