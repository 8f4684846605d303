"""The state skeleton document: the JSON that records a state's structure and every
non-tensor value (the encoding is described in :mod:`ckptsvc.stage.flatten`, which builds
it). Torch-free, so ``verify`` checks skeletons without importing torch. Component
documents carry the same ``state`` encoding; ``ckptsvc_state.json`` is the whole-state
skeleton of checkpoints written before the component layout.
"""

from __future__ import annotations

from typing import Any

from ckptsvc.errors import CorruptCheckpointError
from ckptsvc.format.json_doc import parse_json_doc

__all__ = ["SKELETON_FORMAT", "SKELETON_NAME", "SKELETON_VERSION", "parse_skeleton"]

#: the JSON file of a checkpoint that holds the non-tensor state and the structure
SKELETON_NAME = "ckptsvc_state.json"
SKELETON_FORMAT = "ckptsvc-state"
SKELETON_VERSION = 1


def parse_skeleton(raw: bytes, *, where: str) -> dict[str, Any]:
    """Decode and check a skeleton file's JSON; ``where`` names it in errors."""
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
