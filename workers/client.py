"""The trainer's connection to its node writer: start-or-connect, submit, reports, death.

Call order (process / thread that runs each step):

1. ``WriterClient.connect_or_start`` (training thread): connect to the socket of this
   node *and identity* (``writer-<node>-<identity key>.sock``: installation, version and
   the job's storage environment, ``workers.identity``); if nobody answers, take the start
   lock (``flock`` on the socket directory), check again, remove a stale socket file and
   start the writer (``workers.launch``) as a fresh interpreter with this process's ``sys.path`` and
   environment (spawn semantics, never fork), in its own session so the trainer's signals
   and exit do not touch it; wait until it accepts. ``Hello`` -> ``Welcome``: a writer of
   another identity is not used (the next candidate name is tried); a writer that does
   not answer the handshake is retired (SIGKILL if it is this user's node writer, socket
   name removed) and a new one started.
2. ``submit`` (training thread): register the job's callback, then send the job; a failed
   or timed-out send raises ``WriterDiedError`` and leaves no callback behind (unless the
   reader already reported the death to it). Every send is bounded by
   ``CKPTSVC_WRITER_TIMEOUT_S``.
3. The reader thread (``ckptsvc-writer-client``) calls each job's callback with its
   ``JobDone`` / ``JobFailed``; on EOF or a broken frame it marks the client dead and calls
   every pending callback with a ``WriterDiedError`` (no save ever hangs on a dead writer).
   While jobs are in flight it pings the writer; when the writer made no progress for
   ``CKPTSVC_WRITER_TIMEOUT_S`` (no answer, or its progress counter stood still, with
   nothing the writer waited for from us) it declares the writer *wedged*: the socket is
   shut down and the pending callbacks get a ``WriterDiedError`` saying what the writer
   was doing; then ``retire`` kills it (SIGKILL, if it is this user's node writer) and
   frees its socket name, so the next save starts a new writer.
4. ``close`` (any thread): shut the socket; pending callbacks get ``WriterDiedError``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import TypeAlias

from ckptsvc import hooks, knobs
from ckptsvc.errors import ConfigError, WriterDiedError

from .frame_blobs import SentBlobs
from .identity import current_identity
from .launch import (
    peer_pid,
    private_dir,
    retire_writer,
    spawn_writer,
    start_lock,
    try_connect,
    wait_for_socket,
    writer_socket_path,
)
from .protocol import (
    PROTOCOL_VERSION,
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

__all__ = ["JobCallback", "JobOutcome", "WriterClient"]

logger = logging.getLogger(__name__)

JobOutcome: TypeAlias = "JobDone | JobFailed | WriterDiedError"
JobCallback: TypeAlias = Callable[["JobDone | JobFailed | WriterDiedError"], None]

_CANDIDATES = 4  # socket names tried while writers of another identity hold the earlier ones


class _OtherWriter(WriterDiedError):
    """The writer on the socket serves another installation, version or job."""


_clients: weakref.WeakSet[WriterClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child holds a copy of every connection's fd: close the copies (never
    ``shutdown``, which would cut the parent's connection), so the writer sees EOF when
    the parent dies and the child cannot talk on the parent's connection."""
    for client in list(_clients):
        client._alive = False
        client._pending = {}
        with contextlib.suppress(OSError):
            client._sock.close()


os.register_at_fork(after_in_child=_after_fork_in_child)


