"""``WriterOptions``: how the node writer writes one job, resolved in the trainer.

The trainer builds them once (``AsyncCheckpointer(..., writer_options=...)``, else
:meth:`WriterOptions.resolve`: ``CKPTSVC_*``, else defaults) and every ``SaveJob``
(``workers.protocol``) carries them; in the writer process the job thread
(``workers.job_runner``) turns them into the job's storage settings
(:meth:`WriterOptions.io_settings`) and its I/O pool. :data:`PER_JOB_VARIABLES` are their
environment variables: never part of a writer's identity (``workers.identity``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckptsvc import knobs
from ckptsvc.storage import IOSettings, RetryPolicy
from ckptsvc.storage.direct_io import DirectIOMode, direct_io_mode

__all__ = ["PER_JOB_VARIABLES", "WriterOptions"]


@dataclass(frozen=True)
class WriterOptions:
    """How the node writer writes one job: every per-job setting, resolved in the trainer.

    A writer serves jobs of several trainers at once; each job's own options apply to it
    alone (they reach storage through :class:`~ckptsvc.storage.IOSettings` on the job's
    ``Location``), and the writer reads none of these settings from its environment. Build
    with :meth:`resolve` (explicit value, else ``CKPTSVC_<FIELD>``, else the default); the
    constructor checks each value like the knob of the same name (``ConfigError``).

    - ``fsync``: fsync local shard files and directories before commit;
    - ``io_threads``: shards of this job written in parallel;
    - ``write_chunk_bytes``: bytes per write of a shard (and per CRC-32C step);
    - ``part_size_bytes`` / ``upload_parts_in_flight``: multipart (S3) and resumable (GCS)
      upload part size, and parts of one file uploading at once (S3);
    - ``retry_attempts`` / ``retry_max_s`` / ``retry_base_s`` / ``retry_max_delay_s``:
      retries of one storage request on a transient error (:class:`~ckptsvc.storage.RetryPolicy`);
    - ``direct_io`` (``"auto"`` | ``"on"`` | ``"off"``) / ``direct_io_min_bytes`` /
      ``direct_io_buffer_bytes``: ``O_DIRECT`` for local shard files.
    """

    fsync: bool = knobs.FSYNC.default
    io_threads: int = knobs.IO_THREADS.default
    write_chunk_bytes: int = knobs.WRITE_CHUNK_BYTES.default
    part_size_bytes: int = knobs.PART_SIZE_BYTES.default
    upload_parts_in_flight: int = knobs.UPLOAD_PARTS_IN_FLIGHT.default
    retry_attempts: int = knobs.RETRY_ATTEMPTS.default
    retry_max_s: float = knobs.RETRY_MAX_S.default
    retry_base_s: float = knobs.RETRY_BASE_S.default
    retry_max_delay_s: float = knobs.RETRY_MAX_DELAY_S.default
    direct_io: DirectIOMode = "auto"
    direct_io_min_bytes: int = knobs.DIRECT_IO_MIN_BYTES.default
    direct_io_buffer_bytes: int = knobs.DIRECT_IO_BUFFER_BYTES.default

    def __post_init__(self) -> None:
        for name, knob in _OPTION_KNOBS.items():
            value = getattr(self, name)
            checked = knob.check(value, source="argument")
            if name == "direct_io":
                checked = direct_io_mode(value)
            if checked != value or type(checked) is not type(value):
                object.__setattr__(self, name, checked)  # e.g. an int given for a float

    @classmethod
    def resolve(
        cls,
        *,
        fsync: bool | None = None,
        io_threads: int | None = None,
        write_chunk_bytes: int | None = None,
        part_size_bytes: int | None = None,
        upload_parts_in_flight: int | None = None,
        retry_attempts: int | None = None,
        retry_max_s: float | None = None,
        retry_base_s: float | None = None,
        retry_max_delay_s: float | None = None,
        direct_io: str | bool | None = None,
        direct_io_min_bytes: int | None = None,
        direct_io_buffer_bytes: int | None = None,
    ) -> WriterOptions:
        """Each option from its argument, else ``CKPTSVC_<NAME>`` in this process's
        environment (read now), else the default. A bad value raises ``ConfigError``
        naming the option or variable."""
        return cls(
            fsync=knobs.FSYNC.get(fsync),
            io_threads=knobs.IO_THREADS.get(io_threads),
            write_chunk_bytes=knobs.WRITE_CHUNK_BYTES.get(write_chunk_bytes),
            part_size_bytes=knobs.PART_SIZE_BYTES.get(part_size_bytes),
            upload_parts_in_flight=knobs.UPLOAD_PARTS_IN_FLIGHT.get(upload_parts_in_flight),
            retry_attempts=knobs.RETRY_ATTEMPTS.get(retry_attempts),
            retry_max_s=knobs.RETRY_MAX_S.get(retry_max_s),
            retry_base_s=knobs.RETRY_BASE_S.get(retry_base_s),
            retry_max_delay_s=knobs.RETRY_MAX_DELAY_S.get(retry_max_delay_s),
            direct_io=direct_io_mode(direct_io),
            direct_io_min_bytes=knobs.DIRECT_IO_MIN_BYTES.get(direct_io_min_bytes),
            direct_io_buffer_bytes=knobs.DIRECT_IO_BUFFER_BYTES.get(direct_io_buffer_bytes),
        )

    def io_settings(self) -> IOSettings:
        """The storage half of these options, for the job's ``Location``."""
        return IOSettings(
            fsync=self.fsync,
            write_chunk_bytes=self.write_chunk_bytes,
            part_size_bytes=self.part_size_bytes,
            upload_parts_in_flight=self.upload_parts_in_flight,
            direct_io=self.direct_io,
            direct_io_min_bytes=self.direct_io_min_bytes,
            direct_io_buffer_bytes=self.direct_io_buffer_bytes,
            retry=RetryPolicy(
                attempts=self.retry_attempts,
                max_s=self.retry_max_s,
                base_s=self.retry_base_s,
                max_delay_s=self.retry_max_delay_s,
            ),
        )


#: each option of :class:`WriterOptions` and the knob that checks it and names its variable
_OPTION_KNOBS: dict[str, knobs.Knob[Any]] = {
    "fsync": knobs.FSYNC,
    "io_threads": knobs.IO_THREADS,
    "write_chunk_bytes": knobs.WRITE_CHUNK_BYTES,
    "part_size_bytes": knobs.PART_SIZE_BYTES,
    "upload_parts_in_flight": knobs.UPLOAD_PARTS_IN_FLIGHT,
    "retry_attempts": knobs.RETRY_ATTEMPTS,
    "retry_max_s": knobs.RETRY_MAX_S,
    "retry_base_s": knobs.RETRY_BASE_S,
    "retry_max_delay_s": knobs.RETRY_MAX_DELAY_S,
    "direct_io": knobs.DIRECT_IO,
    "direct_io_min_bytes": knobs.DIRECT_IO_MIN_BYTES,
    "direct_io_buffer_bytes": knobs.DIRECT_IO_BUFFER_BYTES,
}
#: the environment variables whose settings travel with each job (not the writer's own)
PER_JOB_VARIABLES = frozenset(k.env_var for k in _OPTION_KNOBS.values())
