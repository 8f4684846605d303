"""The node writer: one process per node that streams staged saves to storage.

Started by ``workers.client`` as a fresh interpreter (the spawn method's semantics: no
forked state, so s3fs/gcsfs event loops are only ever created here, after start) and
reached by every local trainer over a Unix socket. It imports no torch.

Call order (process / thread that runs each step):

1. ``main`` (main thread): lower CPU and I/O priority, import ``CKPTSVC_WRITER_PRELOAD``
   modules, reclaim arenas of dead trainers, bind the socket, then ``NodeWriter.serve``.
2. ``serve`` (main thread): accept connections; every ~``_TICK_S`` check idleness (exit
   after ``linger_s`` with no connection and no job) and reclaim dead trainers' arenas.
3. ``_Connection.run`` (one thread per trainer): ``Hello``/``Welcome`` (a trainer whose
   ``WriterIdentity`` differs from the writer's - another installation, version or job
   environment - is refused: the writer's environment holds its job's credentials), then
   read ``SaveJob`` / ``ReleaseArena`` frames and answer ``Ping`` with ``Pong`` (progress
   counter, what the trainer's oldest job is doing); each job gets a job thread (``PieceReady`` /
   ``CancelJob`` frames go to their streamed job's inbox). On EOF it cancels the
   trainer's jobs, waits for them, unmaps its arenas and reclaims them if the trainer died.
4. ``_run_job`` (job thread): ``begin_checkpoint``; every shard to the I/O pool
   (``options.io_threads`` threads of the job's own, ``stream_file``: header, then zero-copy slices of the arena,
   CRC-32C while streaming, durable on return; a shard whose bytes equal the job's base
   checkpoint's copy is linked / copied server-side instead, ``workers.reuse``); the
   small files; then, when the job asks,
   ``finish_checkpoint`` writes the manifest last; finally ``JobDone`` / ``JobFailed``.
   A streamed job (``SaveJob.stream``: the trainer's state exceeds its memory budget)
   writes its shards one after the other from the pieces instead (``workers.piece_stream``).

Settings. Everything that shapes one job's writes (fsync, I/O threads, write chunk, part
size and uploads in flight, retries, direct I/O) comes with the job
(``SaveJob.options``, a :class:`~.protocol.WriterOptions` the trainer resolved) and is
applied to that job alone: its ``Location`` carries them to storage
(:class:`~ckptsvc.storage.IOSettings`) and its shards get a pool of its ``io_threads``.
The writer reads no per-job setting from its environment, since one writer serves jobs
of several trainers. Only settings of the writer process itself come from the
environment it was started with: ``CKPTSVC_WRITER_NICE``, ``CKPTSVC_WRITER_LINGER_S``,
``CKPTSVC_WRITER_LOG_LEVEL``, ``CKPTSVC_WRITER_PRELOAD``, ``CKPTSVC_SHM_DIR`` (where
arenas live) and the socket and node id it is given on its command line; and the
filesystems' own environment (credentials, endpoints), which is why a writer serves only
trainers of its identity (``workers.identity``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import logging
import os
import platform
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

from ckptsvc import knobs
from ckptsvc.errors import CheckpointError, SaveFailedError
from ckptsvc.format.manifest import FileRecord, Manifest
from ckptsvc.liveness import pid_alive
from ckptsvc.storage import Location
from ckptsvc.workers.shm import ShmSegment, reclaim_stale_segments

from .client import writer_log_path
from .commit import (
    abandon_checkpoint,
    begin_checkpoint,
    commit_checkpoint,
    publish_file,
    swap_in,
)
from .identity import current_identity
from .piece_stream import PieceInbox, write_streamed
from .protocol import (
    PROTOCOL_VERSION,
    CancelJob,
    CommitInfo,
    ErrorInfo,
    FileJob,
    Hello,
    JobDone,
    JobFailed,
    PieceDone,
    PieceReady,
    Ping,
    Pong,
    ProtocolError,
    ReleaseArena,
    SaveJob,
    Welcome,
    WriterIdentity,
    recv_message,
    send_message,
)
from .reuse import ReuseSource
from .shard_writer import PROGRESS, write_shard

__all__ = [
    "JobCancelled",
    "NodeWriter",
    "finish_checkpoint",
    "lower_priority",
    "main",
    "stream_file",
]

logger = logging.getLogger(__name__)

_TICK_S = 0.5
_SWEEP_EVERY_S = 30.0
_DEATH_GRACE_S = 3.0


class JobCancelled(CheckpointError):
    """The trainer that sent the job went away; the job stops without a manifest."""


# ---- the steps of one job (module functions, so a distributed commit can reuse them) ------


def stream_file(
    ckpt: Location,
    fj: FileJob,
    arena: memoryview,
    cancelled: threading.Event,
    *,
    chunk_nbytes: int,
) -> FileRecord:
    """Write one shard from its arena slice, ``chunk_nbytes`` per write; durable on
    return; aborted on any failure."""
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
        return write_shard(ckpt.join(fj.rel_path), fj.layout, chunks(), rel_path=fj.rel_path)
    finally:
        data.release()


def finish_checkpoint(ckpt: Location, info: CommitInfo, files: Sequence[FileRecord]) -> Manifest:
    """Commit: every file in ``files`` and ``info.extra_files`` is durable; manifest last."""
    manifest = Manifest.new(
        checkpoint_path=info.replace_url or ckpt.url,
        world_size=info.world_size,
        step=info.step,
        files=(*info.extra_files, *files),
        components=info.components,
        pytorch_version=info.pytorch_version,
        user_metadata=info.user_metadata,
    )
    commit_checkpoint(ckpt, manifest, claim_id=info.claim_id)
    if info.replace_url:
        swap_in(
            ckpt, Location.parse(info.replace_url, ckpt.storage_options, settings=ckpt.settings)
        )
    return manifest


# ---- process setup ---------------------------------------------------------------------------

_IOPRIO_SYSCALL = {"x86_64": 251, "aarch64": 30, "ppc64le": 273, "s390x": 282}
_IOPRIO_CLASS_BE, _IOPRIO_CLASS_SHIFT, _IOPRIO_WHO_PROCESS = 2, 13, 1


def lower_priority(*, nice: int | None = None) -> None:
    """nice(+N) and best-effort I/O class, lowest level (best effort: never fails)."""
    try:
        os.nice(knobs.WRITER_NICE.get(nice))
    except OSError as e:
        logger.debug("nice failed: %s", e)
    number = _IOPRIO_SYSCALL.get(platform.machine())
    if number is None:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prio = (_IOPRIO_CLASS_BE << _IOPRIO_CLASS_SHIFT) | 7
        if libc.syscall(number, _IOPRIO_WHO_PROCESS, 0, prio) != 0:
            logger.debug("ioprio_set failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        logger.debug("ioprio_set unavailable: %s", e)


# ---- connections and jobs --------------------------------------------------------------------


class _Job:
    """One job in the writer. ``previous`` is the same trainer's job before it: a job
    commits only after that one finished, so manifests appear in save order."""

    def __init__(self, job: SaveJob, received: float, previous: _Job | None) -> None:
        self.job = job
        self.received = received
        self.previous = previous
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.reported = False  # its JobDone / JobFailed was sent
        self.thread: threading.Thread | None = None
        self.pieces = PieceInbox(job.job_id)  # a streamed job's PieceReady frames
        self.doing = "queued"  # what it does now, for the trainer's Pong


class _Connection:
    """One trainer: its socket, its mapped arenas, its jobs."""

    def __init__(self, writer: NodeWriter, sock: socket.socket) -> None:
        self.writer = writer
        self.sock = sock
        self.send_lock = threading.Lock()
        self.hello: Hello | None = None
        self.arenas: dict[str, ShmSegment] = {}
        self.jobs: dict[int, _Job] = {}
        self.last_job: _Job | None = None
        self.lock = threading.Lock()

    def send(self, message: object) -> None:
        try:
            with self.send_lock:
                send_message(self.sock, message)
        except OSError as e:  # the trainer is gone; its jobs are being cancelled
            logger.debug("cannot report to trainer: %s", e)

    def arena(self, name: str) -> memoryview:
        with self.lock:
            seg = self.arenas.get(name)
            if seg is None:
                seg = self.arenas[name] = ShmSegment.attach(name)
            return memoryview(seg.buffer)

    def run(self) -> None:
        try:
            hello = recv_message(self.sock)
            if not isinstance(hello, Hello):
                logger.warning("rejecting a client that sent %r", type(hello).__name__)
                return
            mine = self.writer.identity
            # carries our version and identity: the client checks them too
            self.send(Welcome(writer_pid=os.getpid(), identity=mine))
            if hello.version != PROTOCOL_VERSION:
                logger.warning(
                    "rejecting pid %d: protocol %d, not %d",
                    hello.pid,
                    hello.version,
                    PROTOCOL_VERSION,
                )
                return
            if hello.identity != mine:
                theirs = hello.identity.describe() if hello.identity else "no identity"
                logger.warning(
                    "rejecting pid %d: it is %s, this writer serves %s",
                    hello.pid,
                    theirs,
                    mine.describe(),
                )
                return
            self.hello = hello
            logger.info("trainer pid %d rank %d connected", hello.pid, hello.rank)
            while True:
                msg = recv_message(self.sock)
                if msg is None:
                    break
                if isinstance(msg, SaveJob):
                    self.start_job(msg)
                elif isinstance(msg, Ping):
                    self.send(Pong(msg.seq, PROGRESS.value, self.activity()))
                elif isinstance(msg, ReleaseArena):
                    with self.lock:
                        seg = self.arenas.pop(msg.name, None)
                    if seg is not None:
                        seg.close()
                elif isinstance(msg, (PieceReady, CancelJob)):
                    with self.lock:
                        target = self.jobs.get(msg.job_id)
                    if target is not None:
                        target.pieces.put(msg)  # else: the job is over (failed); drop it
                else:
                    logger.warning(
                        "ignoring unexpected %s from pid %d", type(msg).__name__, hello.pid
                    )
        except (OSError, ProtocolError) as e:
            logger.warning("connection to trainer lost: %s", e)
        finally:
            self.shutdown()

    def activity(self) -> str:
        """What this trainer's oldest job in the writer is doing ("" without one)."""
        with self.lock:
            jobs = sorted(self.jobs.values(), key=lambda j: j.received)
        if not jobs:
            return ""
        oldest = jobs[0]
        more = f" (and {len(jobs) - 1} more job(s))" if len(jobs) > 1 else ""
        return f"{oldest.doing} for {oldest.job.ckpt_url}{more}"

    def start_job(self, job: SaveJob) -> None:
        with self.lock:
            state = _Job(job, time.monotonic(), self.last_job)
            self.jobs[job.job_id] = self.last_job = state
        state.thread = threading.Thread(
            target=self.writer.run_job,
            args=(self, state),
            name=f"ckptsvc-job-{job.job_id}",
            daemon=True,
        )
        self.writer.job_started()
        state.thread.start()

    def job_finished(self, state: _Job) -> None:
        PROGRESS.tick()
        state.finished.set()
        with self.lock:
            self.jobs.pop(state.job.job_id, None)
            state.previous = None  # do not chain every finished job in memory
        self.writer.job_ended()

    def shutdown(self) -> None:
        """The trainer closed or died: cancel its jobs, unmap, reclaim if it is dead."""
        with self.lock:
            jobs = list(self.jobs.values())
        for state in jobs:
            state.cancelled.set()
        for state in jobs:
            if state.thread is not None:
                state.thread.join()
        with self.lock:
            arenas, self.arenas = list(self.arenas.values()), {}
        for seg in arenas:
            seg.close()
        with contextlib.suppress(OSError):
            self.sock.close()
        unreported = [state for state in jobs if not state.reported]
        if unreported:
            logger.warning(
                "trainer disconnected with %d save(s) in flight; cancelled them", len(unreported)
            )
        pid = self.hello.pid if self.hello is not None else None
        deadline = time.monotonic() + _DEATH_GRACE_S
        while pid is not None and pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)  # a killed process closes its sockets just before it dies
        if pid is not None and not pid_alive(pid):
            reclaim_stale_segments(self.writer.node)
        self.writer.disconnected(self)


