"""Every tunable of ckptsvc in one place.

Each knob has a default, a ``CKPTSVC_<NAME>`` environment override, and is read at the
moment it is used (so tests and launch scripts can set the environment late). An explicit
argument to a public function always wins over both.
"""

from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ckptsvc.errors import ConfigError

__all__ = ["Knob", "knob_table"]

T = TypeVar("T", int, float, str, bool)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Knob(Generic[T]):
    """A named tunable: ``KNOB.get()`` returns the env override or the default.

    Every value (environment override or explicit argument) is checked against the knob's
    type and limits; a bad one raises :class:`~ckptsvc.errors.ConfigError` naming the
    variable, the value and what is allowed. Limits: ``min_value`` / ``max_value``
    (numbers; ``min_value`` is exclusive when ``min_inclusive`` is false), ``choices``
    (strings, compared case-insensitively after stripping; the value is returned as
    given), ``nonempty`` (strings). ``bool`` knobs accept 1/0, true/false, yes/no, on/off.
    """

    name: str
    default: T
    doc: str
    min_value: int | float | None = None
    max_value: int | float | None = None
    min_inclusive: bool = True
    choices: tuple[str, ...] = ()
    nonempty: bool = False

    def __post_init__(self) -> None:
        self.check(self.default, source="default")  # a knob's own default must pass

    @property
    def env_var(self) -> str:
        return f"CKPTSVC_{self.name.upper()}"

    def get(self, explicit: T | None = None) -> T:
        """Return ``explicit`` if given, else the environment override, else the default."""
        if explicit is not None:
            return self.check(explicit, source="argument")
        raw = os.environ.get(self.env_var)
        if raw is None or raw == "":
            return self.default
        return self.check(raw, source="env")

    def allowed(self, source: str = "env") -> str:
        """What values the knob accepts, in words (for errors and the docs table)."""
        kind = type(self.default)
        if kind is bool and source != "env":
            return "True or False"
        if kind is bool:
            return "a boolean: " + ", ".join(f"{t}/{f}" for t, f in zip(_TRUE, _FALSE, strict=True))
        if self.choices:
            return "one of " + ", ".join(self.choices) + " (any case)"
        if kind is str:
            return "a non-empty string" if self.nonempty else "any string"
        what = "an integer" if kind is int else "a finite number"
        lo, hi = self.min_value, self.max_value
        if lo is not None and hi is not None:
            return f"{what} from {lo} to {hi}"
        if lo is not None:
            return f"{what} {'>=' if self.min_inclusive else '>'} {lo}"
        if hi is not None:
            return f"{what} <= {hi}"
        return what

    def check(self, value: object, *, source: str = "argument") -> T:
        """``value`` (an explicit argument, or the raw text of the environment variable when
        ``source == "env"``) converted to the knob's type and checked against its limits."""
        kind = type(self.default)
        try:
            if source == "env":
                if not isinstance(value, str):
                    raise TypeError
                converted: Any = _parse(kind, value)
            else:
                converted = _coerce(kind, value)
        except (TypeError, ValueError, OverflowError) as e:
            raise self._error(value, source, "is not valid") from e
        if kind in (int, float):
            if kind is float and not math.isfinite(converted):
                raise self._error(value, source, "is not valid")
            lo, hi = self.min_value, self.max_value
            too_low = lo is not None and (
                converted < lo or (converted == lo and not self.min_inclusive)
            )
            if too_low or (hi is not None and converted > hi):
                raise self._error(value, source, "is out of range")
        elif kind is str:
            if self.choices and converted.strip().lower() not in {c.lower() for c in self.choices}:
                raise self._error(value, source, "is not allowed")
            if self.nonempty and not converted.strip():
                raise self._error(value, source, "is not allowed")
        return converted

    def _error(self, value: object, source: str, problem: str) -> ConfigError:
        if source == "env":
            who = f"{self.env_var}={value!r}"
        else:
            who = f"{self.name}={value!r} ({source}; environment variable {self.env_var})"
        return ConfigError(f"{who} {problem}: expected {self.allowed(source)}. {self.doc}")


