"""Tensors <-> safetensors: dtype names and raw bytes (the torch side of
:mod:`ckptsvc.format.safetensors_stream`, which stays torch-free for the node writer)."""

from __future__ import annotations

import torch

from ckptsvc.errors import CorruptCheckpointError, InvalidStateError
from ckptsvc.format.safetensors_stream import TORCH_NAMES

__all__ = ["dtype_from_torch", "dtype_to_torch", "tensor_bytes"]


def dtype_from_torch(dtype: torch.dtype, *, name: str = "?") -> str:
    """The safetensors dtype name of a torch dtype; :class:`InvalidStateError` if none."""
    text = str(dtype).removeprefix("torch.")
    for st, tn in TORCH_NAMES.items():
        if tn == text:
            return st
    raise InvalidStateError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")


def dtype_to_torch(dtype: str) -> torch.dtype:
    try:
        return getattr(torch, TORCH_NAMES[dtype])
    except (KeyError, AttributeError) as e:
        raise CorruptCheckpointError(f"dtype {dtype!r} is not supported by this torch") from e


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor as a flat ``memoryview`` (copies only if non-contiguous)."""
    flat = t.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")