class NodeWriter:
    """The writer's state: listening socket, connections, jobs in flight."""

    def __init__(
        self,
        *,
        socket_path: str,
        node: str,
        linger_s: float | None = None,
        identity: WriterIdentity | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.node = node
        self.identity = identity if identity is not None else current_identity()
        self.linger_s = knobs.WRITER_LINGER_S.get(linger_s)
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._jobs = 0
        self._idle_since = time.monotonic()

    # bookkeeping for the idle exit
    def job_started(self) -> None:
        with self._lock:
            self._jobs += 1

    def job_ended(self) -> None:
        with self._lock:
            self._jobs -= 1
            self._idle_since = time.monotonic()

    def cancel_all(self) -> None:
        """Stop every job at its next chunk (no manifest); used when the writer is told to stop."""
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with conn.lock:
                jobs = list(conn.jobs.values())
            for state in jobs:
                state.cancelled.set()
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # trainers see EOF: their saves fail now

    def disconnected(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
            self._idle_since = time.monotonic()

    def _idle_for(self) -> float:
        with self._lock:
            if self._connections or self._jobs:
                return 0.0
            return time.monotonic() - self._idle_since

    def serve(self, listener: socket.socket) -> None:
        listener.settimeout(_TICK_S)
        last_sweep = time.monotonic()
        while True:
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                if self._idle_for() >= self.linger_s:
                    logger.info("idle for %.1f s; exiting", self.linger_s)
                    return
                if time.monotonic() - last_sweep > _SWEEP_EVERY_S:
                    last_sweep = time.monotonic()
                    reclaim_stale_segments(self.node)
                continue
            sock.settimeout(None)
            conn = _Connection(self, sock)
            with self._lock:
                self._connections.add(conn)
            threading.Thread(target=conn.run, name="ckptsvc-conn", daemon=True).start()

    def _write_streamed(
        self, conn: _Connection, state: _Job, ckpt: Location, ring: memoryview | None
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

    def run_job(self, conn: _Connection, state: _Job) -> None:
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
            ckpt = Location.parse(
                job.ckpt_url, job.storage_options, settings=job.options.io_settings()
            )
            arena = conn.arena(job.arena_name) if job.arena_name else None
            if job.files and arena is None:
                raise SaveFailedError(f"{job.ckpt_url}: a job with shard files names no arena")
            state.doing = "starting the checkpoint"
            begin_checkpoint(ckpt)
            began = ckpt
            state.doing = "writing shards"
            reuse = ReuseSource.open(job, ckpt) if job.files and job.stream is None else None
            if job.files and not job.stream:
                pool = ThreadPoolExecutor(
                    max_workers=job.options.io_threads,
                    thread_name_prefix=f"ckptsvc-io-{job.job_id}",
                )
                futures = [pool.submit(one, fj) for fj in job.files]
            records = self._write_streamed(conn, state, ckpt, arena) if job.stream else []
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
            if job.commit is not None:
                state.doing = "committing (manifest)"
                if state.cancelled.is_set():
                    raise JobCancelled(f"{job.ckpt_url}: save cancelled before commit")
                finish_checkpoint(ckpt, job.commit, records)
            first = min(starts, default=state.received)
            nbytes_reused = sum(r.nbytes for r in reused)
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
        except BaseException as e:
            state.cancelled.set()  # stop sibling shards, then wait: nobody reads the arena after
            wait(futures)  # each shard aborted its own upload on the way out
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


# ---- entry point -----------------------------------------------------------------------------


def _bind(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # the starter removed a stale file under its lock
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener


class _Terminated(BaseException):
    pass


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _drop_empty_log(socket_path: str) -> None:
    """Remove this writer's log if nothing was written to it (a writer per plain process
    would leave one each). Called while the socket still names this writer, so no
    successor writes to that file yet."""
    log = writer_log_path(socket_path)
    with contextlib.suppress(OSError):
        if os.path.getsize(log) == 0:
            os.unlink(log)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ckptsvc-node-writer")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--linger-s", type=float, default=None)
    args = parser.parse_args(argv)
    identity = current_identity()  # before any preload can change the environment
    logging.basicConfig(
        stream=sys.stderr,
        level=knobs.WRITER_LOG_LEVEL.get().upper(),
        format="ckptsvc-writer[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    lower_priority()
    for name in filter(None, (m.strip() for m in knobs.WRITER_PRELOAD.get().split(","))):
        importlib.import_module(name)
    reclaim_stale_segments(args.node_id)
    listener = _bind(args.socket)
    ino = os.stat(args.socket).st_ino
    writer = NodeWriter(
        socket_path=args.socket, node=args.node_id, linger_s=args.linger_s, identity=identity
    )
    signal.signal(signal.SIGTERM, _terminate)
    try:
        writer.serve(listener)
    except _Terminated:
        logger.warning("SIGTERM: cancelling in-flight saves and exiting")
        writer.cancel_all()
    finally:
        reclaim_stale_segments(args.node_id)
        with contextlib.suppress(OSError):
            if os.stat(args.socket).st_ino == ino:
                _drop_empty_log(args.socket)
                os.unlink(args.socket)
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
