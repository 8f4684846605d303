"""The on-storage format of ``ckptsvc.dcp`` checkpoints, shared by the writer and reader.

A checkpoint holds ``__<rank>_<i>.distcp`` files of raw bytes (each DCP item: a pickled
object's bytes, or a tensor chunk row-major and contiguous), DCP's ``.metadata`` (a
pickled ``torch.distributed.checkpoint.metadata.Metadata`` whose ``storage_data`` maps
each ``MetadataIndex`` to a :class:`RawExtent`) and the manifest. :class:`RawExtent` is
pickled by name into ``.metadata``: keep it here, under this name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ckptsvc.errors import ConfigError
from ckptsvc.format.manifest import FileRecord

__all__ = [
    "DATA_SUFFIX",
    "METADATA_NAME",
    "RawExtent",
    "ReportedExtent",
    "byte_view",
    "checkpoint_url",
]

#: DCP's metadata file (pickled ``Metadata``), published just before the manifest
METADATA_NAME = ".metadata"
#: the data files' suffix (DCP's)
DATA_SUFFIX = ".distcp"


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
class ReportedExtent(RawExtent):
    """A ``WriteResult``'s storage data on its way to the coordinator: the extent plus
    the record of the whole file (the coordinator lists it in the manifest; ``.metadata``
    gets the plain :class:`RawExtent`)."""

    file: FileRecord | None = None


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of the contiguous CPU tensor ``t`` (writable: it shares ``t``'s memory)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def checkpoint_url(path: str | os.PathLike[str]) -> str:
    """The checkpoint directory as text (a path or URL); an empty one is a ConfigError."""
    text = os.fspath(path)
    if not text:
        raise ConfigError("a DCP checkpoint path or URL must not be empty")
    return text
