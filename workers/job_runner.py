"""One save job in the node writer: the job thread, from the arena to ``JobDone``.

``workers.node_writer`` receives a ``SaveJob`` on a trainer's connection, makes a
:class:`JobState` and starts a job thread on :func:`run_job`. Call order (all on the job
thread unless said otherwise):

1. ``Location.parse`` with the job's ``WriterOptions`` as ``IOSettings``; map the arena
   read-only (``conn.arena``); ``begin_checkpoint`` (the in-progress marker).
2. Every shard to the I/O pool (``options.io_threads`` threads of the job's own, I/O
   threads): :func:`stream_file` (header, then zero-copy slices of the arena, CRC-32C while
   streaming, durable on return); a shard whose bytes equal the job's base checkpoint's
   copy is linked / copied server-side instead (``workers.reuse``). A streamed job
   (``SaveJob.stream``: the trainer's state exceeds its memory budget) writes its shards
   one after the other from the pieces instead (``workers.piece_stream``).
3. The small files (``publish_file``); wait for the shards.
4. Wait until the same trainer's previous job finished (manifests appear in save order);
   when the job asks, :func:`finish_checkpoint` writes the manifest last.
5. ``JobDone`` / ``JobFailed`` to the trainer (``conn.send``); a distributed commit's
   ``JobDone`` (``CommitInfo.report_when_durable``) goes as soon as the manifest is
   durable, before the marker's delete and the ``latest`` pointer, which the job thread
   finishes before the job counts as finished. On any failure before the report the
   checkpoint is abandoned (marker kept, no manifest). A cancelled job
   (:class:`~.shard_writer.JobCancelled`: the trainer went away) reports nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Protocol

from ckptsvc.errors import SaveFailedError
from ckptsvc.format.manifest import FileRecord, Manifest
from ckptsvc.storage import Location

from .commit import (
    abandon_checkpoint,
    begin_checkpoint,
    commit_checkpoint,
    publish_file,
    start_claim_check,
    swap_in,
)
from .latest_pointer import advance_pointer, current_pointer, is_pointer_name
from .piece_stream import PieceInbox, write_streamed
from .protocol import (
    CommitInfo,
    ErrorInfo,
    FileJob,
    JobDone,
    JobFailed,
    PieceDone,
    SaveJob,
)
from .reuse import ReuseSource
from .shard_writer import JobCancelled, write_shard

__all__ = ["JobConnection", "JobState", "finish_checkpoint", "run_job", "stream_file"]

logger = logging.getLogger(__name__)


# ---- the steps of one job (module functions, so a distributed commit can reuse them) ---------


def stream_file(
    ckpt: Location,
    fj: FileJob,
    arena: memoryview,
    cancelled: threading.Event,
    *,
    chunk_nbytes: int,
) -> FileRecord:
    """Write one shard from its arena slice, ``chunk_nbytes`` per write; durable on
    return; aborted on any failure. The arena outlives the file (it is released after the
    job), so the sink may keep several chunks' writes in flight (``stable_source``)."""
    data = arena[fj.arena_offset : fj.arena_offset + fj.layout.data_nbytes]
    if data.nbytes != fj.layout.data_nbytes:
        raise SaveFailedError(
            f"{fj.rel_path}: the arena holds {data.nbytes} of the {fj.layout.data_nbytes} bytes "
            "the layout needs (arena smaller than the plan)"
        )
    step = chunk_nbytes

    def chunks() -> Iterator[memoryview]:
        for start in range(0, data.nbytes, step):
            if cancelled.is_set():
                raise JobCancelled(f"{ckpt.join(fj.rel_path).url}: save cancelled")
            yield data[start : start + step]

    try:
        return write_shard(
            ckpt.join(fj.rel_path), fj.layout, chunks(), rel_path=fj.rel_path, stable_source=True
        )
    finally:
        data.release()