def _parse(kind: type, raw: str) -> Any:
    """The text of an environment variable as a ``kind``; ValueError if it is not one."""
    if kind is bool:
        text = raw.strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(raw)
    if kind is int:
        return int(raw.strip())
    if kind is float:
        return float(raw.strip())
    return raw


def _coerce(kind: type, value: object) -> Any:
    """An explicit argument as a ``kind``; TypeError if it is not one (no bool for numbers,
    no float for an integer)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if type(value) is int and value in (0, 1):
            return bool(value)
        raise TypeError(value)
    if isinstance(value, bool) or (kind is not str and isinstance(value, str)):
        raise TypeError(value)
    if kind is int:
        return operator.index(value)  # type: ignore[arg-type]
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        raise TypeError(value)
    if not isinstance(value, str):
        raise TypeError(value)
    return value


_ALL: list[Knob[Any]] = []


def _knob(name: str, default: T, doc: str, **limits: Any) -> Knob[T]:
    """Define a knob; ``limits`` are :class:`Knob`'s ``min_value``, ``max_value``,
    ``min_inclusive``, ``choices`` and ``nonempty``."""
    k = Knob(name, default, doc, **limits)
    _ALL.append(k)
    return k


def knob_table() -> list[tuple[str, object, str]]:
    """(environment variable, current value, description) for every knob, for docs and CLI."""
    return [(k.env_var, k.get(), k.doc) for k in _ALL]


# --- format and sync I/O ----------------------------------------------------------------
MAX_SHARD_SIZE = _knob(
    "max_shard_size", 2**31, "Default bytes per shard file for async saves.", min_value=1
)
REPLICATED_WRITER_MIN_BYTES = _knob(
    "replicated_writer_min_bytes",
    64 * 2**20,
    "A REPLICATED component is split over at most ceil(its tensor bytes / this) ranks, "
    "spread over the job (not over every rank: each writer's part is an object of its own).",
    min_value=1,
)
WRITE_CHUNK_BYTES = _knob(
    "write_chunk_bytes",
    64 * 2**20,
    "Bytes per write() call when streaming a shard (local O_DIRECT: split into 4 parallel "
    "writes; each chunk is checksummed while it is written).",
    min_value=1,
)
READ_CHUNK_BYTES = _knob(
    "read_chunk_bytes", 64 * 2**20, "Bytes per ranged read when loading.", min_value=1
)
LOAD_STAGING_BYTES = _knob(
    "load_staging_bytes",
    64 * 2**20,
    "Bytes per pinned staging buffer (two per shard) when loading onto a CUDA device.",
    min_value=4096,
)
IO_THREADS = _knob(
    "io_threads", 4, "Threads that write (per save) or read shards in parallel.", min_value=1
)
MAX_HEADER_BYTES = _knob(
    "max_header_bytes", 100 * 2**20, "Largest safetensors JSON header accepted.", min_value=1
)
MAX_JSON_BYTES = _knob(
    "max_json_bytes",
    256 * 2**20,
    "Largest JSON document of a checkpoint (manifest, index, state skeleton) a reader accepts.",
)
MANIFEST_HEAD_GUESS = _knob(
    "manifest_head_guess",
    4096,
    "Bytes a rank reads first of a v3 manifest (layout line and, usually, the whole head) "
    "when it reads only its own view of it.",
    min_value=128,
)
FSYNC = _knob("fsync", True, "fsync local shard files and directories before commit.")
DIRECT_IO = _knob(
    "direct_io",
    "auto",
    "O_DIRECT for local shard files: auto (ext4/xfs, files >= direct_io_min_bytes), on, off.",
    choices=("auto", "on", "off", "1", "0", "true", "false", "yes", "no"),
)
DIRECT_IO_MIN_BYTES = _knob(
    "direct_io_min_bytes",
    8 * 2**20,
    "Smallest local file that direct_io=auto writes with O_DIRECT.",
    min_value=0,
)
DIRECT_IO_BUFFER_BYTES = _knob(
    "direct_io_buffer_bytes",
    4 * 2**20,
    "Bytes per O_DIRECT bounce slot (the writes of unaligned bytes, and every byte of a sync "
    "save); a direct file uses up to five, from a per-process pool reused across files. "
    "4 MiB: a device's largest request on common virtual disks; a bigger slot only delays "
    "the first write while its fresh memory is faulted in.",
    min_value=1,
)
DIRECT_IO_READS = _knob(
    "direct_io_reads",
    "auto",
    "O_DIRECT for loading local shards into block-aligned memory: auto (ext4/xfs), on, off.",
    choices=("auto", "on", "off", "1", "0", "true", "false", "yes", "no"),
)
MAPPED_READS = _knob(
    "mapped_reads",
    "on",
    "Load fresh tensors of local shards from a private copy-on-write mapping of the file, "
    "faulted in by parallel threads (no anonymous memory to zero, no copy): on, off "
    "(read into fresh memory; CKPTSVC_DIRECT_IO_READS applies).",
    choices=("on", "off", "1", "0", "true", "false", "yes", "no"),
)

# --- node-local cache of replicated files (read/node_cache.py) ---------------------------
NODE_CACHE = _knob(
    "node_cache",
    "auto",
    "Node-local read-through cache of the replicated (and GLOBAL) files of remote "
    "checkpoints: the first rank of a node downloads a file once, the node's other ranks "
    "map the local copy. auto (object stores, more than one rank per node), on (object "
    "stores, any job), off.",
    choices=("auto", "on", "off", "1", "0", "true", "false", "yes", "no"),
)
NODE_CACHE_DIR = _knob(
    "node_cache_dir",
    "",
    "Directory of the node cache ('' = ckptsvc-node-cache-<uid> in the system temp dir; "
    "a tmpfs such as /dev/shm is faster but holds the copies in memory the kernel cannot "
    "reclaim; 'off' disables the cache).",
)
NODE_CACHE_MAX_BYTES = _knob(
    "node_cache_max_bytes",
    0,
    "Most bytes the node cache holds (0 = half of its filesystem's size); a download that "
    "would exceed it evicts the least recently used unlocked entries first, and a file "
    "that still does not fit is read directly.",
    min_value=0,
)
NODE_CACHE_MAX_AGE_S = _knob(
    "node_cache_max_age_s",
    900.0,
    "A process that adds an entry to the node cache deletes the entries of other "
    "checkpoints not used for this long (never one another process holds).",
    min_value=0,
)
NODE_CACHE_STALL_S = _knob(
    "node_cache_stall_s",
    120.0,
    "A rank waiting for another rank's download into the node cache gives up (an error) "
    "when the download made no progress for this long; a downloader that died releases "
    "its lock at once and a waiter takes over.",
    min_value=0,
    min_inclusive=False,
)

# --- object stores ------------------------------------------------------------------------
PART_SIZE_BYTES = _knob(
    "part_size_bytes",
    64 * 2**20,
    "Largest multipart (S3) part, and the resumable (GCS) chunk: an S3 file smaller than "
    "upload_parts_in_flight such parts gets smaller ones (at least 5 MiB), so it still "
    "uploads that many at once.",
    min_value=1,
)
RETRY_ATTEMPTS = _knob(
    "retry_attempts",
    200,
    "Most tries of one request on a transient storage error (a backstop: retry_max_s governs).",
    min_value=1,
)
RETRY_MAX_S = _knob(
    "retry_max_s",
    120.0,
    "Keep retrying one request for this many seconds (rides out an outage this long, less "
    "one delay).",
    min_value=0,
)
RETRY_BASE_S = _knob(
    "retry_base_s",
    0.2,
    "First backoff delay; doubles each attempt, with jitter.",
    min_value=0,
)
RETRY_MAX_DELAY_S = _knob(
    "retry_max_delay_s",
    5.0,
    "Cap on one backoff delay (before jitter) between retries.",
    min_value=0,
)
UPLOAD_PARTS_IN_FLIGHT = _knob(
    "upload_parts_in_flight",
    4,
    "Parts of one file uploading at once (S3); a file's sink holds at most n+1 part buffers.",
    min_value=1,
)
READ_RANGES_IN_FLIGHT = _knob(
    "read_ranges_in_flight",
    8,
    "Ranged GETs of one file in flight when loading from object stores.",
    min_value=1,
)
READ_COALESCE_GAP_BYTES = _knob(
    "read_coalesce_gap_bytes",
    2**20,
    "Tensors at most this many bytes apart in a file are fetched by one ranged read.",
    min_value=0,
)

# --- async engine -------------------------------------------------------------------------
ARENAS_PER_RANK = _knob(
    "arenas_per_rank",
    0,
    "Most staging arenas per rank (0 = one, or two when memory_budget_bytes holds two copies; "
    "an explicit N without a budget allows N state copies).",
    min_value=0,
)
MEMORY_BUDGET_BYTES = _knob(
    "memory_budget_bytes",
    0,
    "Shared-memory staging bytes per checkpointer (0 = one state copy); a larger state is "
    "staged and streamed in pieces.",
    min_value=0,
)
COPY_THREADS = _knob(
    "copy_threads", 0, "Threads copying into the arena on CPU (0 = all cores).", min_value=0
)
INCREMENTAL = _knob(
    "incremental",
    True,
    "Frozen parameters get shards of their own; a shard unchanged since this checkpointer's "
    "last committed checkpoint is hard-linked / copied server-side, not rewritten.",
)
WRITER_START_TIMEOUT_S = _knob(
    "writer_start_timeout_s",
    60.0,
    "Wait this long for the node writer to start.",
    min_value=0,
    min_inclusive=False,
)
WRITER_TIMEOUT_S = _knob(
    "writer_timeout_s",
    300.0,
    "A node writer that made no progress on a trainer's in-flight saves for this long (no "
    "answer to pings, or no bytes handed to storage) is wedged: those saves fail with "
    "WriterDiedError and the next save starts a new writer. Also bounds each send to it.",
    min_value=0,
    min_inclusive=False,
)
CLOSE_TIMEOUT_S = _knob(
    "close_timeout_s",
    0.0,
    "close() waits at most this long for in-flight saves (0 = while the writer makes "
    "progress: a wedged writer fails them after writer_timeout_s).",
    min_value=0,
)
WRITER_NICE = _knob(
    "writer_nice",
    10,
    "nice() increment for the node writer process.",
    min_value=-20,
    max_value=19,
)
SHM_DIR = _knob("shm_dir", "/dev/shm", "Directory of POSIX shared memory segments.", nonempty=True)
COMMIT_TIMEOUT_S = _knob(
    "commit_timeout_s",
    1800.0,
    "Rank 0 waits this long for every rank's report.",
    min_value=0,
    min_inclusive=False,
)
CLAIM_LEASE_S = _knob(
    "claim_lease_s",
    120.0,
    "A checkpoint claim (in-progress marker) of a process on another host is live while it "
    "was refreshed within this many seconds; the saving process refreshes every quarter.",
    min_value=0,
    min_inclusive=False,
)
NODE_ID = _knob(
    "node_id",
    "",
    "Names the node writer socket and arenas; processes with the same id share one writer "
    "('' = per launched job: torchrun run id, Slurm job + step, MASTER_ADDR:MASTER_PORT; "
    "else per process).",
)
WRITER_SOCKET = _knob(
    "writer_socket", "", "Unix socket path of the node writer ('' = derived from the node id)."
)
WRITER_LINGER_S = _knob(
    "writer_linger_s",
    10.0,
    "The node writer exits after this long with no client and no job.",
    min_value=0,
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
    choices=("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET"),
)
