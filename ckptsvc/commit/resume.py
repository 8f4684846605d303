"""Which checkpoint a resuming job loads: :func:`resolve_latest`, one discovery per job.

``find_latest_checkpoint`` reads the ``latest`` pointer and the manifest it names (5
requests on an object store), or without a usable pointer lists the run and reads every
checkpoint's manifest (1 GET per checkpoint). Called by every rank of a job of 10,000
ranks that is still 50,000 requests (a million with 100 checkpoints and no pointer).
:func:`resolve_latest` runs it on rank 0 only and hands the answer to the other ranks
through the job's store:

1. every rank numbers its call (``add`` on a counter of its own, so the n-th call of
   every rank meets the n-th call of rank 0; every rank must call it, in the same order,
   as for a load);
2. rank 0 resolves and publishes ``{"path": ...}`` (or the error it got) under
   ``ckptsvc/resolve/<root hash>/<n>``;
3. the other ranks wait for that key (one blocking wait, bounded by
   ``CKPTSVC_COMMIT_TIMEOUT_S``) and return rank 0's answer, or raise its error.

Without a process group (one process, or ranks without a store) every process resolves
for itself, as ``find_latest_checkpoint`` does.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from ckptsvc import knobs
from ckptsvc.commit.coordinator import default_store
from ckptsvc.errors import CheckpointNotFoundError, CoordinationError
from ckptsvc.ranks import RankInfo
from ckptsvc.read.latest import find_latest_checkpoint

__all__ = ["resolve_latest"]


def resolve_latest(
    root: str,
    *,
    storage_options: dict[str, Any] | None = None,
    store: Any | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_s: float | None = None,
) -> str | None:
    """The newest complete checkpoint under ``root`` (as ``find_latest_checkpoint``),
    resolved by rank 0 and shared with every rank (see the module docstring). ``store``:
    the job's ``torch.distributed`` store (default: the process group's); ``rank`` /
    ``world_size``: this process's (default: :class:`~ckptsvc.ranks.RankInfo`). A
    collective: in a multi-rank job every rank must call it."""
    store = store if store is not None else default_store()
    if rank is None or world_size is None:
        info = RankInfo.current(rank=rank)
        rank = info.rank if rank is None else rank
        world_size = info.world_size if world_size is None else world_size
    if store is None or world_size <= 1:
        return find_latest_checkpoint(root, storage_options=storage_options)
    prefix = f"ckptsvc/resolve/{hashlib.sha256(root.encode()).hexdigest()[:12]}"
    try:
        key = f"{prefix}/{int(store.add(f'{prefix}/calls/{rank}', 1))}"
        if rank == 0:
            return _publish(store, key, root, storage_options)
        wait_s = knobs.COMMIT_TIMEOUT_S.get(timeout_s)
        store.wait([key], timedelta(seconds=wait_s))
        doc = json.loads(bytes(store.get(key)))
    except CheckpointNotFoundError:
        raise
    except Exception as e:
        raise CoordinationError(
            f"rank {rank}: could not learn from rank 0 which checkpoint under {root} to load "
            f"({type(e).__name__}: {e}); every rank must resolve the latest checkpoint "
            "together (and rank 0 within CKPTSVC_COMMIT_TIMEOUT_S)"
        ) from e
    if "error" in doc:
        raise CheckpointNotFoundError(
            f"rank 0 could not resolve the latest checkpoint under {root}: {doc['error']}"
        )
    path = doc.get("path")
    return str(path) if path is not None else None


def _publish(store: Any, key: str, root: str, storage_options: dict[str, Any] | None) -> str | None:
    """Rank 0: resolve, publish the answer (or the error, then raise it)."""
    try:
        path = find_latest_checkpoint(root, storage_options=storage_options)
    except Exception as e:
        store.set(key, json.dumps({"error": f"{type(e).__name__}: {e}"}))
        raise
    store.set(key, json.dumps({"path": path}))
    return path
