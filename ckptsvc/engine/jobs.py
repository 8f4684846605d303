"""The trainer-side steps of a save between planning and the writer.

1. :func:`stage_components` (training thread, or the snapshot thread): copy every staged
   tensor into the arena (CPU threads, or D2H on a side stream) and compute the per-tensor
   CRC-32C that ``validate_replication`` compares across replicas, from the staged bytes;
2. :func:`pending_commit` and :func:`data_job` (training thread): this rank's save as the
   coordinator tracks it, and the writer job for its files and documents - in a single
   process the job also carries the commit (everything is known);
3. :func:`commit_job` (rank 0's commit thread): index, merged documents and the manifest,
   with every other rank's file records.

:func:`json_metadata` checks the user's metadata once, before anything is planned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any

import torch

from ckptsvc.commit.coordinator import PendingCommit
from ckptsvc.commit.reports import Merged, RankReport, merge_reports
from ckptsvc.commit.target import SaveTarget
from ckptsvc.errors import InvalidStateError
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.format.manifest import FileRecord
from ckptsvc.stage.arena import ArenaPlan, StagingArena, copy_into
from ckptsvc.stage.parts import ComponentPlan, PartReport, StagedFile
from ckptsvc.stage.save_handle import SaveHandle
from ckptsvc.stage.tensors import dtype_to_torch
from ckptsvc.version import __version__
from ckptsvc.workers.protocol import CommitInfo, FileJob, SaveJob, SmallFile, WriterOptions

__all__ = ["commit_job", "data_job", "stage_components"]


def _bytes_of(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def stage_components(
    plans: Sequence[ComponentPlan],
    staged: Sequence[StagedFile],
    layout: ArenaPlan,
    arena: StagingArena | None,
    *,
    threads: int,
    executor: Executor | None,
    copy: Callable[..., None] = copy_into,
) -> tuple[PartReport, ...]:
    """Copy into the arena (with ``copy``, :func:`ckptsvc.stage.arena.copy_into` unless a
    caller wraps it); return each component's part (with CRCs when validated)."""
    if arena is None:
        return tuple(p.part for p in plans)
    specs: list[tuple[int, torch.dtype, tuple[int, ...]]] = []
    srcs: list[torch.Tensor] = []
    where: dict[tuple[int, str], int] = {}  # (id of the staged file, tensor name) -> index
    for i, f in enumerate(staged):
        for e in f.plan.layout.entries:
            where[(id(f), e.name)] = len(specs)
            specs.append((layout.file_offsets[i] + e.begin, dtype_to_torch(e.dtype), e.shape))
            srcs.append(f.sources[e.name])
    if any(t.device.type == "cuda" for t in srcs):
        arena.pin()
    dsts = arena.views_at(layout, specs)
    with torch.no_grad():
        copy(dsts, srcs, threads=threads, executor=executor)
    parts = []
    for p in plans:
        if not p.crc_names:
            parts.append(p.part)
            continue
        index = {name: where[(id(f), name)] for f in p.files for name in f.sources}
        crcs = tuple(crc32c_hex(_bytes_of(dsts[index[n]])) for n in p.crc_names)
        parts.append(replace(p.part, crcs=crcs))
    return tuple(parts)


def pending_commit(
    handle: SaveHandle,
    report: RankReport,
    *,
    target: SaveTarget,
    plans: Sequence[ComponentPlan],
    user_metadata: dict[str, Any],
) -> PendingCommit:
    """This rank's save between its snapshot and its outcome: where it writes (the claimed
    ``target``), what it reports, and what rank 0 needs to merge the reports."""
    return PendingCommit(
        step=handle.step,
        path=target.write_path,
        handle=handle,
        report=report,
        user_metadata=user_metadata,
        crc_names={p.component.key: p.crc_names for p in plans if p.crc_names},
        sharded_docs={p.component.key: p.sharded_doc for p in plans if p.sharded_doc is not None},
        claim_id=target.claim_id,
        replace_url=target.replace_url,
    )


def commit_info(pending: PendingCommit, merged: Merged, *, world_size: int) -> CommitInfo:
    """What the writer needs for the manifest; ``extra_files`` are the other files."""
    return CommitInfo(
        step=pending.step,
        world_size=world_size,
        components=merged.components,
        pytorch_version=str(torch.__version__),
        library_version=__version__,
        user_metadata=pending.user_metadata,
        extra_files=tuple(f for f in merged.files if f.path not in merged.small_files),
        claim_id=pending.claim_id,
        replace_url=pending.replace_url,
    )


def data_job(
    *,
    job_id: int,
    ckpt_url: str,
    storage_options: dict[str, Any],
    pending: PendingCommit,
    plans: Sequence[ComponentPlan],
    staged: Sequence[StagedFile],
    layout: ArenaPlan,
    arena: StagingArena | None,
    single_process: bool,
    base_url: str = "",
    base_files: tuple[FileRecord, ...] = (),
    writer_options: WriterOptions,
) -> SaveJob:
    """This rank's writer job, written with ``writer_options``; ``base_url`` / ``base_files`` name the committed checkpoint
    unchanged files may be copied from (incremental saves, :mod:`ckptsvc.stage.incremental`)."""
    files = tuple(
        FileJob(f.plan.file_name, f.plan.layout, off)
        for f, off in zip(staged, layout.file_offsets, strict=True)
        if f.write
    )
    small = [SmallFile(name, data) for p in plans for name, data in sorted(p.docs.items())]
    commit = None
    if single_process:  # everything rank 0 would merge is known now: commit in this job
        merged = merge_reports(
            [pending.report],
            world_size=1,
            crc_names=pending.crc_names,
            sharded_docs=pending.sharded_docs,
        )
        small += [SmallFile(n, b) for n, b in sorted(merged.small_files.items())]
        commit = commit_info(pending, merged, world_size=1)
    return SaveJob(
        job_id=job_id,
        ckpt_url=ckpt_url,
        storage_options=storage_options,
        arena_name=arena.name if arena is not None else "",
        files=files,
        small_files=tuple(small),
        commit=commit,
        base_url=base_url,
        base_files=base_files,
        options=writer_options,
    )


def commit_job(
    *,
    job_id: int,
    ckpt_url: str,
    storage_options: dict[str, Any],
    pending: PendingCommit,
    merged: Merged,
    world_size: int,
    writer_options: WriterOptions,
) -> SaveJob:
    return SaveJob(
        job_id=job_id,
        ckpt_url=ckpt_url,
        storage_options=storage_options,
        arena_name="",
        files=(),
        small_files=tuple(SmallFile(n, b) for n, b in sorted(merged.small_files.items())),
        commit=commit_info(pending, merged, world_size=world_size),
        options=writer_options,
    )


def json_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` as plain JSON data (a copy), or InvalidStateError."""
    try:
        return dict(json.loads(json.dumps(metadata, allow_nan=False)))
    except (TypeError, ValueError) as e:
        raise InvalidStateError(f"checkpoint metadata must be JSON-serialisable: {e}") from e
