"""The node writer: one process per node that streams staged saves to storage.

Started by ``workers.launch`` (for ``workers.client``) as a fresh interpreter (the spawn method's semantics: no
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
4. ``job_runner.run_job`` (one job thread per job, ``workers.job_runner``): map the arena,
   ``begin_checkpoint``, every shard on the job's I/O pool (or piece by piece for a
   streamed job), the small files, the manifest last when the job asks, then ``JobDone``
   / ``JobFailed``; a job commits only after the same trainer's previous job finished.

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
from collections.abc import Sequence

from ckptsvc import knobs
from ckptsvc.liveness import pid_alive
from ckptsvc.workers.shm import ShmSegment, reclaim_stale_segments

from .frame_blobs import ReceivedBlobs
from .identity import current_identity
from .job_runner import JobState, run_job
from .launch import writer_log_path
from .protocol import (
    PROTOCOL_VERSION,
    CancelJob,
    Hello,
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
from .shard_writer import PROGRESS

__all__ = ["NodeWriter", "lower_priority", "main"]

logger = logging.getLogger(__name__)

_TICK_S = 0.5
_SWEEP_EVERY_S = 30.0
_DEATH_GRACE_S = 3.0


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


# ---- connections -----------------------------------------------------------------------------


class _Connection:
    """One trainer: its socket, its mapped arenas, its jobs."""

    def __init__(self, writer: NodeWriter, sock: socket.socket) -> None:
        self.writer = writer
        self.sock = sock
        self.send_lock = threading.Lock()
        self.hello: Hello | None = None
        self.arenas: dict[str, ShmSegment] = {}
        self.jobs: dict[int, JobState] = {}
        self.last_job: JobState | None = None
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
            blobs = ReceivedBlobs()  # what this trainer's save jobs name (protocol 7)
            while True:
                msg = recv_message(self.sock, blobs=blobs)
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
            state = JobState(job, time.monotonic(), self.last_job)
            self.jobs[job.job_id] = self.last_job = state
        state.thread = threading.Thread(
            target=run_job,
            args=(self, state),
            name=f"ckptsvc-job-{job.job_id}",
            daemon=True,
        )
        self.writer.job_started()
        state.thread.start()

    def job_finished(self, state: JobState) -> None:
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
