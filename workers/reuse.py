"""Incremental saves in the node writer: materialise an unchanged shard from the previous
checkpoint (hard link, S3 CopyObject, GCS rewrite) instead of writing its bytes again.

A trainer that knows its last committed checkpoint (the *base*) sends ``SaveJob.base_url``
and ``SaveJob.base_files``: the base's records of the files it expects may be unchanged
(shards that hold only frozen parameters). Call order (writer process):

1. :meth:`ReuseSource.open` (job thread, after ``begin_checkpoint``): the base is usable
   only if it is another checkpoint on the same store and still committed (its manifest
   exists: one stat). Otherwise ``None`` and every file is written.
2. :meth:`ReuseSource.try_reuse` (I/O thread, per shard, before any byte is written): a
   base record of the same path and size whose CRC-32C equals the CRC-32C of the new
   file's bytes (header + arena data, ~14 GB/s) is copied server-side from the base and
   checked (size; the store's CRC-32C where it keeps one). It returns the record - the
   same as writing would produce - or ``None``, and the caller writes the bytes.

Reuse never fails a save: any surprise (the base deleted meanwhile by retention, a copy
the store refuses, a size or checksum that does not match) logs and falls back to
writing from the arena. Local disk: a failed link also falls back to writing (a plain
copy would read the base and write as many bytes as the arena write does).

Equality is decided by size + CRC-32C of the whole file (header included, so names,
dtypes and shapes match exactly); a changed file of the same size has a 2^-32 chance of
the same CRC-32C. Local checkpoints then share inodes: nothing in ckptsvc modifies a
committed file in place (retention and ``gc`` unlink; writes go to fresh files;
:class:`~ckptsvc.storage.sinks.LocalSink` unlinks a path before writing it, so a link breaks).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ckptsvc.errors import CheckpointError, CorruptCheckpointError
from ckptsvc.format.checksum import Crc32c
from ckptsvc.format.manifest import MANIFEST_NAME, FileRecord
from ckptsvc.storage import Location
from ckptsvc.storage.copies import copy_file, same_store

from .protocol import FileJob, SaveJob

__all__ = ["ReuseSource", "file_crc32c"]

logger = logging.getLogger(__name__)


def file_crc32c(fj: FileJob, data: memoryview, *, chunk_nbytes: int) -> str:
    """CRC-32C of the shard ``fj`` would write: its header, then ``data`` (its arena
    bytes), ``chunk_nbytes`` at a time."""
    crc = Crc32c()
    crc.update(fj.layout.header)
    step = chunk_nbytes
    for start in range(0, data.nbytes, step):
        crc.update(data[start : start + step])
    return crc.hexdigest()


@dataclass(frozen=True)
class ReuseSource:
    """A committed base checkpoint that files of one job may be copied from."""

    base: Location
    ckpt: Location
    records: dict[str, FileRecord]
    chunk_nbytes: int

    @classmethod
    def open(cls, job: SaveJob, ckpt: Location) -> ReuseSource | None:
        """The job's base, if it is usable (see the module docstring); never raises."""
        if not job.base_url or not job.base_files:
            return None
        try:
            base = Location.parse(job.base_url, job.storage_options, settings=ckpt.settings)
            if base.url.rstrip("/") == ckpt.url.rstrip("/") or not same_store(base, ckpt):
                logger.debug("base %s cannot serve %s", base.url, ckpt.url)
                return None
            if not base.join(MANIFEST_NAME).exists():
                logger.info(
                    "base checkpoint %s is no longer committed; writing every file", base.url
                )
                return None
        except (CheckpointError, OSError, ValueError) as e:
            logger.info("base checkpoint %s unusable (%s); writing every file", job.base_url, e)
            return None
        return cls(
            base=base,
            ckpt=ckpt,
            records={r.path: r for r in job.base_files},
            chunk_nbytes=job.options.write_chunk_bytes,
        )

    def try_reuse(
        self, fj: FileJob, arena: memoryview, cancelled: threading.Event
    ) -> FileRecord | None:
        """The file's record if it was materialised from the base, else ``None``."""
        rec = self.records.get(fj.rel_path)
        if rec is None or rec.nbytes != fj.layout.file_nbytes or cancelled.is_set():
            return None  # a cancelled job stops at the write's first chunk
        data = arena[fj.arena_offset : fj.arena_offset + fj.layout.data_nbytes]
        try:
            if data.nbytes != fj.layout.data_nbytes:
                return None  # the writer's own check reports it
            crc = file_crc32c(fj, data, chunk_nbytes=self.chunk_nbytes)
        finally:
            data.release()
        if crc != rec.crc32c:
            logger.debug("%s changed since %s; writing it", fj.rel_path, self.base.url)
            return None
        src, dst = self.base.join(fj.rel_path), self.ckpt.join(fj.rel_path)
        try:
            method = copy_file(src, dst, allow_plain_copy=False, nbytes=rec.nbytes)
            if method is None:
                return None
            size = dst.size()
            if size != rec.nbytes:
                raise CorruptCheckpointError(
                    f"{dst.url}: copy has {size} bytes, expected {rec.nbytes}"
                )
            stored = dst.stored_crc32c()
            if stored is not None and stored != rec.crc32c:
                raise CorruptCheckpointError(
                    f"{dst.url}: copy has CRC-32C {stored}, expected {rec.crc32c}"
                )
        except (CheckpointError, OSError) as e:
            logger.info("could not reuse %s from %s (%s); writing it", fj.rel_path, src.url, e)
            return None
        logger.debug("reused %s from %s (%s)", fj.rel_path, src.url, method.value)
        return FileRecord(fj.rel_path, rec.nbytes, rec.crc32c)
