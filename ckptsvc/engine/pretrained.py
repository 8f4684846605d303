"""Hugging Face-style model export (``CheckpointManager.save_model``), local or remote.

Order: refuse to overwrite an existing model unless asked; write ``config.json`` (the
model's ``config.save_pretrained``, else ``config.to_json_file``) and the preprocessor's
files; then the weights through the synchronous API (shards, index, manifest last), so
the directory becomes complete only once everything is there. On object stores the
config files are written to a temporary local directory and uploaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ckptsvc.engine.sync_save import save_checkpoint
from ckptsvc.errors import CommitConflictError, InvalidStateError
from ckptsvc.format.hf_files import pretrained_files
from ckptsvc.read.discovery import validate_checkpoint
from ckptsvc.stage.quantized import has_quantized_tensors

__all__ = ["save_pretrained"]

logger = logging.getLogger(__name__)


def save_pretrained(
    out: str,
    *,
    model: nn.Module,
    model_parts: Sequence[nn.Module] | None = None,
    preprocessor: Any = None,
    safetensors: bool = True,
    max_shard_size: int | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` (its ``model_parts`` merged, if several) to ``out`` for
    ``from_pretrained``. Raises :class:`CommitConflictError` if a model is there and
    ``overwrite`` is False; :class:`InvalidStateError` for torchao-quantized weights."""
    parts = list(model_parts) if model_parts else [model]
    opts = dict(storage_options or {})
    if not overwrite and validate_checkpoint(out, storage_options=opts):
        raise CommitConflictError(
            f"a model is already saved in {out}; pass overwrite_output_dir=True to replace it"
        )
    weights: dict[str, torch.Tensor] = {}
    for part in parts:
        weights.update(part.state_dict())
    if has_quantized_tensors(weights):
        raise InvalidStateError(
            "save_model cannot export torchao-quantized weights as plain Hugging Face files "
            "yet; save_checkpoint stores them (inner tensors + a JSON description)"
        )
    save_checkpoint(
        out,
        model if len(parts) == 1 else weights,
        safetensors=safetensors,
        max_shard_size=max_shard_size or 2**31,
        storage_options=opts,
        extra_files=pretrained_files(model, preprocessor=preprocessor),
    )
    logger.info("model exported to %s", out)
