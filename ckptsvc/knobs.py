"""Every tunable of ckptsvc in one place.

Each knob has a default, a ``CKPTSVC_<NAME>`` environment override, and is read at the
moment it is used (so tests and launch scripts can set the environment late). An explicit
argument to a public function always wins over both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Knob", "knob_table"]

T = TypeVar("T", int, float, str, bool)


@dataclass(frozen=True)
class Knob(Generic[T]):
    """A named tunable: ``KNOB.get()`` returns the env override or the default."""

    name: str
    default: T
    doc: str

    @property
    def env_var(self) -> str:
        return f"CKPTSVC_{self.name.upper()}"

    def get(self, explicit: T | None = None) -> T:
        """Return ``explicit`` if given, else the environment override, else the default."""
        if explicit is not None:
            return explicit
        raw = os.environ.get(self.env_var)
        if raw is None or raw == "":
            return self.default
        kind = type(self.default)
        try:
            if kind is bool:
                return raw.strip().lower() in ("1", "true", "yes", "on")
            return kind(raw)
        except ValueError as e:
            raise ValueError(f"{self.env_var}={raw!r} is not a valid {kind.__name__}") from e


_ALL: list[Knob[Any]] = []


def _knob(name: str, default: T, doc: str) -> Knob[T]:
    k = Knob(name, default, doc)
    _ALL.append(k)
    return k


def knob_table() -> list[tuple[str, object, str]]:
    """(environment variable, current value, description) for every knob, for docs and CLI."""
    return [(k.env_var, k.get(), k.doc) for k in _ALL]


# --- format and sync I/O ----------------------------------------------------------------
MAX_SHARD_SIZE = _knob("max_shard_size", 2**31, "Default bytes per shard file for async saves.")
WRITE_CHUNK_BYTES = _knob(
    "write_chunk_bytes",
    64 * 2**20,
    "Bytes per write() call when streaming a shard (local O_DIRECT: split into 4 parallel "
    "writes; each chunk is checksummed while it is written).",
)
READ_CHUNK_BYTES = _knob("read_chunk_bytes", 64 * 2**20, "Bytes per ranged read when loading.")
IO_THREADS = _knob("io_threads", 4, "Threads that write or read shards in parallel.")
MAX_HEADER_BYTES = _knob(
    "max_header_bytes", 100 * 2**20, "Largest safetensors JSON header accepted."
)
FSYNC = _knob("fsync", True, "fsync local shard files and directories before commit.")
DIRECT_IO = _knob(
    "direct_io",
    "auto",
    "O_DIRECT for local shard files: auto (ext4/xfs, files >= direct_io_min_bytes), on, off.",
)
DIRECT_IO_MIN_BYTES = _knob(
    "direct_io_min_bytes",
    8 * 2**20,
    "Smallest local file that direct_io=auto writes with O_DIRECT.",
)
DIRECT_IO_BUFFER_BYTES = _knob(
    "direct_io_buffer_bytes",
    16 * 2**20,
    "Bytes per O_DIRECT write; each direct file maps two such bounce buffers.",
)

# --- object stores ------------------------------------------------------------------------
PART_SIZE_BYTES = _knob("part_size_bytes", 64 * 2**20, "Multipart/resumable upload part size.")
RETRY_ATTEMPTS = _knob("retry_attempts", 6, "Attempts for a transient storage error.")
RETRY_MAX_S = _knob("retry_max_s", 120.0, "Give up retrying one call after this many seconds.")
RETRY_BASE_S = _knob("retry_base_s", 0.2, "First backoff delay; doubles each attempt, with jitter.")
UPLOAD_PARTS_IN_FLIGHT = _knob(
    "upload_parts_in_flight",
    4,
    "Parts of one file uploading at once (S3); a file's sink holds at most n+1 part buffers.",
)
READ_RANGES_IN_FLIGHT = _knob(
    "read_ranges_in_flight", 8, "Ranged GETs of one file in flight when loading from object stores."
)
READ_COALESCE_GAP_BYTES = _knob(
    "read_coalesce_gap_bytes",
    2**20,
    "Tensors at most this many bytes apart in a file are fetched by one ranged read.",
)

# --- async engine -------------------------------------------------------------------------
ARENAS_PER_RANK = _knob(
    "arenas_per_rank",
    0,
    "Most staging arenas per rank (0 = one, or two when memory_budget_bytes holds two copies; "
    "an explicit N without a budget allows N state copies).",
)
MEMORY_BUDGET_BYTES = _knob(
    "memory_budget_bytes",
    0,
    "Shared-memory staging bytes per checkpointer (0 = one state copy); a larger state is "
    "staged and streamed in pieces.",
)
COPY_THREADS = _knob("copy_threads", 0, "Threads copying into the arena on CPU (0 = all cores).")
INCREMENTAL = _knob(
    "incremental",
    True,
    "Frozen parameters get shards of their own; a shard unchanged since this checkpointer's "
    "last committed checkpoint is hard-linked / copied server-side, not rewritten.",
)
WRITER_START_TIMEOUT_S = _knob(
    "writer_start_timeout_s", 60.0, "Wait this long for the node writer to start."
)
WRITER_TIMEOUT_S = _knob(
    "writer_timeout_s",
    300.0,
    "A node writer that made no progress on a trainer's in-flight saves for this long (no "
    "answer to pings, or no bytes handed to storage) is wedged: those saves fail with "
    "WriterDiedError and the next save starts a new writer. Also bounds each send to it.",
)
CLOSE_TIMEOUT_S = _knob(
    "close_timeout_s",
    0.0,
    "close() waits at most this long for in-flight saves (0 = while the writer makes "
    "progress: a wedged writer fails them after writer_timeout_s).",
)
WRITER_NICE = _knob("writer_nice", 10, "nice() increment for the node writer process.")
SHM_DIR = _knob("shm_dir", "/dev/shm", "Directory of POSIX shared memory segments.")
COMMIT_TIMEOUT_S = _knob(
    "commit_timeout_s", 1800.0, "Rank 0 waits this long for every rank's report."
)
NODE_ID = _knob("node_id", "", "Names this node's writer socket and arenas ('' = per user).")
WRITER_SOCKET = _knob(
    "writer_socket", "", "Unix socket path of the node writer ('' = derived from the node id)."
)
WRITER_LINGER_S = _knob(
    "writer_linger_s", 10.0, "The node writer exits after this long with no client and no job."
)
WRITER_PRELOAD = _knob(
    "writer_preload",
    "",
    "Comma-separated modules the node writer imports at start (custom fsspec filesystems).",
)
WRITER_LOG_LEVEL = _knob(
    "writer_log_level",
    "WARNING",
    "Logging level of the node writer process (logs go to its stderr).",
)