class WriterClient:
    """One trainer's connection to the node writer (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        welcome: Welcome,
        *,
        path: str,
        sock_ino: int | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.path = path
        self.writer_pid = welcome.writer_pid
        self.timeout_s = knobs.WRITER_TIMEOUT_S.get(timeout_s)
        self._sock = sock
        self._sock_ino = sock_ino
        sock.settimeout(self.timeout_s)  # bounds every send, and a frame once it began
        self._ping_every = max(0.05, min(5.0, self.timeout_s / 5))
        self._lock = threading.Lock()  # _pending, _progress, _urls, _alive, clocks
        self._send_lock = threading.Lock()  # one frame at a time on the socket
        self._blobs = SentBlobs()  # save jobs' byte strings the writer holds (protocol 7)
        self._pending: dict[int, JobCallback] = {}
        self._progress: dict[int, Callable[[PieceDone], None]] = {}
        self._urls: dict[int, str] = {}
        self._alive = True
        self._closing = False
        self._wedged: str | None = None
        now = time.monotonic()
        self._last_progress = now  # the writer's progress seen, or work handed to it
        self._last_heard = now  # any frame from the writer
        self._last_ping = 0.0
        self._ping_seq = 0
        self._writer_progress = -1
        self._activity = ""
        self._reader = threading.Thread(
            target=self._read_loop, name="ckptsvc-writer-client", daemon=True
        )
        self._reader.start()
        _clients.add(self)

    @classmethod
    def connect_or_start(
        cls,
        *,
        node: str,
        rank: int = 0,
        socket_path: str | None = None,
        start_timeout_s: float | None = None,
    ) -> WriterClient:
        identity = current_identity()
        explicit = bool(knobs.WRITER_SOCKET.get(socket_path))
        refused: list[str] = []
        for attempt in range(1 if explicit else _CANDIDATES):
            path = writer_socket_path(node, socket_path, key=identity.key, attempt=attempt)
            try:
                return cls._connect_or_start_at(
                    path,
                    node=node,
                    rank=rank,
                    identity=identity,
                    explicit=explicit,
                    start_timeout_s=start_timeout_s,
                )
            except _OtherWriter as e:
                if explicit:
                    raise ConfigError(
                        f"{e}; CKPTSVC_WRITER_SOCKET={path} is used by another job or "
                        "installation: give each job its own socket"
                    ) from e
                logger.warning("%s; trying another socket name", e)
                refused.append(str(e))
        raise WriterDiedError(
            f"no node writer of this job and installation could be reached: {'; '.join(refused)}"
        )

    @classmethod
    def _connect_or_start_at(
        cls,
        path: str,
        *,
        node: str,
        rank: int,
        identity: WriterIdentity,
        explicit: bool,
        start_timeout_s: float | None,
    ) -> WriterClient:
        if explicit:  # chosen by the user: their directory
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        else:
            private_dir(os.path.dirname(path))
        timeout_s = knobs.WRITER_START_TIMEOUT_S.get(start_timeout_s)
        last: BaseException | None = None
        for _attempt in range(3):
            found = try_connect(path)
            if found is None:
                with start_lock(path):
                    found = try_connect(path)
                    if found is None:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)  # stale: nobody listens on it
                        found = wait_for_socket(path, spawn_writer(path, node), timeout_s)
            sock, ino = found
            try:
                return cls._handshake(
                    sock,
                    path=path,
                    node=node,
                    rank=rank,
                    identity=identity,
                    timeout_s=timeout_s,
                    sock_ino=ino,
                )
            except TimeoutError as e:  # it accepts (the kernel does) but does not answer
                pid = peer_pid(sock)
                sock.close()
                last = e
                with start_lock(path):
                    retire_writer(
                        path, ino, pid, f"no answer to the handshake within {timeout_s} s"
                    )
            except _OtherWriter:
                sock.close()
                raise
            except (OSError, WriterDiedError) as e:  # a writer that was just exiting (linger)
                sock.close()
                last = e
        raise WriterDiedError(f"cannot reach a node writer on {path}: {last}") from last

    @classmethod
    def _handshake(
        cls,
        sock: socket.socket,
        *,
        path: str,
        node: str,
        rank: int,
        identity: WriterIdentity,
        timeout_s: float,
        sock_ino: int | None = None,
    ) -> WriterClient:
        sock.settimeout(timeout_s)
        send_message(sock, Hello(pid=os.getpid(), rank=rank, node_id=node, identity=identity))
        reply = recv_message(sock)
        if isinstance(reply, Welcome) and reply.version != PROTOCOL_VERSION:
            raise _OtherWriter(
                f"the node writer on {path} (pid {reply.writer_pid}) speaks protocol "
                f"{reply.version} but this ckptsvc needs {PROTOCOL_VERSION} (another ckptsvc "
                "started it)"
            )
        if isinstance(reply, Welcome) and reply.identity != identity:
            theirs = reply.identity.describe() if reply.identity else "unknown"
            raise _OtherWriter(
                f"the node writer on {path} (pid {reply.writer_pid}) serves {theirs}, "
                f"not this process's {identity.describe()}"
            )
        if not isinstance(reply, Welcome):
            raise WriterDiedError(
                f"the node writer on {path} closed the connection during the handshake"
            )
        return cls(sock, reply, path=path, sock_ino=sock_ino)

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def wedged(self) -> str | None:
        """Why the writer was declared wedged (no progress within the timeout), or None."""
        return self._wedged

    def retire(self) -> None:
        """After the writer was declared wedged: kill it (if it still is this user's node
        writer) and remove its socket name (if still its), so the next save starts a new
        one. Its arenas are the trainer's to discard, never to reuse."""
        with contextlib.suppress(OSError), start_lock(self.path):
            retire_writer(self.path, self._sock_ino, self.writer_pid, self._wedged or "retired")

    def submit(self, job: SaveJob, callback: JobCallback) -> None:
        """Send ``job``; ``callback`` runs once, on the reader thread, with the outcome."""
        with self._send_lock:
            with self._lock:
                if not self._alive:
                    raise WriterDiedError(
                        self._wedged or f"the node writer (pid {self.writer_pid}) is gone"
                    )
                if not self._pending:  # the writer owed us nothing: its clock starts now
                    self._last_progress = time.monotonic()
                self._pending[job.job_id] = callback
                self._urls[job.job_id] = job.ckpt_url
            try:
                send_message(self._sock, job, blobs=self._blobs)
            except OSError as e:
                if isinstance(e, TimeoutError):
                    self._declare_wedged(
                        f"the node writer (pid {self.writer_pid}) did not take a save job within "
                        f"{self.timeout_s:g} s (raise CKPTSVC_WRITER_TIMEOUT_S if it is only busy)"
                    )
                with self._lock:
                    reported = self._pending.pop(job.job_id, None) is None
                    self._urls.pop(job.job_id, None)
                    self._alive = False
                if reported:  # the reader already gave the callback its WriterDiedError
                    return
                raise WriterDiedError(
                    self._wedged or f"the node writer (pid {self.writer_pid}) is gone: {e}"
                ) from e
        hooks.point("job.submitted", url=job.ckpt_url)

    def watch_pieces(self, job_id: int, callback: Callable[[PieceDone], None]) -> None:
        """Call ``callback`` (reader thread) with each ``PieceDone`` of a streamed job, until
        its outcome arrives."""
        with self._lock:
            if job_id in self._pending:
                self._progress[job_id] = callback

    def send(self, message: object) -> None:
        """Send a frame about a job already submitted (``PieceReady``, ``CancelJob``);
        ``WriterDiedError`` if the writer is gone."""
        with self._send_lock:
            with self._lock:
                if not self._alive:
                    raise WriterDiedError(
                        self._wedged or f"the node writer (pid {self.writer_pid}) is gone"
                    )
                if isinstance(message, PieceReady):  # the writer waited for us until now
                    self._last_progress = time.monotonic()
            try:
                send_message(self._sock, message)
            except OSError as e:
                if isinstance(e, TimeoutError):
                    self._declare_wedged(
                        f"the node writer (pid {self.writer_pid}) did not take a frame within "
                        f"{self.timeout_s:g} s (raise CKPTSVC_WRITER_TIMEOUT_S if it is only busy)"
                    )
                raise WriterDiedError(
                    self._wedged or f"the node writer (pid {self.writer_pid}) is gone: {e}"
                ) from e

    def release_arena(self, name: str) -> None:
        """Tell the writer to unmap an arena the trainer unlinked (best effort)."""
        with self._send_lock:
            if not self._alive:
                return
            with contextlib.suppress(OSError):
                send_message(self._sock, ReleaseArena(name))

    def close(self) -> None:
        with self._lock:
            if self._alive:
                self._closing = True
        _clients.discard(self)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=10.0)
        with contextlib.suppress(OSError):
            self._sock.close()

    # ---- liveness (reader thread, and senders that time out) ----

    def _declare_wedged(self, text: str) -> None:
        """Fail this connection: the reader reports ``text`` to every pending callback."""
        with self._lock:
            if self._wedged is None and not self._closing:
                self._wedged = text
            self._alive = False
        logger.error("%s", text)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # the reader sees EOF and fails the jobs

    def _watch(self) -> None:
        """Reader thread, between frames: ping the writer while jobs are in flight; declare
        it wedged when it made no progress for ``timeout_s``."""
        now = time.monotonic()
        with self._lock:
            if not self._pending or not self._alive:
                return
            silent = now - self._last_progress
            urls = sorted(set(self._urls.values()))
            ping = now - self._last_ping >= self._ping_every
            if ping:
                self._last_ping = now
                self._ping_seq += 1
        if silent > self.timeout_s:
            self._declare_wedged(self._wedge_text(silent, urls, now))
            return
        if ping and self._send_lock.acquire(blocking=False):  # a send in progress is contact too
            try:
                send_message(self._sock, Ping(self._ping_seq))
            except TimeoutError:
                self._declare_wedged(
                    f"the node writer (pid {self.writer_pid}) did not take a ping within "
                    f"{self.timeout_s:g} s (raise CKPTSVC_WRITER_TIMEOUT_S if it is only busy)"
                )
            except OSError:
                pass  # the reader sees the broken connection
            finally:
                self._send_lock.release()

    def _wedge_text(self, silent: float, urls: list[str], now: float) -> str:
        answering = now - self._last_heard <= max(3 * self._ping_every, 1.0)
        if answering:
            how = "answers pings but handed nothing to storage"
            hint = "a storage call hangs (NFS, a stalled upload?)"
        else:
            how = "stopped answering"
            hint = "stopped (SIGSTOP), frozen or swapped out?"
        doing = self._activity or f"saves to {', '.join(urls)} were in flight"
        return (
            f"the node writer (pid {self.writer_pid}) {how} for {silent:.0f} s ({hint}); it was "
            f"{doing}. Its saves failed and the next save starts a new writer; if the storage "
            f"is only that slow, raise CKPTSVC_WRITER_TIMEOUT_S (now {self.timeout_s:g} s)"
        )

    def _read_loop(self) -> None:
        reason = "closed the connection"
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        try:
            while True:
                if not poller.poll(self._ping_every * 1000):
                    self._watch()
                    continue
                msg = recv_message(self._sock)
                if msg is None:
                    break
                now = time.monotonic()
                with self._lock:
                    self._last_heard = now
                    if isinstance(msg, (JobDone, JobFailed, PieceDone)):
                        self._last_progress = now
                    elif isinstance(msg, Pong):
                        self._activity = msg.activity
                        if msg.progress != self._writer_progress:
                            self._writer_progress = msg.progress
                            self._last_progress = now
                if isinstance(msg, (JobDone, JobFailed)):
                    with self._lock:
                        callback = self._pending.pop(msg.job_id, None)
                        self._progress.pop(msg.job_id, None)
                        self._urls.pop(msg.job_id, None)
                    if callback is not None:
                        self._call(callback, msg)
                elif isinstance(msg, PieceDone):
                    with self._lock:
                        progress = self._progress.get(msg.job_id)
                    if progress is not None:
                        try:
                            progress(msg)
                        except Exception:  # must not kill the reader thread
                            logger.exception("piece progress callback failed")
                elif not isinstance(msg, Pong):
                    logger.warning(
                        "ignoring unexpected %s from the node writer", type(msg).__name__
                    )
        except (OSError, ProtocolError, ValueError) as e:
            reason = f"broke the connection ({e})"
        with self._lock:
            self._alive = False
            pending, self._pending = self._pending, {}
            self._progress = {}
            self._urls = {}
            closing = self._closing
            wedged = self._wedged
        if wedged is not None:
            text = wedged
        elif closing:
            text = f"the checkpointer was closed while a save to the node writer (pid {self.writer_pid}) was in flight"
        else:
            text = f"the node writer (pid {self.writer_pid}) {reason} while saves were in flight"
            if pending:
                logger.error("%s; %d save(s) failed", text, len(pending))
        for callback in pending.values():
            self._call(callback, WriterDiedError(text))
        if wedged is not None:
            self.retire()  # now, so that no other trainer of the job waits for it either

    @staticmethod
    def _call(callback: JobCallback, outcome: JobDone | JobFailed | WriterDiedError) -> None:
        try:
            callback(outcome)
        except Exception:  # a buggy callback must not kill the reader thread
            logger.exception("save completion callback failed")
