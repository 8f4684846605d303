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
   (:func:`~ckptsvc.save_target.claim_target`: exclusive in-progress marker; with
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

import io
import logging
import os
import pickle
import re
import threading
import uuid
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint import StorageReader as _DcpReader
from torch.distributed.checkpoint import StorageWriter as _DcpWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .checksum import crc32c_hex
from .discovery import require_complete_checkpoint
from .errors import CommitConflictError, ConfigError, CorruptCheckpointError
from .manifest import MANIFEST_NAME, ComponentRecord, FileRecord, Manifest, now_iso
from .save_target import SaveTarget, claim_target
from .storage import Location
from .workers.commit import (
    abandon_checkpoint,
    begin_checkpoint,
    commit_checkpoint,
    publish_file,
    replacement_location,
    swap_in,
)
from .workers.shard_writer import ChecksummedWriter

__all__ = ["METADATA_NAME", "StorageReader", "StorageWriter"]

logger = logging.getLogger(__name__)

#: DCP's metadata file (pickled ``Metadata``), published just before the manifest
METADATA_NAME = ".metadata"
_SUFFIX = ".distcp"
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class RawExtent:
    """Where one DCP item's bytes are: a file of the checkpoint, offset and length; for a
    tensor chunk also its dtype and shape (row-major, contiguous)."""

    relative_path: str
    offset: int
    length: int
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class _ReportedExtent(RawExtent):
    """A ``WriteResult``'s storage data on its way to the coordinator: the extent plus
    the record of the whole file (the coordinator lists it in the manifest)."""

    file: FileRecord | None = None


@dataclass
class _Pending:
    """A claim of this process whose save has not reached ``finish``."""

    target: SaveTarget
    directory: Location
    thread: threading.Thread


_PENDING: dict[str, _Pending] = {}
_PENDING_LOCK = threading.Lock()


def _give_back(url: str, claim_id: str, reason: str) -> None:
    """Abandon the pending claim of ``url`` if it is still ``claim_id``'s (any thread)."""
    with _PENDING_LOCK:
        pending = _PENDING.get(url)
        if pending is None or pending.target.claim_id != claim_id:
            return
        del _PENDING[url]
    _abandon(pending, reason)


def _abandon(pending: _Pending, reason: str) -> None:
    abandon_checkpoint(pending.directory, reason, claim_id=pending.target.claim_id)
    pending.target.release()
    if pending.target.replace_url:
        try:
            pending.directory.remove(recursive=True, missing_ok=True)
        except Exception as e:  # best effort: gc collects it
            logger.warning("could not remove the failed replacement %s: %s", pending.directory, e)
    logger.info("gave back the claim of %s: %s", pending.directory.url, reason)


def _checkpoint_url(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if not text:
        raise ConfigError("a DCP checkpoint path or URL must not be empty")
    return text


class StorageWriter(_DcpWriter):
    """A DCP ``StorageWriter`` that saves through ckptsvc (see the module docstring for the
    call order and which rank runs each step).

    ``path``: the checkpoint directory (local path or fsspec URL), typically
    ``next_checkpoint_path(root, step)``; DCP's ``checkpoint_id`` replaces it.
    ``storage_options``: fsspec options. ``overwrite``: replace a committed checkpoint
    (written beside it, swapped in after it committed) instead of raising
    :class:`~ckptsvc.errors.CommitConflictError`. ``step``: recorded in the manifest
    (default: parsed from a ``checkpoint-<step>`` name). ``thread_count``: files (and
    writing threads) per rank.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        overwrite: bool = False,
        step: int | None = None,
        thread_count: int = 1,
    ) -> None:
        super().__init__()
        if type(thread_count) is not int or thread_count < 1:
            raise ConfigError(f"thread_count must be a positive int, not {thread_count!r}")
        self._url = _checkpoint_url(path)
        self._storage_options = dict(storage_options or {})
        self._overwrite = overwrite
        self._step = step
        self._thread_count = thread_count
        self._save_id = uuid.uuid4().hex
        self._is_coordinator = False
        self._rank = 0
        self._refuse_committed()

    # ---- DCP's calls, in order -------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Step 1 (every rank, before any collective): a new save; ``checkpoint_id`` (if
        given) is the directory. A committed directory raises
        :class:`~ckptsvc.errors.CommitConflictError` here unless ``overwrite``."""
        if checkpoint_id is not None:
            self._url = _checkpoint_url(checkpoint_id)
        self._save_id = uuid.uuid4().hex
        self._refuse_committed()

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Step 2 (every rank): remember the role; ``use_collectives=False`` (every rank
        committing alone) cannot follow the commit protocol and is refused."""
        self._is_coordinator = is_coordinator
        self._rank = int(kwargs.get("rank") or 0)
        if not kwargs.get("use_collectives", True):
            raise ConfigError(
                "ckptsvc.dcp.StorageWriter needs use_collectives=True: rank 0 commits the "
                "checkpoint from every rank's results"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Step 2 (every rank): nothing to add; nothing is written yet."""
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Step 3 (the coordinator, before any rank writes): claim the directory and tell
        every rank where to write. Raises :class:`~ckptsvc.errors.CommitConflictError`."""
        final = Location.parse(self._url, self._storage_options)
        with _PENDING_LOCK:
            old = _PENDING.get(final.url)
            if old is not None:
                if old.thread.is_alive() and old.thread is not threading.current_thread():
                    raise CommitConflictError(
                        f"{final.url}: another DCP save of this process is writing this "
                        "checkpoint; wait for it, or save under another step"
                    )
                del _PENDING[final.url]
        if old is not None:
            _abandon(old, "the save never reached finish() (it failed on some rank)")
        target = claim_target(
            self._url, storage_options=self._storage_options, overwrite=self._overwrite
        )
        directory = Location.parse(target.write_path, self._storage_options)
        with _PENDING_LOCK:
            _PENDING[final.url] = _Pending(target, directory, threading.current_thread())
        weakref.finalize(
            self, _give_back, final.url, target.claim_id, "the writer was dropped before finish()"
        )
        logger.debug("claimed %s for a DCP save of %d ranks", directory.url, len(plans))
        return plans  # nothing in them: DCP's plan caching would replay stale plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Step 4 (every rank): write this rank's items; durable when the future is set.

        The directory is the checkpoint, or with ``overwrite`` and a committed checkpoint
        its successor: every rank works that out alone (the coordinator's claim, and any
        swap of an earlier successor it finished, happened before DCP scattered the plans;
        nothing changes the checkpoint until ``finish``). Nothing travels in the plans:
        DCP's plan caching (``DefaultSavePlanner(enable_plan_caching=True)``) replays the
        first save's final plans on later saves.
        """
        directory = self._write_directory()
        prefix = f"__{self._rank}_"
        results: list[WriteResult] = []
        if plan.items:
            begin_checkpoint(directory)
            bins = _split(plan.items, self._thread_count)
            names = [f"{prefix}{i}{_SUFFIX}" for i in range(len(bins))]
            if len(bins) == 1:
                results = _write_file(directory, names[0], bins[0], planner)
            else:
                with ThreadPoolExecutor(len(bins), thread_name_prefix="ckptsvc-dcp") as pool:
                    futures = [
                        pool.submit(_write_file, directory, n, b, planner)
                        for n, b in zip(names, bins, strict=True)
                    ]
                    for f in futures:
                        results += f.result()
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_directory(self) -> Location:
        final = Location.parse(self._url, self._storage_options)
        if self._is_coordinator:
            with _PENDING_LOCK:
                pending = _PENDING.get(final.url)
            if pending is None:
                raise CommitConflictError(
                    f"{final.url}: this save holds no claim of the directory; not writing"
                )
            return pending.directory
        if self._overwrite and final.join(MANIFEST_NAME).exists():
            return replacement_location(final)
        return final

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Step 5 (the coordinator, every rank's results in hand): ``.metadata``, then the
        manifest last with the claim check, then swap a replacement in."""
        final = Location.parse(self._url, self._storage_options)
        with _PENDING_LOCK:
            pending = _PENDING.pop(final.url, None)
        if pending is None:
            raise CommitConflictError(
                f"{final.url}: this save holds no claim of the directory (another save of "
                "it started since); it is not committed"
            )
        try:
            self._commit(pending, final, metadata, results)
        except BaseException as e:
            _abandon(pending, f"commit failed: {e}")
            raise
        pending.target.release()

    def _commit(
        self,
        pending: _Pending,
        final: Location,
        metadata: Metadata,
        results: list[list[WriteResult]],
    ) -> None:
        files: dict[str, FileRecord] = {}
        storage_data: dict[MetadataIndex, RawExtent] = {}
        for rank_results in results:
            for wr in rank_results:
                ext = wr.storage_data
                if not isinstance(ext, _ReportedExtent) or ext.file is None:
                    raise CorruptCheckpointError(
                        f"{final.url}: a rank reported a write result without its file record"
                    )
                files[ext.file.path] = ext.file
                storage_data[wr.index] = RawExtent(
                    ext.relative_path, ext.offset, ext.length, ext.dtype, ext.shape
                )
        metadata.storage_data = storage_data
        metadata.storage_meta = self.storage_meta()
        directory = pending.directory
        meta_rec = publish_file(directory, METADATA_NAME, pickle.dumps(metadata))
        records = [*sorted(files.values(), key=lambda r: r.path), meta_rec]
        manifest = Manifest(
            checkpoint_path=final.url,
            world_size=len(results),
            timestamp=now_iso(),
            step=self._step if self._step is not None else _step_of(final),
            files=tuple(records),
            components=(
                ComponentRecord(
                    key="dcp",
                    sharing_pattern="per_rank",
                    ranks=tuple(range(len(results))),
                    size_bytes=sum(r.nbytes for r in records),
                    metadata={
                        "format": "torch.distributed.checkpoint",
                        "layout": "ckptsvc.dcp raw",
                        "metadata_file": METADATA_NAME,
                        "files": [r.path for r in records],
                    },
                ),
            ),
            pytorch_version=torch.__version__,
            library_version=_version(),
        )
        commit_checkpoint(directory, manifest, claim_id=pending.target.claim_id)
        if pending.target.replace_url:
            swap_in(directory, final)

    def storage_meta(self) -> StorageMeta | None:
        """DCP's request-level record: the checkpoint URL and this save's id."""
        return StorageMeta(checkpoint_id=self._url, save_id=self._save_id)

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint directory this save writes (a path or URL)."""
        return self._url

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Any path or URL (DCP only asks when it picks a writer itself, which it never
        picks this one for)."""
        return isinstance(checkpoint_id, (str, os.PathLike))

    def _refuse_committed(self) -> None:
        if self._overwrite:
            return
        loc = Location.parse(self._url, self._storage_options)
        if loc.join(MANIFEST_NAME).exists():
            raise CommitConflictError(
                f"{loc.url} is already committed; a save never rewrites a committed "
                "checkpoint: pass overwrite=True to replace it (the old one stays until the "
                "new one commits), or save under another step"
            )


def _version() -> str:
    from . import __version__

    return __version__


def _step_of(loc: Location) -> int | None:
    m = _STEP_RE.match(loc.name)
    return int(m.group(1)) if m else None


def _item_nbytes(item: WriteItem) -> int:
    if item.tensor_data is None:
        return 0
    numel = 1
    for s in item.tensor_data.chunk.sizes:  # this rank's chunk (``size`` is the global one)
        numel *= s
    return numel * torch._utils._element_size(item.tensor_data.properties.dtype)


def _split(items: Sequence[WriteItem], bins: int) -> list[list[WriteItem]]:
    """Items into at most ``bins`` files: bytes round robin, tensors to the lightest bin."""
    bins = max(1, min(bins, len(items)))
    out: list[list[WriteItem]] = [[] for _ in range(bins)]
    sizes = [0] * bins
    byte_items = [i for i in items if i.type == WriteItemType.BYTE_IO]
    tensor_items = sorted(
        (i for i in items if i.type != WriteItemType.BYTE_IO), key=_item_nbytes, reverse=True
    )
    for n, item in enumerate(byte_items):
        out[n % bins].append(item)
    for item in tensor_items:
        k = sizes.index(min(sizes))
        out[k].append(item)
        sizes[k] += _item_nbytes(item)
    return [b for b in out if b]


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (made contiguous, on the CPU), row-major."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _write_file(
    directory: Location, rel: str, items: list[WriteItem], planner: SavePlanner
) -> list[WriteResult]:
    """One file of one rank (its writing thread): bytes items first, then tensors."""
    blobs: list[tuple[WriteItem, memoryview]] = []
    for item in items:
        if item.type == WriteItemType.BYTE_IO:
            data = planner.resolve_data(item)
            if not isinstance(data, io.BytesIO):
                raise ConfigError(f"DCP resolved the bytes item {item.index.fqn} to {type(data)}")
            blobs.append((item, data.getbuffer()))
    tensors = [i for i in items if i.type != WriteItemType.BYTE_IO]
    total = sum(b.nbytes for _, b in blobs) + sum(_item_nbytes(i) for i in tensors)
    out = ChecksummedWriter(directory.join(rel), rel_path=rel, size_hint_bytes=total)
    extents: list[tuple[WriteItem, RawExtent]] = []
    try:
        for item, blob in blobs:
            extents.append((item, RawExtent(rel, out.nbytes, blob.nbytes)))
            out.write(blob)
        for item in tensors:
            data = planner.resolve_data(item)  # lazily: it may copy off the device
            if not isinstance(data, torch.Tensor) or item.tensor_data is None:
                raise ConfigError(f"DCP resolved the tensor item {item.index.fqn} to {type(data)}")
            view = _tensor_bytes(data)
            if view.nbytes != _item_nbytes(item):
                raise ConfigError(
                    f"DCP item {item.index.fqn}: {view.nbytes} bytes, its plan says "
                    f"{_item_nbytes(item)}"
                )
            shape = tuple(int(s) for s in item.tensor_data.chunk.sizes)
            extents.append((item, RawExtent(rel, out.nbytes, view.nbytes, data.dtype, shape)))
            out.write(view)
        record = out.finish()
    except BaseException:
        out.abort()
        raise
    return [
        WriteResult(
            index=item.index,
            size_in_bytes=ext.length,
            storage_data=_ReportedExtent(
                ext.relative_path, ext.offset, ext.length, ext.dtype, ext.shape, file=record
            ),
        )
        for item, ext in extents
    ]


# ---- reading ---------------------------------------------------------------------------------


class StorageReader(_DcpReader):
    """A DCP ``StorageReader`` for checkpoints written by :class:`StorageWriter`.

    Call order (DCP's; every step on every rank): ``reset(checkpoint_id)``,
    ``read_metadata`` (refuses an incomplete checkpoint, checks ``.metadata`` against the
    manifest), ``set_up_storage_reader``, ``prepare_local_plan`` /
    ``prepare_global_plan`` (the coordinator; nothing to add), ``read_data`` (ranged
    reads, sizes checked against the manifest). Resharding is DCP's planner's: each rank
    reads only the ranges its own layout needs.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self._url = _checkpoint_url(path)
        self._storage_options = dict(storage_options or {})
        self._manifest: Manifest | None = None
        self._storage_data: dict[MetadataIndex, RawExtent] = {}
        self._refuse_incomplete()

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """A new load (every rank, before any collective); ``checkpoint_id`` (if given) is
        the directory. An incomplete checkpoint raises
        :class:`~ckptsvc.errors.IncompleteCheckpointError` here, unwrapped (DCP would turn
        the same error in ``read_metadata`` into its ``CheckpointException``)."""
        if checkpoint_id is not None:
            self._url = _checkpoint_url(checkpoint_id)
        self._manifest = None
        self._storage_data = {}
        self._refuse_incomplete()

    def _refuse_incomplete(self) -> None:
        require_complete_checkpoint(Location.parse(self._url, self._storage_options))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Every rank: the manifest must exist (else
        :class:`~ckptsvc.errors.IncompleteCheckpointError` /
        :class:`~ckptsvc.errors.CheckpointNotFoundError`); ``.metadata`` must match its
        manifest record (else :class:`~ckptsvc.errors.CorruptCheckpointError`)."""
        ckpt = Location.parse(self._url, self._storage_options)
        manifest = require_complete_checkpoint(ckpt)
        rec = manifest.file(METADATA_NAME)
        if rec is None:
            raise CorruptCheckpointError(
                f"{ckpt.url} is a complete checkpoint but not a DCP one (its manifest lists no "
                f"{METADATA_NAME}); load it with ckptsvc.load_state / load_components"
            )
        raw = ckpt.join(METADATA_NAME).read_bytes()
        if len(raw) != rec.nbytes or crc32c_hex(raw) != rec.crc32c:
            raise CorruptCheckpointError(
                f"{ckpt.join(METADATA_NAME).url}: {len(raw)} bytes, CRC-32C {crc32c_hex(raw)}; "
                f"the manifest says {rec.nbytes} bytes, {rec.crc32c}"
            )
        metadata = pickle.loads(raw)  # checked against the manifest: the bytes we wrote
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise CorruptCheckpointError(f"{ckpt.url}: {METADATA_NAME} is not DCP metadata")
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = uuid.uuid4().hex
        metadata.storage_meta = storage_meta
        self._manifest = manifest
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        """Every rank: where each item is, each extent checked to lie inside its file."""
        manifest = self._require_manifest()
        data = metadata.storage_data
        for index, ext in data.items():
            if not isinstance(ext, RawExtent):
                raise CorruptCheckpointError(
                    f"{self._url}: {index.fqn} has no ckptsvc extent (was this checkpoint "
                    "written by DCP's FileSystemWriter? read it with FileSystemReader)"
                )
            rec = manifest.file(ext.relative_path)
            if rec is None or ext.offset < 0 or ext.offset + ext.length > rec.nbytes:
                raise CorruptCheckpointError(
                    f"{self._url}: {index.fqn} lies at {ext.relative_path}"
                    f"[{ext.offset}:{ext.offset + ext.length}], outside the file the manifest "
                    "lists"
                )
        self._storage_data = data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Every rank: nothing to add."""
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """The coordinator: nothing to add."""
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Every rank (the thread that called ``dcp.load``): read every item of ``plan``;
        done when the future is set."""
        ckpt = Location.parse(self._url, self._storage_options)
        manifest = self._require_manifest()
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self._storage_data[item.storage_index].relative_path, []).append(
                item
            )
        for rel, items in sorted(per_file.items()):
            loc = ckpt.join(rel)
            rec = manifest.file(rel)
            size = loc.size()
            if rec is None or size != rec.nbytes:
                raise CorruptCheckpointError(
                    f"{loc.url} has {size} bytes, the manifest says "
                    f"{rec.nbytes if rec else 'nothing of it'}"
                )
            self._read_file(loc, items, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_file(self, loc: Location, items: list[ReadItem], planner: LoadPlanner) -> None:
        """All of ``items`` from one file: one ``read_scattered`` call (parallel ranges),
        then the copies out of buffers and DCP's commit of each item."""
        extents: list[tuple[int, memoryview]] = []
        blobs: list[tuple[ReadItem, bytearray]] = []
        tensors: list[tuple[ReadItem, torch.Tensor, torch.Tensor | None]] = []
        for item in items:
            ext = self._storage_data[item.storage_index]
            if item.type == LoadItemType.BYTE_IO:
                blob = bytearray(ext.length)
                extents.append((ext.offset, memoryview(blob)))
                blobs.append((item, blob))
                continue
            if ext.dtype is None or ext.shape is None:
                raise CorruptCheckpointError(f"{loc.url}: {item.storage_index.fqn} has no shape")
            target = planner.resolve_tensor(item).detach()
            offset, nbytes = _contiguous_range(ext, item)
            if (
                offset is not None
                and target.dtype == ext.dtype
                and target.device.type == "cpu"
                and target.is_contiguous()
                and target.numel() * target.element_size() == nbytes
            ):
                if nbytes:  # straight into the destination tensor
                    extents.append((ext.offset + offset, _tensor_bytes_writable(target)))
                tensors.append((item, target, None))
                continue
            rows, start = _row_range(ext, item)
            buf = torch.empty((rows, *ext.shape[1:]) if ext.shape else (), dtype=ext.dtype)
            if buf.numel():
                extents.append((ext.offset + start, _tensor_bytes_writable(buf)))
            tensors.append((item, target, buf))
        if extents:
            loc.read_scattered(extents)
        for item, blob in blobs:
            planner.load_bytes(item, io.BytesIO(bytes(blob)))
        for item, target, staged in tensors:
            if staged is not None:
                src = staged
                for dim, (o, n) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                    src = src.narrow(dim, o if dim else 0, n)
                target.copy_(src)
            planner.commit_tensor(item, target)

    def _require_manifest(self) -> Manifest:
        if self._manifest is None:
            raise ConfigError("DCP called the reader before read_metadata")
        return self._manifest

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint directory this load reads (a path or URL)."""
        return self._url

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Any path or URL."""
        return isinstance(checkpoint_id, (str, os.PathLike))


def _tensor_bytes_writable(t: torch.Tensor) -> memoryview:
    """A writable byte view of the contiguous CPU tensor ``t``'s memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _strides(shape: Sequence[int]) -> list[int]:
    out = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        out[d] = out[d + 1] * int(shape[d + 1])
    return out


def _contiguous_range(ext: RawExtent, item: ReadItem) -> tuple[int | None, int]:
    """(byte offset in the extent, byte count) of the box ``item`` reads, if the box is one
    contiguous range of the row-major chunk; ``(None, 0)`` otherwise."""
    shape = ext.shape or ()
    lengths, offsets = list(item.lengths), list(item.storage_offsets)
    if len(lengths) != len(shape):
        raise CorruptCheckpointError(f"{item.storage_index.fqn}: read box and chunk disagree")
    elem = torch._utils._element_size(ext.dtype) if ext.dtype is not None else 1
    numel = 1
    for n in lengths:
        numel *= n
    free = next((d for d in range(len(shape)) if lengths[d] != 1), len(shape))
    for d in range(free + 1, len(shape)):
        if offsets[d] != 0 or lengths[d] != shape[d]:
            return None, 0
    start = sum(o * s for o, s in zip(offsets, _strides(shape), strict=True))
    if (start + numel) * elem > ext.length:
        raise CorruptCheckpointError(f"{item.storage_index.fqn}: read box outside its chunk")
    return start * elem, numel * elem


def _row_range(ext: RawExtent, item: ReadItem) -> tuple[int, int]:
    """For a box that is not contiguous: (rows of dim 0, byte offset) of the smallest run
    of whole dim-0 rows that holds it."""
    shape = ext.shape or ()
    elem = torch._utils._element_size(ext.dtype) if ext.dtype is not None else 1
    if not shape:
        return 1, 0
    row = _strides(shape)[0] * elem
    first, rows = int(item.storage_offsets[0]), int(item.lengths[0])
    if (first + rows) * row > ext.length:
        raise CorruptCheckpointError(f"{item.storage_index.fqn}: read box outside its chunk")
    return rows, first * row