def finish_checkpoint(
    ckpt: Location,
    info: CommitInfo,
    files: Sequence[FileRecord],
    *,
    durable: Callable[[Manifest], object] | None = None,
) -> Manifest:
    """Commit: every file in ``files`` and ``info.extra_files`` is durable; manifest last,
    then the folder's ``latest`` pointer (:mod:`ckptsvc.workers.latest_pointer`).

    The claim check and the pointer's read start first, on a side thread, and overlap
    building and encoding the manifest; the manifest's PUT is the one request the commit
    waits for. ``durable(manifest)`` runs as soon as the checkpoint is committed (its
    manifest published; for a replacement, swapped into place), before the marker's delete
    and the pointer's write, which are cleanup (design.md section 4)."""
    final = ckpt
    if info.replace_url:
        final = Location.parse(info.replace_url, ckpt.storage_options, settings=ckpt.settings)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptsvc-commit-side") as side:
        claim = start_claim_check(side, ckpt, info.claim_id)
        named = is_pointer_name(final.name)
        current = side.submit(current_pointer, final.parent) if named else None
        manifest = Manifest.new(
            checkpoint_path=info.replace_url or ckpt.url,
            world_size=info.world_size,
            step=info.step,
            files=(*info.extra_files, *files),
            components=info.components,
            pytorch_version=info.pytorch_version,
            user_metadata=info.user_metadata,
        )
        if info.replace_url:  # committed once in place: the swap comes before the outcome
            commit_checkpoint(ckpt, manifest, claim_id=info.claim_id, claim_check=claim)
            swap_in(ckpt, final)
            if durable is not None:
                durable(manifest)
            advance_pointer(final, manifest, current=current)
            return manifest

        def committed() -> None:
            if durable is not None:
                durable(manifest)
            if named:  # beside the marker's delete
                side.submit(advance_pointer, final, manifest, current=current)

        commit_checkpoint(
            ckpt, manifest, claim_id=info.claim_id, claim_check=claim, durable=committed
        )
    return manifest


def _claimed_commit(job: SaveJob) -> bool:
    """Whether ``job`` commits a directory claimed by this save (checked at the commit)."""
    return job.commit is not None and bool(job.commit.claim_id)


# ---- a job's state and its connection --------------------------------------------------------


class JobState:
    """One job in the writer. ``previous`` is the same trainer's job before it: a job
    commits only after that one finished, so manifests appear in save order."""

    def __init__(self, job: SaveJob, received: float, previous: JobState | None) -> None:
        self.job = job
        self.received = received
        self.previous = previous
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.reported = False  # its JobDone / JobFailed was sent
        self.thread: threading.Thread | None = None
        self.pieces = PieceInbox(job.job_id)  # a streamed job's PieceReady frames
        self.doing = "queued"  # what it does now, for the trainer's Pong


class JobConnection(Protocol):
    """What a job needs of its trainer's connection (``node_writer._Connection``)."""

    def send(self, message: object) -> None:
        """Report to the trainer (never raises: a gone trainer is logged)."""

    def arena(self, name: str) -> memoryview:
        """The named arena, mapped read-only."""

    def job_finished(self, state: JobState) -> None:
        """The job is over (reported or not); always called last."""


# ---- the job thread --------------------------------------------------------------------------


def _write_streamed(
    conn: JobConnection, state: JobState, ckpt: Location, ring: memoryview | None
) -> list[FileRecord]:
    """A job bigger than the trainer's memory budget: its pieces, through the ring."""
    job = state.job
    if job.stream is None or ring is None:
        raise SaveFailedError(f"{job.ckpt_url}: a streamed job needs a ring arena")
    return write_streamed(
        ckpt,
        job.files,
        spec=job.stream,
        ring=ring,
        inbox=state.pieces,
        cancelled=state.cancelled,
        ack=lambda seq: conn.send(PieceDone(job.job_id, seq)),
        chunk_nbytes=job.options.write_chunk_bytes,
    )


