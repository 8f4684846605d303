"""Who this process is in the job: :class:`RankInfo`, parsed once.

Rank and world size come from ``torch.distributed`` when it is initialised, else from the
launcher's environment (``RANK``, ``WORLD_SIZE``); local rank and node from ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE`` and ``GROUP_RANK`` (the node index), and the node writer's id from
``CKPTSVC_NODE_ID`` (:func:`~ckptsvc.workers.identity.node_id`). Named process groups resolve to
their global ranks (:func:`resolve_groups`). Nothing here runs a collective; every module
that needs the rank asks here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ckptsvc.errors import ConfigError
from ckptsvc.workers.identity import node_id

__all__ = ["RankInfo", "group_ranks", "resolve_groups"]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from e


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job (all fields known locally, no communication)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_index: int
    node_id: str

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def alone(self) -> RankInfo:
        """This process as the only one of its job (rank 0 of 1, same node): for a saver that
        runs on one rank while the others do not take part."""
        return RankInfo(0, 1, 0, 1, 0, self.node_id)

    @classmethod
    def current(cls, *, rank: int | None = None, node: str | None = None) -> RankInfo:
        """Discover rank, world and node (explicit ``rank`` / ``node`` win)."""
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            found_rank = dist.get_rank()
        else:
            world = _env_int("WORLD_SIZE", 1)
            found_rank = _env_int("RANK", 0)
        if rank is not None and world > 1:  # in one process an explicit rank is only a label
            found_rank = rank
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        local_rank = _env_int("LOCAL_RANK", found_rank % max(1, local_world))
        node_index = _env_int("GROUP_RANK", found_rank // max(1, local_world))
        if not 0 <= found_rank < max(1, world):
            raise ConfigError(f"rank {found_rank} is outside the world of {world} ranks")
        return cls(
            found_rank, max(1, world), local_rank, max(1, local_world), node_index, node_id(node)
        )


def group_ranks(name: str, group: Any, info: RankInfo) -> tuple[int, ...]:
    """The global ranks of a named process group (``None`` means the whole world)."""
    if group is None:
        return tuple(range(info.world_size))
    if isinstance(group, (list, tuple)) and all(isinstance(r, int) for r in group):
        return tuple(sorted(group))
    try:
        return tuple(sorted(dist.get_process_group_ranks(group)))
    except Exception as e:
        raise ConfigError(
            f"process group {name!r}: cannot list its ranks ({type(e).__name__}: {e}); pass a "
            "torch.distributed ProcessGroup, a list of global ranks, or None for the world"
        ) from e


def resolve_groups(
    names: set[str], groups: Mapping[str, Any] | None, info: RankInfo
) -> dict[str, tuple[int, ...]]:
    """``{group name: ranks of this rank's group of that name}`` for every name needed."""
    out: dict[str, tuple[int, ...]] = {}
    for name in sorted(names):
        if groups is None or name not in groups:
            if not info.distributed:
                out[name] = (0,)
                continue
            known = sorted(groups) if groups else []
            raise ConfigError(
                f"no process group named {name!r} (known: {known}); pass it in process_groups= "
                "or return it from get_process_groups()"
            )
        ranks = group_ranks(name, groups[name], info)
        if info.rank not in ranks:
            raise ConfigError(
                f"process group {name!r} has ranks {list(ranks)}, which do not include this "
                f"rank {info.rank}; give each rank the group it belongs to"
            )
        out[name] = ranks
    return out


# ---- coordination of one distributed save ---------------------------------------------------
