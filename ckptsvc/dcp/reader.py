"""``ckptsvc.dcp.StorageReader``: DCP loads of checkpoints written by
:class:`~ckptsvc.dcp.StorageWriter`, by ranged reads straight into the destination tensors.
"""

from __future__ import annotations

import io
import os
import pickle
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint import StorageReader as _DcpReader
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.futures import Future

from ckptsvc.dcp.format import (
    METADATA_NAME,
    RawExtent,
    byte_view,
    checkpoint_url,
)
from ckptsvc.errors import ConfigError, CorruptCheckpointError
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.format.manifest import Manifest
from ckptsvc.read.discovery import require_complete_checkpoint
from ckptsvc.storage import Location

__all__ = ["StorageReader"]


class StorageReader(_DcpReader):
    """A DCP ``StorageReader`` for checkpoints written by :class:`~ckptsvc.dcp.StorageWriter`.

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
        self._url = checkpoint_url(path)
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
            self._url = checkpoint_url(checkpoint_id)
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
        metadata = _load_metadata(raw, where=ckpt.join(METADATA_NAME).url)
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
                    extents.append((ext.offset + offset, byte_view(target)))
                tensors.append((item, target, None))
                continue
            rows, start = _row_range(ext, item)
            buf = torch.empty((rows, *ext.shape[1:]) if ext.shape else (), dtype=ext.dtype)
            if buf.numel():
                extents.append((ext.offset + start, byte_view(buf)))
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


_DCP_METADATA = "torch.distributed.checkpoint.metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` pickle, restricted to the classes it is made of: DCP's metadata
    dataclasses, torch dtypes, ``torch.Size``, the layout helper and our extent record.
    Anything else (``os.system``, ``builtins.eval``) is refused, even in a checkpoint whose
    manifest vouches for the bytes."""

    def find_class(self, module: str, name: str) -> Any:
        if module == _DCP_METADATA and not name.startswith("__"):
            return super().find_class(module, name)
        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        if (module, name) in (
            ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict"),
        ):
            return super().find_class(module, name)
        if module == "ckptsvc.dcp.format" and name == "RawExtent":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_metadata(raw: bytes, *, where: str) -> Any:
    """DCP metadata from ``raw`` through :class:`_MetadataUnpickler`."""
    try:
        return _MetadataUnpickler(io.BytesIO(raw)).load()
    except Exception as e:
        raise CorruptCheckpointError(f"{where}: not DCP metadata this reader accepts: {e}") from e
