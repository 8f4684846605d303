"""Messages between a trainer and its node writer, and their framing on a Unix socket.

Conversation (each arrow one frame; the trainer's side is ``workers.client``, the
writer's ``workers.node_writer``):

1. trainer -> writer ``Hello``; writer -> trainer ``Welcome`` (or the writer closes). Both
   carry a :class:`WriterIdentity` (installation, version, the job's storage environment):
   a writer serves only trainers whose identity equals its own; the writer closes on a
   mismatch and the trainer starts a writer of its own under another socket name.
2. trainer -> writer ``SaveJob`` (any number, any time); for each, exactly one
   ``JobDone`` or ``JobFailed`` comes back once the writer no longer reads the arena.
   Each job carries its :class:`~.options.WriterOptions` (fsync, I/O threads, part size,
   retries, direct I/O, chunk size; ``workers.options``), resolved in the trainer: the
   writer applies them to that job only and reads none of them from its own environment.
3. trainer -> writer ``ReleaseArena`` when it unlinks an arena the writer may have mapped.
   A streamed job (``SaveJob.stream``: the state is larger than the memory budget) is
   followed by ``PieceReady`` frames, each answered by ``PieceDone`` once its bytes were
   handed to storage (the slot may be refilled); ``CancelJob`` stops it (``JobFailed``).
4. trainer -> writer ``Ping`` while it has jobs in flight; writer -> trainer ``Pong`` with
   the writer's progress counter and what the trainer's oldest job is doing. No progress
   for ``CKPTSVC_WRITER_TIMEOUT_S`` means the writer is wedged (``workers.client``).
5. Either side closes the socket. EOF is the death notice: the trainer fails its
   in-flight saves with ``WriterDiedError``; the writer cancels that trainer's jobs
   (no manifest) and reclaims a dead trainer's arenas.

Frame: 8-byte little-endian length, then a pickle of one message. Unpickling is
restricted to the classes below and to plain builtins: the socket lives in a 0700
directory, and even so a peer cannot make the other side run code. Errors travel as
:class:`ErrorInfo` (type name, message, URL), never as pickled exceptions. A
``FileJob``'s :class:`~ckptsvc.format.safetensors_stream.ShardLayout` travels as its header
bytes and data size only (protocol 6): no per-tensor object is pickled, so a job of
100,000 tensors is a few large byte strings; and a byte string of a save job the writer
got before on this connection is sent by name (protocol 7, :mod:`.frame_blobs`).
"""

from __future__ import annotations

import errno as _errno
import hashlib
import io
import pickle
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from ckptsvc import errors as _errors
from ckptsvc.errors import CheckpointError, InvalidStateError, SaveFailedError, WriterDiedError
from ckptsvc.format.manifest import ComponentRecord, FileRecord
from ckptsvc.format.safetensors_stream import ShardLayout, TensorEntry

from .frame_blobs import ReceivedBlobs, SentBlobs
from .options import WriterOptions

__all__ = [
    "PROTOCOL_VERSION",
    "CancelJob",
    "CommitInfo",
    "ErrorInfo",
    "FileJob",
    "Hello",
    "JobDone",
    "JobFailed",
    "PieceDone",
    "PieceReady",
    "Ping",
    "Pong",
    "ReleaseArena",
    "SaveJob",
    "SmallFile",
    "StreamSpec",
    "Welcome",
    "WriterIdentity",
    "WriterOptions",  # defined in workers.options; re-exported: every SaveJob carries one
    "check_wire_safe",
    "recv_message",
    "send_message",
]

PROTOCOL_VERSION = 7
MAX_FRAME_BYTES = 1 << 30
_LEN = struct.Struct("<Q")


