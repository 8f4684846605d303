"""The trainer's connection to its node writer: start-or-connect, submit, reports, death.

Call order (process / thread that runs each step):

1. ``WriterClient.connect_or_start`` (training thread): connect to the node's socket; if
   nobody answers, take the start lock (``flock`` on the socket directory), check again, remove a stale
   socket file and start the writer as a fresh interpreter with this process's
   ``sys.path`` (spawn semantics, never fork), in its own session so the trainer's
   signals and exit do not touch it; wait until it accepts. ``Hello`` -> ``Welcome``.
2. ``submit`` (training thread): register the job's callback and send the job, atomically
   under one lock; a failed send raises ``WriterDiedError`` and leaves no callback behind.
3. The reader thread (``ckptsvc-writer-client``) calls each job's callback with its
   ``JobDone`` / ``JobFailed``; on EOF or a broken frame it marks the client dead and calls
   every pending callback with a ``WriterDiedError`` (no save ever hangs on a dead writer).
4. ``close`` (any thread): shut the socket; pending callbacks get ``WriterDiedError``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TypeAlias

from ckptsvc import knobs
from ckptsvc.errors import CheckpointError, WriterDiedError

from .protocol import (
    PROTOCOL_VERSION,
    Hello,
    JobDone,
    JobFailed,
    PieceDone,
    ProtocolError,
    ReleaseArena,
    SaveJob,
    Welcome,
    recv_message,
    send_message,
)

__all__ = ["JobCallback", "JobOutcome", "WriterClient", "writer_socket_path"]

logger = logging.getLogger(__name__)

JobOutcome: TypeAlias = "JobDone | JobFailed | WriterDiedError"
JobCallback: TypeAlias = Callable[["JobDone | JobFailed | WriterDiedError"], None]

_SUN_PATH_MAX = 107
_spawned: list[subprocess.Popen[bytes]] = []  # keeps Popen objects (and their reaping) alive


def writer_socket_path(node: str, explicit: str | None = None) -> str:
    """``CKPTSVC_WRITER_SOCKET`` or ``<tmp>/ckptsvc-<uid>/writer-<node>.sock``."""
    path = knobs.WRITER_SOCKET.get(explicit)
    if path:
        return path
    directory = os.path.join(tempfile.gettempdir(), f"ckptsvc-{os.getuid()}")
    path = os.path.join(directory, f"writer-{node}.sock")
    if len(path.encode()) > _SUN_PATH_MAX:
        digest = hashlib.sha256(node.encode()).hexdigest()[:16]
        path = os.path.join(f"/tmp/ckptsvc-{os.getuid()}", f"w-{digest}.sock")
    return path


def _try_connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError:
        sock.close()
        raise
    return sock


def _private_dir(directory: str) -> None:
    """Create the socket directory 0700, or check that an existing one is ours and private."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise CheckpointError(
            f"{directory} (the node writer's socket directory) must be owned by uid "
            f"{os.getuid()} with mode 0700; remove it or set CKPTSVC_WRITER_SOCKET elsewhere"
        )


@contextlib.contextmanager
def _start_lock(path: str) -> Iterator[None]:
    """``flock`` on the socket's directory: no lock file to leave behind or race on."""
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def writer_log_path(socket_path: str) -> str:
    """Where the node writer started for ``socket_path`` writes its output."""
    return f"{socket_path}.log"


_LOG_ROTATE_BYTES = 16 << 20


def _rotate_log(log_path: str) -> None:
    """Keep one previous writer log (``.log.1``) once the log passed ``_LOG_ROTATE_BYTES``.
    Called under the start lock with no writer running, so nobody appends to it."""
    with contextlib.suppress(OSError):
        if os.stat(log_path).st_size > _LOG_ROTATE_BYTES:
            os.replace(log_path, f"{log_path}.1")


