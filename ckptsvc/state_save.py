"""The trainer-side steps of ``AsyncCheckpointer.save(step, state)`` (one process's state).

1. :func:`plan_state` (training thread, once per state signature, cached in a
   :class:`PlanCache`): shard files, the arena layout and the writer's file jobs;
2. :func:`copy_state` (training thread, or the snapshot thread of an overlapped save):
   every tensor into its arena view (CPU threads, or D2H on a side stream);
3. :func:`state_job` (training thread): the writer job - shards from the arena, the HF
   index and the state skeleton as small files, and the commit (manifest last).

``save_components`` has the same three steps in :mod:`ckptsvc.component_plan` and
:mod:`ckptsvc.component_save`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from .flatten import SKELETON_NAME, FlatState
from .incremental import frozen_files
from .layout import SAFE_WEIGHTS_INDEX_NAME, TensorSpec, make_index, plan_files, weight_map_of
from .manifest import ComponentRecord, FileRecord
from .safetensors_stream import dtype_to_torch
from .staging import ArenaPlan, StagingArena, plan_arena
from .workers.protocol import CommitInfo, FileJob, SaveJob, SmallFile

__all__ = ["PlanCache", "StatePlan", "copy_state", "plan_state", "state_job"]

V = TypeVar("V")


class PlanCache(Generic[V]):
    """The last ``size`` plans, by key (a state's signature): a training loop that saves
    the same model every N steps plans once."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._plans: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = make()
            while len(self._plans) > self._size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan


@dataclass(frozen=True)
class StatePlan:
    """Everything about a save that depends only on the state's signature."""

    arena: ArenaPlan
    views: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]
    file_jobs: tuple[FileJob, ...]
    weight_map: dict[str, str]
    total_nbytes: int
    shard_nbytes: int
    file_names: tuple[str, ...]
    frozen_files: frozenset[str]  # shards of frozen parameters only (incremental saves)


def plan_state(flat: FlatState, *, max_shard_size: int, incremental: bool) -> StatePlan:
    """Shard files (frozen parameters in shards of their own when ``incremental``), the
    arena layout and one writer file job per shard."""
    specs = [
        TensorSpec(n, d, tuple(t.shape))
        for (n, t), d in zip(flat.tensors, flat.dtypes, strict=True)
    ]
    frozen = flat.frozen if incremental else frozenset()
    files = plan_files(specs, max_shard_size=max_shard_size, frozen=frozen)
    arena = plan_arena(files)
    return StatePlan(
        arena=arena,
        views=tuple((s.name, dtype_to_torch(s.dtype), s.shape) for s in specs),
        file_jobs=tuple(
            FileJob(p.file_name, p.layout, off)
            for p, off in zip(files, arena.file_offsets, strict=True)
        ),
        weight_map=weight_map_of(files),
        total_nbytes=sum(s.nbytes for s in specs),
        shard_nbytes=sum(p.layout.file_nbytes for p in files),
        file_names=tuple(p.file_name for p in files),
        frozen_files=frozen_files(files, frozen),
    )


def copy_state(
    flat: FlatState,
    plan: StatePlan,
    arena: StagingArena,
    *,
    copy: Callable[..., None],
    threads: int,
    executor: Executor | None,
) -> None:
    """Copy every tensor of ``flat`` into its view of ``arena``; returns when all bytes
    landed. ``copy`` is :func:`ckptsvc.staging.copy_into` (or a wrapper of it, such as
    the overlapped save's)."""
    srcs = [t for _, t in flat.tensors]
    if any(t.device.type == "cuda" for t in srcs):
        arena.pin()
    dsts = arena.views(plan.arena, plan.views)
    with torch.no_grad():
        copy(dsts, srcs, threads=threads, executor=executor)


def state_job(
    *,
    job_id: int,
    step: int,
    ckpt_url: str,
    storage_options: dict[str, Any],
    flat: FlatState,
    plan: StatePlan,
    arena_name: str,
    user_metadata: dict[str, Any],
    base_url: str,
    base_files: tuple[FileRecord, ...],
) -> SaveJob:
    """The writer job of one ``save``: shards, index, skeleton, and the manifest last. The
    manifest lists one component, ``state``, with every file."""
    from . import __version__

    index = make_index(
        plan.weight_map,
        total_size=plan.total_nbytes,
        metadata=user_metadata,
        param_sharing=[list(g) for g in flat.param_sharing] or None,
    )
    small = (
        SmallFile(SAFE_WEIGHTS_INDEX_NAME, json.dumps(index, indent=4, ensure_ascii=True).encode()),
        SmallFile(SKELETON_NAME, flat.skeleton_json()),
    )
    files = sorted([*plan.file_names, *(f.rel_path for f in small)])
    component = ComponentRecord(
        key="state",
        sharing_pattern="global",
        ranks=(0,),
        size_bytes=plan.shard_nbytes + sum(len(f.data) for f in small),
        metadata={"files": files, "index": SAFE_WEIGHTS_INDEX_NAME, "skeleton": SKELETON_NAME},
    )
    commit = CommitInfo(
        step=step,
        world_size=1,
        components=(component,),
        pytorch_version=str(torch.__version__),
        library_version=__version__,
        user_metadata=user_metadata,
    )
    return SaveJob(
        job_id=job_id,
        ckpt_url=ckpt_url,
        storage_options=storage_options,
        arena_name=arena_name,
        files=plan.file_jobs,
        small_files=small,
        commit=commit,
        base_url=base_url,
        base_files=base_files,
    )
