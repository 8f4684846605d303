"""Finding or starting the node writer process (trainer side; no connection state).

``workers.client`` runs these, under the start lock where said, for
``WriterClient.connect_or_start`` and ``retire``:

1. :func:`writer_socket_path`: the socket of this node *and identity*
   (``writer-<node>-<identity key>[-<n>].sock`` in a private 0700 directory,
   :func:`private_dir`), or ``CKPTSVC_WRITER_SOCKET``; :func:`try_connect` to it.
2. :func:`start_lock` (``flock`` on the socket directory) serialises starts among the
   local ranks; :func:`spawn_writer` starts ``workers.node_writer`` as a fresh interpreter
   with this process's ``sys.path`` and environment (spawn semantics, never fork), in its
   own session, its output in :func:`writer_log_path` (rotated once past 16 MiB);
   :func:`wait_for_socket` until it listens.
3. :func:`retire_writer` (under the start lock): a wedged writer is SIGKILLed if it still
   is this user's node writer (:func:`peer_pid`, ``/proc``), and its socket name removed
   if it still is its.

The writer process imports only :func:`writer_log_path` from here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from ckptsvc import knobs
from ckptsvc.errors import ConfigError, WriterDiedError

from .identity import current_identity

__all__ = [
    "peer_pid",
    "private_dir",
    "retire_writer",
    "spawn_writer",
    "start_lock",
    "try_connect",
    "wait_for_socket",
    "writer_log_path",
    "writer_socket_path",
]

logger = logging.getLogger(__name__)

_SUN_PATH_MAX = 107
_spawned: list[subprocess.Popen[bytes]] = []  # keeps Popen objects (and their reaping) alive


def writer_socket_path(
    node: str, explicit: str | None = None, *, key: str | None = None, attempt: int = 0
) -> str:
    """``CKPTSVC_WRITER_SOCKET``, or ``<tmp>/ckptsvc-<uid>/writer-<node>-<key>[-<n>].sock``
    where ``key`` is this process's ``WriterIdentity.key`` (installation, version, job
    environment) and ``attempt`` the candidate number (a writer of another identity holds
    the earlier names)."""
    path = knobs.WRITER_SOCKET.get(explicit)
    if path:
        return path
    key = current_identity().key if key is None else key
    name = f"writer-{node}-{key}" + (f"-{attempt}" if attempt else "")
    directory = os.path.join(tempfile.gettempdir(), f"ckptsvc-{os.getuid()}")
    path = os.path.join(directory, f"{name}.sock")
    if len(path.encode()) > _SUN_PATH_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        path = os.path.join(f"/tmp/ckptsvc-{os.getuid()}", f"w-{digest}.sock")
    return path


def try_connect(path: str) -> tuple[socket.socket, int | None] | None:
    """A connected socket and the inode its name had just before (to remove that name
    later only if it still is this writer's), or ``None`` when nobody listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        ino: int | None = os.stat(path).st_ino
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError:
        sock.close()
        raise
    return sock, ino


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process that listens on the other end (Linux ``SO_PEERCRED``)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid or None


def _is_node_writer(pid: int) -> bool:
    """``pid`` runs as this user and is a ckptsvc node writer (not a recycled pid)."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"node_writer" in f.read()
    except OSError:
        return False


def retire_writer(path: str, ino: int | None, pid: int | None, why: str) -> None:
    """A wedged writer: SIGKILL it (if it still is this user's node writer) and remove its
    socket name (if it still is its: a replacement may already listen there), so the next
    start does not reach it. A writer stuck in the kernel (hung NFS) dies when the call
    returns; until then it serves nobody new. Call under the start lock."""
    if pid is not None and _is_node_writer(pid):
        logger.error("killing the node writer (pid %d): %s", pid, why)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        if ino is not None and os.stat(path).st_ino == ino:
            os.unlink(path)


def private_dir(directory: str) -> None:
    """Create the socket directory 0700, or check that an existing one is ours and private."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"{directory} (the node writer's socket directory) must be owned by uid "
            f"{os.getuid()} with mode 0700; remove it or set CKPTSVC_WRITER_SOCKET elsewhere"
        )


@contextlib.contextmanager
def start_lock(path: str) -> Iterator[None]:
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


def spawn_writer(path: str, node: str) -> subprocess.Popen[bytes]:
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


def wait_for_socket(
    path: str, proc: subprocess.Popen[bytes], timeout_s: float
) -> tuple[socket.socket, int | None]:
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        found = try_connect(path)
        if found is not None:
            return found
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
        delay = min(delay * 2, 0.02)  # a start takes ~0.2-0.5 s: don't overshoot it
