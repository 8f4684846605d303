"""Reading checkpoint files: safetensors headers (bounded, validated), whole shards
(through :mod:`ckptsvc.read.shard_read`: one pass, ranged reads straight into the
tensors), JSON documents checked against the manifest, and legacy ``.bin`` files, which
load only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Collection
from typing import Any

import torch

from ckptsvc.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ckptsvc.format.json_doc import check_doc_against_manifest, parse_json_doc, read_doc_bytes
from ckptsvc.format.manifest import check_relpath
from ckptsvc.format.safetensors_stream import ShardLayout, header_length, parse_header
from ckptsvc.read.shard_read import read_shard
from ckptsvc.storage import Location

__all__ = ["check_inside", "read_safetensors", "read_safetensors_header", "read_torch_file"]

logger = logging.getLogger(__name__)
_FIRST_READ = 64 * 1024


def check_inside(ckpt: Location, loc: Location) -> None:
    """Refuse a local file that resolves (through symlinks) outside the checkpoint."""
    if ckpt.is_local:
        root = os.path.realpath(ckpt.path)
        real = os.path.realpath(loc.path)
        if not real.startswith(root + os.sep):
            raise CorruptCheckpointError(
                f"{loc.url} resolves to {real}, outside the checkpoint {root}: refusing to "
                "follow it"
            )


def read_checked_doc(ckpt: Location, rel_path: str, *, manifest: Any, what: str) -> Any:
    """A JSON document of ``ckpt``: inside it, read and parsed bounded, and (with a
    ``manifest``) of the size and CRC-32C its record says; else ``CorruptCheckpointError``."""
    loc = ckpt.join(check_relpath(rel_path, where=ckpt.url))
    check_inside(ckpt, loc)
    raw = read_doc_bytes(loc, what=what)
    check_doc_against_manifest(raw, rel_path=rel_path, url=loc.url, manifest=manifest, what=what)
    return parse_json_doc(raw, where=loc.url, what=what)


def read_safetensors_header(loc: Location) -> tuple[ShardLayout, int]:
    """Parse and validate a shard's header; returns (layout, file size)."""
    file_nbytes = loc.size()
    head = loc.read_range(0, min(file_nbytes, _FIRST_READ))
    n = header_length(head[:8], file_nbytes=file_nbytes, where=loc.url)
    if len(head) < 8 + n:
        head = loc.read_range(0, 8 + n)
    return parse_header(head, file_nbytes=file_nbytes, where=loc.url), file_nbytes


def read_safetensors(
    loc: Location,
    *,
    names: Collection[str] | None = None,
    device: str | torch.device = "cpu",
    layout: ShardLayout | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file (all, or those in ``names``), on ``device``.

    One pass straight into the tensors (:func:`~ckptsvc.read.shard_read.read_shard`; no
    checksum: the caller has no manifest record). Pass ``layout`` when the header was
    already read with :func:`read_safetensors_header` (saves a request on object stores).
    """
    if layout is None:
        layout, file_nbytes = read_safetensors_header(loc)
    else:
        file_nbytes = layout.file_nbytes
    if names is not None:
        names = [n for n in names if n in layout.by_name]
    tensors = read_shard(loc, layout, file_nbytes=file_nbytes, names=names).tensors
    target = torch.device(device)
    if target.type == "cpu":
        return tensors
    return {name: t.to(target) for name, t in tensors.items()}


def read_torch_file(
    loc: Location, *, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """A legacy pickled file, loaded with ``weights_only=True`` only (never arbitrary code)."""
    try:
        if loc.is_local:
            obj = torch.load(loc.path, map_location=device, weights_only=True, mmap=True)
        else:
            obj = torch.load(io.BytesIO(loc.read_bytes()), map_location=device, weights_only=True)
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{loc.url}: file listed in the checkpoint is missing") from e
    except Exception as e:  # truncated zip, UnpicklingError for a disallowed global, ...
        raise CorruptCheckpointError(
            f"{loc.url}: cannot load with torch.load(weights_only=True) ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptCheckpointError(f"{loc.url}: expected a dict of tensors")
    return obj