@dataclass(frozen=True)
class WriterIdentity:
    """Whom a node writer may serve: a process of the same installation (package
    directory, ``sys.prefix``), ``ckptsvc.__version__`` and job environment (a digest of
    the credential- and storage-relevant variables, ``workers.identity``). ``key`` names
    the writer's socket."""

    package_dir: str
    version: str
    prefix: str
    env_digest: str

    @property
    def key(self) -> str:
        text = "\0".join((self.package_dir, self.version, self.prefix, self.env_digest))
        return hashlib.sha256(f"{PROTOCOL_VERSION}\0{text}".encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (
            f"ckptsvc {self.version} from {self.package_dir} (python {self.prefix}), "
            f"job environment {self.env_digest[:12]}"
        )


# ---- trainer -> writer ------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """First frame of a connection: who the trainer is (its pid owns its arenas)."""

    pid: int
    rank: int
    node_id: str
    version: int = PROTOCOL_VERSION
    identity: WriterIdentity | None = None


@dataclass(frozen=True)
class FileJob:
    """One shard: its path in the checkpoint, layout, and arena offset of its data section."""

    rel_path: str
    layout: ShardLayout
    arena_offset: int


@dataclass(frozen=True)
class SmallFile:
    """A small file of the checkpoint (index, state skeleton), published atomically."""

    rel_path: str
    data: bytes


@dataclass(frozen=True)
class CommitInfo:
    """What the writer needs to write the manifest itself.

    ``extra_files`` are files other ranks already made durable (a distributed commit:
    rank 0 sends a job whose own files are the index and documents, plus these).
    ``claim_id``: the in-progress marker must still carry it at commit
    (:mod:`ckptsvc.workers.claim`). ``replace_url``: this checkpoint is the successor of
    the committed one there, swapped in once committed (:func:`~ckptsvc.workers.commit.swap_in`).
    ``report_when_durable``: send ``JobDone`` as soon as the manifest is durable, before the
    marker's delete and the ``latest`` pointer (rank 0's distributed commit: the outcome
    goes out to the ranks then; design.md section 4); else after them.
    """

    step: int | None
    world_size: int
    components: tuple[ComponentRecord, ...]
    pytorch_version: str | None
    library_version: str
    user_metadata: dict[str, Any] = field(default_factory=dict)
    extra_files: tuple[FileRecord, ...] = ()
    claim_id: str = ""
    replace_url: str = ""
    report_when_durable: bool = False


@dataclass(frozen=True)
class StreamSpec:
    """A streamed job's staged bytes: ``nbytes`` of the full arena layout (``FileJob.
    arena_offset`` are offsets in it) arrive as ``PieceReady`` windows of ``piece_nbytes``
    (the last one shorter), in order, through a smaller ring arena."""

    nbytes: int
    piece_nbytes: int

    @property
    def npieces(self) -> int:
        return -(-self.nbytes // self.piece_nbytes)


@dataclass(frozen=True)
class SaveJob:
    """Write ``files`` from arena ``arena_name`` and ``small_files`` under ``ckpt_url``.

    With ``commit`` the writer also commits the checkpoint (manifest last) once every
    file is durable; without, it only reports the files (a coordinator commits).
    ``arena_name`` is empty for a job without shard files (small files and commit only).
    With ``stream`` the arena is a ring the trainer refills piece by piece (``PieceReady``).
    ``options``: how to write this job (:class:`WriterOptions`; keyword only).
    ``base_url`` / ``base_files``: a committed earlier checkpoint and its records of files
    that may be unchanged; such a file is materialised from it (hard link, server-side
    copy) instead of written when its bytes are identical (``workers.reuse``).
    """

    job_id: int
    ckpt_url: str
    storage_options: dict[str, Any]
    arena_name: str
    files: tuple[FileJob, ...]
    small_files: tuple[SmallFile, ...]
    commit: CommitInfo | None
    stream: StreamSpec | None = None
    base_url: str = ""
    base_files: tuple[FileRecord, ...] = ()
    options: WriterOptions = field(kw_only=True)


@dataclass(frozen=True)
class ReleaseArena:
    """The trainer unlinked this arena: the writer unmaps it."""

    name: str


@dataclass(frozen=True)
class PieceReady:
    """Piece ``seq`` of a streamed job: layout bytes ``[offset, offset + nbytes)`` are in
    the ring arena at ``arena_offset``."""

    job_id: int
    seq: int
    offset: int
    arena_offset: int
    nbytes: int


@dataclass(frozen=True)
class Ping:
    """Are you alive and making progress? Answered by ``Pong`` (connection thread)."""

    seq: int


@dataclass(frozen=True)
class CancelJob:
    """The trainer gives up a streamed job (it failed while staging); no manifest."""

    job_id: int
    reason: str


# ---- writer -> trainer ------------------------------------------------------------------------


@dataclass(frozen=True)
class Welcome:
    writer_pid: int
    version: int = PROTOCOL_VERSION
    identity: WriterIdentity | None = None


@dataclass(frozen=True)
class Pong:
    """Answer to ``Ping``: ``progress`` counts the writer's work so far (chunks handed to
    storage, files and jobs finished; it only grows); ``activity`` says what the trainer's
    oldest job in the writer is doing ("" when it has none)."""

    seq: int
    progress: int
    activity: str = ""


#: attributes of an exception that travel with it (when plain data): the errno and file
#: of an ``OSError``, a ``KeyError``'s key, the details of ckptsvc's leaves
_DETAILS = ("errno", "filename", "filename2", "key", "tensor", "step", "problems", "missing")


def _plain(value: object) -> bool:
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return False


@dataclass(frozen=True)
class ErrorInfo:
    """An exception, flattened for the wire; ``to_exception`` rebuilds a ckptsvc error.

    ``details``: the exception's plain-data attributes named in ``_DETAILS`` (``errno``,
    ``filename``, a ``KeyError``'s ``key``, ``tensor``, ``problems``, ...); the rebuilt
    exception has them again."""

    type_name: str
    message: str
    url: str | None = None
    details: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        found: dict[str, Any] = {}
        if isinstance(exc, KeyError) and exc.args:
            found["key"] = exc.args[0]
        for name in _DETAILS:
            value = getattr(exc, name, None)
            if value is not None and name not in found:
                found[name] = value
        cause = exc.__cause__
        if "errno" not in found and isinstance(cause, OSError) and cause.errno is not None:
            found["errno"] = cause.errno  # a StorageError wrapping the OS's error
        details = tuple((k, v) for k, v in found.items() if _plain(v))
        return cls(type(exc).__name__, str(exc) or repr(exc), getattr(exc, "url", None), details)

    def to_exception(self) -> CheckpointError:
        cls = getattr(_errors, self.type_name, None)
        details = dict(self.details)
        exc: CheckpointError
        if isinstance(cls, type) and issubclass(cls, _errors.StorageError):
            exc = cls(self.message, url=self.url)
        elif isinstance(cls, type) and issubclass(cls, CheckpointError):
            exc = cls(self.message)
        elif "errno" in details or self.type_name in _OS_ERRORS:
            exc = _storage_leaf(self.type_name, details.get("errno"))(
                f"{self.type_name}: {self.message}",
                url=self.url or details.get("filename"),
            )
        else:
            exc = SaveFailedError(f"{self.type_name}: {self.message}")
        for name, value in details.items():
            setattr(exc, name, tuple(value) if isinstance(value, list) else value)
        return exc


_OS_ERRORS = frozenset(
    c.__name__ for c in (OSError, FileNotFoundError, PermissionError, TimeoutError)
)


def _storage_leaf(type_name: str, code: int | None) -> type[_errors.StorageError]:
    """The ``StorageError`` leaf for an ``OSError`` of the writer (by type, then errno)."""
    if type_name == "FileNotFoundError" or code == _errno.ENOENT:
        return _errors.StorageNotFoundError
    if type_name == "PermissionError" or code in (_errno.EACCES, _errno.EPERM):
        return _errors.StoragePermissionError
    return _errors.StorageError


@dataclass(frozen=True)
class JobDone:
    """Every file of the job is durable (and committed, when the job asked for it).

    ``nbytes_reused``: bytes of files materialised from the job's base checkpoint instead
    of written; ``nbytes_written``: the bytes of every other file of the job."""

    job_id: int
    files: tuple[FileRecord, ...]
    queue_wait_s: float
    write_s: float
    commit_s: float
    committed: bool
    nbytes_written: int = 0
    nbytes_reused: int = 0


@dataclass(frozen=True)
class PieceDone:
    """Every byte of piece ``seq`` was handed to storage: its ring slot may be refilled."""

    job_id: int
    seq: int


@dataclass(frozen=True)
class JobFailed:
    """The job failed and no manifest was written; the writer no longer reads the arena."""

    job_id: int
    error: ErrorInfo


# ---- framing ----------------------------------------------------------------------------------

_ALLOWED: dict[str, frozenset[str]] = {
    __name__: frozenset(__all__),
    "ckptsvc.format.safetensors_stream": frozenset({ShardLayout.__name__, TensorEntry.__name__}),
    "ckptsvc.format.manifest": frozenset({FileRecord.__name__, ComponentRecord.__name__}),
    WriterOptions.__module__: frozenset({WriterOptions.__name__}),
    "builtins": frozenset(
        {
            "dict",
            "list",
            "tuple",
            "set",
            "frozenset",
            "bytes",
            "bytearray",
            "int",
            "float",
            "str",
            "bool",
            "complex",
            "NoneType",
        }
    ),
    "collections": frozenset({"OrderedDict"}),
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"writer protocol: refusing to load {module}.{name}")


class ProtocolError(WriterDiedError):
    """The peer sent something that is not a valid frame; the connection is unusable."""


def check_wire_safe(value: object, *, what: str) -> None:
    """Raise ``InvalidStateError`` unless ``value`` survives the writer's restricted unpickler
    (plain data: dict, list, tuple, str, bytes, int, float, bool, None)."""
    try:
        _Unpickler(io.BytesIO(pickle.dumps(value, protocol=5))).load()
    except Exception as e:
        raise InvalidStateError(
            f"{what} must be plain data (dict, list, tuple, str, bytes, int, float, bool, None): "
            f"the node writer process rebuilds it from bytes ({e})"
        ) from e


def send_message(sock: socket.socket, message: object, *, blobs: SentBlobs | None = None) -> None:
    """Send one frame. Callers serialise sends on a socket (one lock per connection).
    With ``blobs``, large byte strings the peer already holds are sent by name
    (:mod:`~ckptsvc.workers.frame_blobs`)."""
    payload = pickle.dumps(message, protocol=5) if blobs is None else blobs.dumps(message)
    sock.sendall(_LEN.pack(len(payload)))
    sock.sendall(payload)  # (not joined to the length: a save job's frame is megabytes)


def _recv_exact(sock: socket.socket, nbytes: int) -> bytes | None:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = sock.recv_into(view[got:], nbytes - got)
        if n == 0:
            if got == 0:
                return None
            raise ProtocolError(
                f"connection closed in the middle of a frame ({got} of {nbytes} bytes)"
            )
        got += n
    return bytes(buf)


def recv_message(sock: socket.socket, *, blobs: ReceivedBlobs | None = None) -> object | None:
    """Receive one frame; ``None`` on a clean EOF between frames. ``blobs``: the byte
    strings this connection's peer sent before (frames that name one need it)."""
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    (nbytes,) = _LEN.unpack(head)
    if nbytes > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {nbytes} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    payload = _recv_exact(sock, nbytes)
    if payload is None:
        raise ProtocolError("connection closed between a frame's length and its body")
    try:
        unpickler = _Unpickler(io.BytesIO(payload))
        if blobs is not None:
            unpickler.persistent_load = blobs.persistent_load  # type: ignore[method-assign]
        return unpickler.load()
    except Exception as e:
        raise ProtocolError(f"undecodable frame from peer: {e}") from e
