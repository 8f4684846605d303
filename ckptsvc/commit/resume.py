"""Which checkpoint a resuming job loads: :func:`resolve_latest`."""

from __future__ import annotations

from typing import Any

from ckptsvc.read.latest import find_latest_checkpoint

__all__ = ["resolve_latest"]


def resolve_latest(
    root: str, *, storage_options: dict[str, Any] | None = None, store: Any = None, rank: int = 0
) -> str | None:
    """The newest complete checkpoint under ``root`` (every rank looks for itself)."""
    return find_latest_checkpoint(root, storage_options=storage_options)
