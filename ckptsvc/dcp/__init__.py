"""``torch.distributed.checkpoint`` (DCP) storage plugins that write and read through ckptsvc.

``dcp.save`` / ``dcp.async_save`` with ``storage_writer=StorageWriter(url)`` and
``dcp.load`` with ``storage_reader=StorageReader(url)`` keep DCP's planning (DTensor and
FSDP2 sharding, resharding on load) and put ckptsvc underneath: any fsspec URL through
:class:`~ckptsvc.storage.Location` (local disk, ``s3://``, ``gs://``), CRC-32C of every
file computed while it streams, and the commit protocol of DESIGN.md section 4, so
``find_latest_checkpoint``, ``verify_checkpoint``, ``ckptsvc ls``, retention and ``gc``
work on DCP checkpoints saved to ``<root>/checkpoints/checkpoint-<step>``.

Save: DCP's call order, and which rank (thread) runs each step:

1. ``StorageWriter(url)`` / ``reset(checkpoint_id)`` (every rank, the caller's thread):
   refuse a committed directory at once (:class:`~ckptsvc.errors.CommitConflictError`,
   unless ``overwrite=True``) - a cheap early check, raised before any collective;
2. ``set_up_storage_writer``, ``prepare_local_plan`` (every rank): nothing is written;
3. ``prepare_global_plan`` (the coordinator, rank 0; DCP runs it before it scatters the
   plans, so before any rank's ``write_data``): **claim** the directory
   (:func:`~ckptsvc.commit.target.claim_target`: exclusive in-progress marker; with
   ``overwrite`` a committed checkpoint gets its successor written beside it). The plans
   go out unchanged: DCP's plan caching replays old plans, so nothing may travel in them;
4. ``write_data`` (every rank; the thread that called ``dcp.save``, or DCP's upload thread
   for ``async_save``): work out the directory (the checkpoint, or with ``overwrite`` and a
   committed checkpoint its successor; every rank agrees, as nothing changes the
   checkpoint between the claim and ``finish``), stream this rank's items as raw bytes into
   ``__<rank>_<i>.distcp`` through :class:`~ckptsvc.workers.shard_writer.ChecksummedWriter`
   (fsync / completed upload before it returns); each ``WriteResult`` carries its extent
   and the file's size and CRC-32C back to the coordinator;
5. ``finish`` (the coordinator, after DCP gathered every rank's results): publish DCP's
   ``.metadata`` (pickled ``Metadata``), then the manifest **last** with the claim check
   (:func:`~ckptsvc.workers.commit.commit_checkpoint`), then swap a replacement in.

A save that fails on any rank never reaches ``finish``: no manifest, the marker stays
(incomplete, invisible to discovery). DCP does not tell the storage layer, so the
coordinator gives its claim back (marks it failed for ``gc``) when the writer is garbage
collected or when this process saves the same directory again.

DCP wraps errors raised inside its collectives (steps 2-5) in
``torch.distributed.checkpoint.api.CheckpointException``; the ckptsvc error is in its
``failures``. Step 1's error is raised as is.

Load: ``read_metadata`` (every rank) refuses an incomplete checkpoint
(:class:`~ckptsvc.errors.IncompleteCheckpointError`) and checks ``.metadata`` against the
manifest's size and CRC-32C before unpickling it; ``read_data`` (every rank) checks each
file's size against the manifest and reads the byte ranges it needs with
``Location.read_scattered``, straight into the destination tensor when the range is
contiguous on both sides (else into a buffer, then ``copy_``).

The files are raw tensor bytes (not ``torch.save`` blobs as DCP's ``FileSystemWriter``
writes): read them with :class:`StorageReader`.
"""

from __future__ import annotations

from ckptsvc.dcp.format import METADATA_NAME, RawExtent
from ckptsvc.dcp.reader import StorageReader
from ckptsvc.dcp.writer import StorageWriter

__all__ = ["METADATA_NAME", "RawExtent", "StorageReader", "StorageWriter"]