def _spawn_writer(path: str, node: str) -> subprocess.Popen[bytes]:
    for old in list(_spawned):  # reap writers that exited since
        if old.poll() is not None:
            _spawned.remove(old)
    bootstrap = (
        "import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
        "from ckptsvc.workers.node_writer import main; sys.exit(main(sys.argv[2:]))"
    )
    paths = [p for p in sys.path if p]
    cmd = [sys.executable, "-c", bootstrap, json.dumps(paths), "--socket", path, "--node-id", node]
    # The writer outlives this trainer: it must not hold the trainer's stdout/stderr pipes
    # open (a `python train.py | tee log` would hang until the writer exits), so its
    # output goes to a log file beside the socket.
    _rotate_log(writer_log_path(path))
    with open(writer_log_path(path), "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    _spawned.append(proc)
    logger.info("started node writer pid %d on %s", proc.pid, path)
    return proc


def _wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout_s: float) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        sock = _try_connect(path)
        if sock is not None:
            return sock
        code = proc.poll()
        if code is not None:
            raise WriterDiedError(
                f"the node writer (pid {proc.pid}) exited with code {code} while starting on "
                f"{path}; see its log {writer_log_path(path)}"
            )
        if time.monotonic() > deadline:
            raise WriterDiedError(
                f"the node writer (pid {proc.pid}) did not listen on {path} within {timeout_s} s "
                "(raise CKPTSVC_WRITER_START_TIMEOUT_S on a slow machine)"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


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

    def __init__(self, sock: socket.socket, welcome: Welcome, *, path: str) -> None:
        self.path = path
        self.writer_pid = welcome.writer_pid
        self._sock = sock
        self._lock = threading.Lock()
        self._pending: dict[int, JobCallback] = {}
        self._progress: dict[int, Callable[[PieceDone], None]] = {}
        self._alive = True
        self._closing = False
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
        path = writer_socket_path(node, socket_path)
        if knobs.WRITER_SOCKET.get(socket_path):  # chosen by the user: their directory
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        else:
            _private_dir(os.path.dirname(path))
        timeout_s = knobs.WRITER_START_TIMEOUT_S.get(start_timeout_s)
        last: BaseException | None = None
        for _attempt in range(3):
            sock = _try_connect(path)
            if sock is None:
                with _start_lock(path):
                    sock = _try_connect(path)
                    if sock is None:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)  # stale: nobody listens on it
                        sock = _wait_for_socket(path, _spawn_writer(path, node), timeout_s)
            try:
                return cls._handshake(sock, path=path, node=node, rank=rank, timeout_s=timeout_s)
            except (OSError, WriterDiedError) as e:  # a writer that was just exiting (linger)
                sock.close()
                last = e
        raise WriterDiedError(f"cannot reach a node writer on {path}: {last}") from last

    @classmethod
    def _handshake(
        cls, sock: socket.socket, *, path: str, node: str, rank: int, timeout_s: float
    ) -> WriterClient:
        sock.settimeout(timeout_s)
        send_message(sock, Hello(pid=os.getpid(), rank=rank, node_id=node))
        reply = recv_message(sock)
        if isinstance(reply, Welcome) and reply.version != PROTOCOL_VERSION:
            raise CheckpointError(
                f"the node writer on {path} (pid {reply.writer_pid}) speaks protocol "
                f"{reply.version} but this ckptsvc needs {PROTOCOL_VERSION} (an older ckptsvc "
                "started it); it exits when idle, or stop it with kill"
            )
        if not isinstance(reply, Welcome):
            raise WriterDiedError(
                f"the node writer on {path} closed the connection during the handshake"
            )
        sock.settimeout(None)
        return cls(sock, reply, path=path)

    @property
    def alive(self) -> bool:
        return self._alive

    def submit(self, job: SaveJob, callback: JobCallback) -> None:
        """Send ``job``; ``callback`` runs once, on the reader thread, with the outcome."""
        with self._lock:
            if not self._alive:
                raise WriterDiedError(f"the node writer (pid {self.writer_pid}) is gone")
            self._pending[job.job_id] = callback
            try:
                send_message(self._sock, job)
            except OSError as e:
                self._pending.pop(job.job_id, None)
                self._alive = False
                raise WriterDiedError(
                    f"the node writer (pid {self.writer_pid}) is gone: {e}"
                ) from e

    def watch_pieces(self, job_id: int, callback: Callable[[PieceDone], None]) -> None:
        """Call ``callback`` (reader thread) with each ``PieceDone`` of a streamed job, until
        its outcome arrives."""
        with self._lock:
            if job_id in self._pending:
                self._progress[job_id] = callback

    def send(self, message: object) -> None:
        """Send a frame about a job already submitted (``PieceReady``, ``CancelJob``);
        ``WriterDiedError`` if the writer is gone."""
        with self._lock:
            if not self._alive:
                raise WriterDiedError(f"the node writer (pid {self.writer_pid}) is gone")
            try:
                send_message(self._sock, message)
            except OSError as e:
                raise WriterDiedError(
                    f"the node writer (pid {self.writer_pid}) is gone: {e}"
                ) from e

    def release_arena(self, name: str) -> None:
        """Tell the writer to unmap an arena the trainer unlinked (best effort)."""
        with self._lock:
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

    def _read_loop(self) -> None:
        reason = "closed the connection"
        try:
            while True:
                msg = recv_message(self._sock)
                if msg is None:
                    break
                if isinstance(msg, (JobDone, JobFailed)):
                    with self._lock:
                        callback = self._pending.pop(msg.job_id, None)
                        self._progress.pop(msg.job_id, None)
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
                else:
                    logger.warning(
                        "ignoring unexpected %s from the node writer", type(msg).__name__
                    )
        except (OSError, ProtocolError) as e:
            reason = f"broke the connection ({e})"
        with self._lock:
            self._alive = False
            pending, self._pending = self._pending, {}
            self._progress = {}
            closing = self._closing
        if closing:
            text = f"the checkpointer was closed while a save to the node writer (pid {self.writer_pid}) was in flight"
        else:
            text = f"the node writer (pid {self.writer_pid}) {reason} while saves were in flight"
            if pending:
                logger.error("%s; %d save(s) failed", text, len(pending))
        for callback in pending.values():
            self._call(callback, WriterDiedError(text))

    @staticmethod
    def _call(callback: JobCallback, outcome: JobDone | JobFailed | WriterDiedError) -> None:
        try:
            callback(outcome)
        except Exception:  # a buggy callback must not kill the reader thread
            logger.exception("save completion callback failed")
