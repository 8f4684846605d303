"""A shard straight into device memory: :func:`read_to_device`.

The file's bytes pass through two pinned host buffers of ``CKPTSVC_LOAD_STAGING_BYTES``
each. While chunk *k* is copied to the device on a side CUDA stream (asynchronous: pinned
memory, ``non_blocking=True``), chunk *k + 1* is read from storage into the other buffer by
parallel ranged reads; a buffer is refilled only after the copy out of it has finished
(a CUDA event). The CRC-32C of each chunk is taken while it sits in the staging buffer,
so the file is still read once and checked whole. Tensors that do not fit in place get
fresh device memory.

Without CUDA (``device`` is the CPU, or torch has no CUDA), the same pipeline runs with
ordinary host buffers and synchronous copies: that is how it is tested on CPU-only
machines. The loaders take this path only for a CUDA target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ckptsvc import knobs
from ckptsvc.format.safetensors_stream import ShardLayout, TensorEntry
from ckptsvc.read.shard_read import Checksums, check_crc
from ckptsvc.stage.tensors import dtype_to_torch
from ckptsvc.storage import Location

__all__ = ["read_to_device"]


def _dest_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _target(entry: TensorEntry, dest: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    dtype = dtype_to_torch(entry.dtype)
    if (
        dest is not None
        and dest.device == device
        and dest.dtype == dtype
        and tuple(dest.shape) == entry.shape
        and dest.is_contiguous()
    ):
        return dest
    return torch.empty(entry.shape, dtype=dtype, device=device)


def read_to_device(
    loc: Location,
    layout: ShardLayout,
    *,
    device: torch.device,
    file_nbytes: int,
    entries: Sequence[TensorEntry],
    destinations: Mapping[str, torch.Tensor] | None = None,
    expected_crc32c: str | None = None,
    staging_nbytes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors ``entries`` of one shard on ``device``, through double-buffered staging
    (module doc); ``destinations`` on ``device`` are filled in place where they fit."""
    dests = destinations or {}
    out = {e.name: _target(e, dests.get(e.name), device) for e in entries}
    data = layout.data_offset
    if expected_crc32c is not None:  # the whole file passes through staging: checked whole
        lo, hi = data, file_nbytes
    elif entries:
        lo, hi = data + min(e.begin for e in entries), data + max(e.end for e in entries)
    else:
        return out
    step = max(4096, staging_nbytes or knobs.LOAD_STAGING_BYTES.get())
    cuda = device.type == "cuda" and torch.cuda.is_available()
    buffers = [
        torch.empty(min(step, hi - lo), dtype=torch.uint8, pin_memory=cuda) for _ in range(2)
    ]
    events: list[Any] = [None, None]
    stream: Any = torch.cuda.Stream(device) if cuda else None
    pieces = sorted(entries, key=lambda e: e.begin)
    with ThreadPoolExecutor(2, thread_name_prefix="ckptsvc-load-crc") as pool:
        checksums = Checksums(pool) if expected_crc32c is not None else None
        try:
            for k, start in enumerate(range(lo, hi, step)):
                end = min(hi, start + step)
                buf = buffers[k % 2][: end - start]
                if events[k % 2] is not None:
                    events[k % 2].synchronize()  # the copy out of this buffer is done
                if checksums is not None:
                    checksums.wait()  # and its checksum
                view = buf.numpy().data.cast("B")
                loc.read_scattered(
                    [(start, view)], on_range=checksums.on_range if checksums else None
                )
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    for e in pieces:
                        a, b = max(start, data + e.begin), min(end, data + e.end)
                        if a < b:
                            dst = _dest_bytes(out[e.name])[a - data - e.begin : b - data - e.begin]
                            dst.copy_(buf[a - start : b - start], non_blocking=cuda)
                    if cuda:
                        events[k % 2] = torch.cuda.Event()
                        events[k % 2].record(stream)
        finally:
            if cuda:
                stream.synchronize()
            if checksums is not None:
                with contextlib.suppress(Exception):
                    checksums.wait()
        if cuda:
            torch.cuda.current_stream(device).wait_stream(stream)
        if checksums is not None and expected_crc32c is not None:
            got = checksums.file_crc(layout.header, file_nbytes, loc.url)
            check_crc(got, expected_crc32c, loc.url)
    return out
