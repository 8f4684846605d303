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
import operator
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
from ckptsvc.stage.copy_program import CopyProgram
from ckptsvc.stage.parts import ComponentPlan, OrderedSources, PartReport, StagedFile
from ckptsvc.stage.save_handle import SaveHandle
from ckptsvc.version import __version__
from ckptsvc.workers.protocol import CommitInfo, FileJob, SaveJob, SmallFile, WriterOptions

__all__ = ["commit_job", "data_job", "stage_components"]


def stage_components(
    plans: Sequence[ComponentPlan],
    staged: Sequence[StagedFile],
    layout: ArenaPlan,
    arena: StagingArena | None,
    *,
    threads: int,
    executor: Executor | None,
    sources: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> tuple[PartReport, ...]:
    """Copy every staged tensor into the arena and return each component's part (with
    CRCs when validated). CPU tensors: runs of small ones by one ``torch.cat`` each, the
    rest one by one (:mod:`ckptsvc.stage.copy_program`); with any CUDA source, every tensor
    one by one (D2H on a side stream into the pinned arena). ``sources`` maps the staged
    tensors to the ones to copy (an overlapped save's clones)."""
    if arena is None:
        return tuple(p.part for p in plans)
    program = layout.program
    srcs: list[torch.Tensor] = []
    for f, names in zip(staged, program.names, strict=True):
        if isinstance(f.sources, OrderedSources) and f.sources.names == names:
            srcs.extend(f.sources.values_in_order)  # a reused plan's: no lookup per name
        else:
            srcs.extend(map(f.sources.__getitem__, names))
    if sources is not None:
        srcs = sources(srcs)
    with torch.no_grad():
        if _any_cuda(srcs):
            arena.pin()
            dsts = arena.views_at(layout, program.specs)
            copy_into(dsts, srcs, threads=threads, executor=executor)
        else:
            dsts = arena.views_at(layout, program.single_specs, kind="singles")
            views = arena.views_at(layout, program.run_specs, kind="runs")
            copy_into(
                dsts,
                [srcs[i] for i in program.singles],
                threads=threads,
                executor=executor,
                runs=[
                    (v, srcs[r.first : r.stop]) for v, r in zip(views, program.runs, strict=True)
                ],
            )
    return tuple(_with_crcs(p, staged, program, arena) for p in plans)


_IS_CUDA = operator.attrgetter("is_cuda")


def _any_cuda(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a tensor is on a CUDA device; no look at each tensor while CUDA is not
    initialised (a CUDA tensor initialises it; 100,000 ``is_cuda`` reads cost 20-40 ms)."""
    return torch.cuda.is_initialized() and any(map(_IS_CUDA, tensors))


def _with_crcs(
    p: ComponentPlan, staged: Sequence[StagedFile], program: CopyProgram, arena: StagingArena
) -> PartReport:
    """``p.part`` with the CRC-32C of each of ``p.crc_names``, read back from the arena."""
    if not p.crc_names:
        return p.part
    mine = {id(f) for f in p.files}
    index: dict[str, int] = {}
    first = 0
    for f, names in zip(staged, program.names, strict=True):
        if id(f) in mine:
            index.update((name, first + j) for j, name in enumerate(names))
        first += len(names)
    crcs = []
    for name in p.crc_names:
        i = index[name]
        nbytes = program.nbytes(i)
        data = arena.bytes_at(program.specs[i][0], nbytes).numpy().data if nbytes else b""
        crcs.append(crc32c_hex(data))
    return replace(p.part, crcs=tuple(crcs))


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
        # the outcome goes out to the ranks once the manifest is durable: the marker's
        # delete and the latest pointer follow it (design.md section 4)
        commit=replace(
            commit_info(pending, merged, world_size=world_size), report_when_durable=True
        ),
        options=writer_options,
    )


def json_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` as plain JSON data (a copy), or InvalidStateError."""
    try:
        return dict(json.loads(json.dumps(metadata, allow_nan=False)))
    except (TypeError, ValueError) as e:
        raise InvalidStateError(f"checkpoint metadata must be JSON-serialisable: {e}") from e
