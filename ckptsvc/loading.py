"""Read tensors from checkpoint files into preallocated tensors by byte range.

Safetensors shards are never downloaded whole or copied twice: the header is read with
a bounded read and validated, each wanted tensor is allocated once, and its bytes are read
straight into its memory (``preadv`` locally, ranged GETs on object stores), several
tensors in parallel. Legacy ``.bin`` files load only through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

import torch

from . import knobs
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from .safetensors_stream import (
    ShardLayout,
    TensorEntry,
    dtype_to_torch,
    header_length,
    parse_header,
)
from .storage import Location

__all__ = ["read_safetensors", "read_safetensors_header", "read_torch_file"]

logger = logging.getLogger(__name__)
_FIRST_READ = 64 * 1024


def read_safetensors_header(loc: Location) -> tuple[ShardLayout, int]:
    """Parse and validate a shard's header; returns (layout, file size)."""
    file_nbytes = loc.size()
    head = loc.read_range(0, min(file_nbytes, _FIRST_READ))
    n = header_length(head[:8], file_nbytes=file_nbytes, where=loc.url)
    if len(head) < 8 + n:
        head = loc.read_range(0, 8 + n)
    return parse_header(head, file_nbytes=file_nbytes, where=loc.url), file_nbytes


def _read_entry(loc: Location, layout: ShardLayout, e: TensorEntry) -> torch.Tensor:
    t = torch.empty(e.shape, dtype=dtype_to_torch(e.dtype))
    if e.nbytes:
        view = t.reshape(-1).view(torch.uint8).numpy().data.cast("B")
        step = knobs.READ_CHUNK_BYTES.get()
        for start in range(0, e.nbytes, step):
            loc.read_into(layout.data_offset + e.begin + start, view[start : start + step])
    return t


def read_safetensors(
    loc: Location,
    *,
    names: Collection[str] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file (all, or those in ``names``), on ``device``."""
    layout, _ = read_safetensors_header(loc)
    wanted = [e for e in layout.entries if names is None or e.name in names]
    threads = max(1, min(knobs.IO_THREADS.get(), len(wanted)))
    if threads == 1 or (loc.is_local and sum(e.nbytes for e in wanted) < (64 << 20)):
        tensors = [_read_entry(loc, layout, e) for e in wanted]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            tensors = list(pool.map(lambda e: _read_entry(loc, layout, e), wanted))
    out = {}
    target = torch.device(device)
    for e, t in zip(wanted, tensors, strict=True):
        out[e.name] = t if target.type == "cpu" else t.to(target)
    return out


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