def run_job(conn: JobConnection, state: JobState) -> None:
    """The job thread of ``state``: write, commit if asked, report (see the module's call
    order); always ends with ``conn.job_finished(state)``."""
    job = state.job
    starts: list[float] = []
    futures: list[Future[FileRecord]] = []
    arena: memoryview | None = None
    reuse: ReuseSource | None = None
    reused: list[FileRecord] = []
    began: Location | None = None  # the directory whose marker this job wrote
    pool: ThreadPoolExecutor | None = None  # this job's shards, io_threads at a time

    def one(fj: FileJob) -> FileRecord:
        starts.append(time.monotonic())
        state.doing = f"writing {fj.rel_path}"
        if state.cancelled.is_set() or arena is None:
            raise JobCancelled(f"{job.ckpt_url}: save cancelled")
        if reuse is not None:  # incremental save: an unchanged shard is copied, not written
            record = reuse.try_reuse(fj, arena, state.cancelled)
            if record is not None:
                reused.append(record)
                return record
        return stream_file(
            ckpt, fj, arena, state.cancelled, chunk_nbytes=job.options.write_chunk_bytes
        )

    try:
        state.doing = "opening storage"
        ckpt = Location.parse(job.ckpt_url, job.storage_options, settings=job.options.io_settings())
        arena = conn.arena(job.arena_name) if job.arena_name else None
        if job.files and arena is None:
            raise SaveFailedError(f"{job.ckpt_url}: a job with shard files names no arena")
        state.doing = "starting the checkpoint"
        if job.files or job.small_files or job.stream or not _claimed_commit(job):
            begin_checkpoint(ckpt)
        # else a distributed save's commit: its directory exists (the claim's marker is in
        # it) and the claim check at the commit refuses a committed one: no HEAD here
        began = ckpt
        state.doing = "writing shards"
        reuse = ReuseSource.open(job, ckpt) if job.files and job.stream is None else None
        if job.files and not job.stream:
            pool = ThreadPoolExecutor(
                max_workers=job.options.io_threads,
                thread_name_prefix=f"ckptsvc-io-{job.job_id}",
            )
            futures = [pool.submit(one, fj) for fj in job.files]
        records = _write_streamed(conn, state, ckpt, arena) if job.stream else []
        state.doing = "publishing small files"
        records += [publish_file(ckpt, f.rel_path, f.data) for f in job.small_files]
        state.doing = "writing shards"
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            failed.result()  # raises the first shard's error
        records += [f.result() for f in futures]
        write_end = time.monotonic()
        previous = state.previous
        if previous is not None:
            state.doing = "waiting for the previous save to finish"
            previous.finished.wait()
        first = min(starts, default=state.received)
        nbytes_reused = sum(r.nbytes for r in reused)

        def report_done(_manifest: Manifest | None = None) -> None:
            """JobDone: for a commit job, as soon as the manifest is durable (the marker's
            delete and the pointer follow it)."""
            state.reported = True
            conn.send(
                JobDone(
                    job_id=job.job_id,
                    files=tuple(records),
                    queue_wait_s=first - state.received,
                    write_s=write_end - first,
                    commit_s=time.monotonic() - write_end,
                    committed=job.commit is not None,
                    nbytes_written=sum(r.nbytes for r in records) - nbytes_reused,
                    nbytes_reused=nbytes_reused,
                )
            )
            state.doing = "cleaning up after the commit"

        if job.commit is not None:
            state.doing = "committing (manifest)"
            if state.cancelled.is_set():
                raise JobCancelled(f"{job.ckpt_url}: save cancelled before commit")
            early = report_done if job.commit.report_when_durable else None
            finish_checkpoint(ckpt, job.commit, records, durable=early)
        if not state.reported:
            report_done()
    except BaseException as e:
        state.cancelled.set()  # stop sibling shards, then wait: nobody reads the arena after
        wait(futures)  # each shard aborted its own upload on the way out
        if state.reported:  # committed and reported: what failed was cleanup
            logger.warning("after the commit of %s: %s: %s", job.ckpt_url, type(e).__name__, e)
            return
        if began is not None:
            claim_id = job.commit.claim_id if job.commit is not None else ""
            abandon_checkpoint(began, f"{type(e).__name__}: {e}", claim_id=claim_id)
        if isinstance(e, JobCancelled):
            logger.info("%s", e)
        else:
            logger.warning("save to %s failed: %s: %s", job.ckpt_url, type(e).__name__, e)
            state.reported = True
            conn.send(JobFailed(job.job_id, ErrorInfo.from_exception(e)))
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if arena is not None:
            arena.release()
        conn.job_finished(state)
