"""Forgather's checkpoint types: :class:`CheckpointManifest`, :class:`ComponentManifest`,
:func:`compute_state_hash` and the :data:`Statefuls` / :data:`ModelParts` aliases.

Same fields, defaults, methods and JSON as Forgather's ``checkpoint_types`` module (and
the aliases of its ``checkpoint_manager``), so code written against Forgather runs on
ckptsvc unchanged. Also importable from :mod:`ckptsvc.manager`, where Forgather users
import the manager from.

- ``CheckpointManifest.to_dict`` / ``from_dict`` / ``save`` / ``load`` read and write the
  manifest JSON as Forgather does (``indent=2``, the timestamp as ISO 8601).
  ``load`` and :meth:`CheckpointManifest.from_checkpoint` read a ckptsvc checkpoint's
  ``checkpoint_manifest.json`` too (its top-level fields are Forgather's; ckptsvc's own
  record sits under ``metadata["ckptsvc"]``), from a local path or any fsspec URL.
- :func:`compute_state_hash` hashes exactly as Forgather does (SHA-256 of the sorted-keys
  JSON of a summary: tensors by shape, dtype, device and their first 10 values), so a
  hash matches Forgather's for the same state.

The dataclasses are frozen (ckptsvc's rule); the dicts and lists they hold are plain and
can be filled in, as Forgather's code does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch
from torch import nn

from ckptsvc.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageNotFoundError
from ckptsvc.format.json_doc import read_json_doc
from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.stage.components import Stateful
from ckptsvc.storage import Location

__all__ = [
    "CheckpointManifest",
    "ComponentManifest",
    "ModelParts",
    "Statefuls",
    "compute_state_hash",
]

#: Forgather's ``Statefuls``: components by name
Statefuls = dict[str, Stateful]
#: Forgather's ``ModelParts``: the modules (pipeline stages) a rank holds
ModelParts = Iterable[nn.Module]


@dataclass(frozen=True)
class ComponentManifest:
    """The manifest entry of one saved component (Forgather's eight keys).

    ``sharing_pattern`` is a :class:`~ckptsvc.stage.components.SharingPattern` value
    (``"global"``, ``"per_rank"``, ...); ``ranks`` the ranks that saved it;
    ``replicated_across`` the ranks sharing it (REPLICATED / PER_GROUP); ``size_bytes``
    the bytes saved; ``checksum`` an optional hash.
    """

    key: str
    sharing_pattern: str
    ranks: list[int]
    replicated_across: list[int] | None = None
    group_name: str | None = None
    size_bytes: int = 0
    checksum: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object Forgather stores for the component."""
        return {
            "key": self.key,
            "sharing_pattern": self.sharing_pattern,
            "ranks": self.ranks,
            "replicated_across": self.replicated_across,
            "group_name": self.group_name,
            "size_bytes": self.size_bytes,
            "checksum": self.checksum,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComponentManifest:
        """The entry from its JSON object (exactly Forgather's keys; an unknown or missing
        one raises ``TypeError``, as ``cls(**data)`` does in Forgather)."""
        return cls(**data)


@dataclass(frozen=True)
class CheckpointManifest:
    """A checkpoint's manifest, ``checkpoint_manifest.json`` (Forgather's fields).

    Example (a ckptsvc checkpoint's manifest, read back)::

        manifest = CheckpointManifest.from_checkpoint(path)
        manifest.components["model"].sharing_pattern   # "global"
        manifest.metadata["ckptsvc"]["step"]           # ckptsvc's own record
    """

    checkpoint_path: str
    world_size: int
    timestamp: datetime
    components: dict[str, ComponentManifest]
    training_args_hash: str | None = None
    forgather_version: str | None = None
    pytorch_version: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the manifest (the timestamp in ISO 8601)."""
        return {
            "checkpoint_path": self.checkpoint_path,
            "world_size": self.world_size,
            "timestamp": self.timestamp.isoformat(),
            "components": {k: v.to_dict() for k, v in self.components.items()},
            "training_args_hash": self.training_args_hash,
            "forgather_version": self.forgather_version,
            "pytorch_version": self.pytorch_version,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointManifest:
        """The manifest from its JSON object; ``KeyError`` for a missing required field,
        as in Forgather."""
        return cls(
            checkpoint_path=data["checkpoint_path"],
            world_size=data["world_size"],
            timestamp=datetime.fromisoformat(data["timestamp"]),
            components={k: ComponentManifest.from_dict(v) for k, v in data["components"].items()},
            training_args_hash=data.get("training_args_hash"),
            forgather_version=data.get("forgather_version"),
            pytorch_version=data.get("pytorch_version"),
            metadata=data.get("metadata", {}),
        )

    def save(
        self,
        manifest_path: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        """Write the manifest as JSON (``indent=2``, as Forgather) to ``manifest_path``, a
        local path or fsspec URL, atomically (a reader sees the old file or the new one)."""
        text = json.dumps(self.to_dict(), indent=2)
        Location.parse(os.fspath(manifest_path), storage_options).publish(text.encode("utf-8"))

    @classmethod
    def load(
        cls, manifest_path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
    ) -> CheckpointManifest:
        """Read a manifest JSON file (Forgather's, or a ckptsvc checkpoint's
        ``checkpoint_manifest.json``) from a local path or fsspec URL.

        Raises :class:`~ckptsvc.errors.CheckpointNotFoundError` (a ``FileNotFoundError``)
        when the file does not exist and :class:`~ckptsvc.errors.CorruptCheckpointError`
        when it is not a manifest, naming the file.
        """
        loc = Location.parse(os.fspath(manifest_path), storage_options)
        try:
            data = read_json_doc(loc, what="manifest")
        except StorageNotFoundError as e:
            raise CheckpointNotFoundError(
                f"no manifest at {loc.url}: pass a checkpoint's {MANIFEST_NAME} (or use "
                "CheckpointManifest.from_checkpoint with the checkpoint directory)"
            ) from e
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"{loc.url}: a manifest must be a JSON object")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptCheckpointError(
                f"{loc.url}: not a checkpoint manifest ({type(e).__name__}: {e})"
            ) from e

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> CheckpointManifest:
        """Read ``<checkpoint_path>/checkpoint_manifest.json`` (see :meth:`load`)."""
        loc = Location.parse(os.fspath(checkpoint_path), storage_options).join(MANIFEST_NAME)
        return cls.load(loc.url, storage_options=storage_options)


def compute_state_hash(state_dict: dict[str, Any]) -> str:
    """Forgather's quick replication check: the SHA-256 hex digest of
    ``json.dumps(summary, sort_keys=True)``, where the summary keeps dicts, lists (tuples
    become lists) and JSON scalars, replaces each tensor by its shape, dtype, device
    (``cuda:N`` counted as ``cuda``) and first 10 values, and anything else by ``str()``.

    Cheap but partial, as in Forgather: two states differing only past a tensor's tenth
    value hash the same.
    """
    text = json.dumps(_serializable(state_dict), sort_keys=True).encode("utf-8")
    return hashlib.sha256(text).hexdigest()


def _serializable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _serializable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_serializable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        device = str(obj.device)
        if device.startswith("cuda:"):
            device = "cuda"
        return {
            "type": "tensor",
            "shape": list(obj.shape),
            "dtype": str(obj.dtype),
            "device": device,
            "sample": obj.flatten()[: min(10, obj.numel())].tolist() if obj.numel() > 0 else [],
        }
    if isinstance(obj, (int, float, str, bool, type(None))):
        return obj
    return str(obj)
