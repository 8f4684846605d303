"""``ckptsvc.dcp.StorageWriter``: DCP saves through ckptsvc's storage and commit protocol.

The call order, and which rank runs each step, is in the :mod:`ckptsvc.dcp` docstring.
This module also keeps this process's pending claims: a DCP save that fails on any rank
never reaches ``finish`` and DCP does not tell the storage layer, so rank 0 gives its
claim back (marked failed, for ``gc``) when the writer is garbage collected or when this
process saves the same directory again.
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
from torch.distributed.checkpoint import StorageWriter as _DcpWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ckptsvc.commit.target import SaveTarget, claim_target
from ckptsvc.dcp.format import (
    DATA_SUFFIX,
    METADATA_NAME,
    RawExtent,
    ReportedExtent,
    byte_view,
    checkpoint_url,
)
from ckptsvc.errors import CommitConflictError, ConfigError, CorruptCheckpointError
from ckptsvc.format.manifest import MANIFEST_NAME, ComponentRecord, FileRecord, Manifest
from ckptsvc.storage import Location
from ckptsvc.workers.commit import (
    abandon_checkpoint,
    begin_checkpoint,
    commit_checkpoint,
    publish_file,
    replacement_location,
    swap_in,
)
from ckptsvc.workers.latest_pointer import advance_pointer
from ckptsvc.workers.shard_writer import ChecksummedWriter

__all__ = ["StorageWriter"]

logger = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^checkpoint-(\d+)$")


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


class StorageWriter(_DcpWriter, BlockingAsyncStager):
    """A DCP ``StorageWriter`` that saves through ckptsvc (see :mod:`ckptsvc.dcp` for the
    call order and which rank runs each step).

    ``path``: the checkpoint directory (local path or fsspec URL), typically
    ``next_checkpoint_path(root, step)``; DCP's ``checkpoint_id`` replaces it.
    ``storage_options``: fsspec options. ``overwrite``: replace a committed checkpoint
    (written beside it, swapped in after it committed) instead of raising
    :class:`~ckptsvc.errors.CommitConflictError`. ``step``: recorded in the manifest
    (default: parsed from a ``checkpoint-<step>`` name). ``thread_count``: files (and
    writing threads) per rank.

    For ``dcp.async_save`` it is also its own stager, as DCP's ``FileSystemWriter`` is
    (``BlockingAsyncStager``: a CPU copy of the state on the calling thread), so both
    stage alike (without it DCP would stage through its ``DefaultStager``, which in
    process mode is slower to block and to finish).
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
        _DcpWriter.__init__(self)
        BlockingAsyncStager.__init__(self)
        if type(thread_count) is not int or thread_count < 1:
            raise ConfigError(f"thread_count must be a positive int, not {thread_count!r}")
        self._url = checkpoint_url(path)
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
            self._url = checkpoint_url(checkpoint_id)
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
            names = [f"{prefix}{i}{DATA_SUFFIX}" for i in range(len(bins))]
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
                if not isinstance(ext, ReportedExtent) or ext.file is None:
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
        manifest = Manifest.new(
            checkpoint_path=final.url,
            world_size=len(results),
            step=self._step if self._step is not None else _step_of(final),
            files=records,
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
        )
        commit_checkpoint(directory, manifest, claim_id=pending.target.claim_id)
        if pending.target.replace_url:
            swap_in(directory, final)
        advance_pointer(final, manifest)

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
    return byte_view(t)


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
            storage_data=ReportedExtent(
                ext.relative_path, ext.offset, ext.length, ext.dtype, ext.shape, file=record
            ),
        )
        for item, ext in extents
    ]
