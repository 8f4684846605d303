"""The "model" component: one module, or several (pipeline stages), as one flat state dict.

Save (training thread, inside ``CheckpointManager.save_checkpoint``):

1. merge the parts' state dicts (their keys must be disjoint);
2. split torchao-quantized weights into inner tensors + a JSON description
   (:mod:`ckptsvc.stage.quantized`); the manager records the description in the checkpoint's
   metadata.

Load (the thread that calls ``load_checkpoint``):

1. rebuild quantized tensors from the description (if the checkpoint has one);
2. check keys: a module key the checkpoint lacks is an error unless it is a tied alias of
   a stored key; a checkpoint key no part has is an error;
3. copy plain tensors *in place* (``load_state_dict(strict=False)``): parameters keep
   their identity and device, so an optimizer built on them stays valid;
4. install quantized tensors by assignment, on the device the module's parameter is on;
5. re-tie the tied groups that the checkpoint still ties.

A group the module ties but the checkpoint stores as two different plain tensors cannot
be loaded in place (both would land in one storage): that is a :class:`StateMismatchError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ckptsvc.errors import CheckpointError, ConfigError, StateMismatchError
from ckptsvc.stage.quantized import (
    QuantizedSplit,
    install_quantized,
    is_quantized_tensor,
    join_quantized,
    split_quantized,
)
from ckptsvc.stage.tied_params import create_sharing_metadata, retie_parameters

__all__ = ["ModelState"]

logger = logging.getLogger(__name__)


class ModelState:
    """Stateful over ``parts`` (see the module docstring for the save and load steps)."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        if not parts:
            raise ConfigError("ModelState needs at least one module")
        self.parts = list(parts)
        self._description: Mapping[str, Any] = {}
        self.where = "checkpoint"

    # ---- save -----------------------------------------------------------------------------

    def snapshot(self) -> QuantizedSplit:
        """The merged state dict, quantized weights split (no tensor is copied)."""
        merged: dict[str, torch.Tensor] = {}
        for i, part in enumerate(self.parts):
            sd = part.state_dict()
            clash = sorted(set(sd) & set(merged))
            if clash:
                raise ConfigError(
                    f"model part {i} repeats keys of an earlier part, e.g. {clash[:4]}; "
                    "model parts must hold disjoint parameters"
                )
            merged.update(sd)
        return split_quantized(merged)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.snapshot().tensors

    # ---- load -----------------------------------------------------------------------------

    def expect(self, description: Mapping[str, Any] | None, *, where: str) -> None:
        """Set the quantized-tensor description of the checkpoint about to be loaded."""
        self._description = dict(description or {})
        self.where = where

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        sd = join_quantized(
            {k: v for k, v in state_dict.items()}, self._description, where=self.where
        )
        claimed: set[str] = set()
        for part in self.parts:
            claimed |= self._load_part(part, sd)
        unexpected = sorted(set(sd) - claimed)
        if unexpected:
            raise StateMismatchError(
                f"{self.where}: {len(unexpected)} checkpoint tensors match no model parameter, "
                f"e.g. {unexpected[:8]} (a different model, or a changed architecture)"
            )

    def _load_part(self, part: nn.Module, sd: Mapping[str, Any]) -> set[str]:
        keys = list(part.state_dict().keys())
        groups = create_sharing_metadata(part)
        tied_alias: set[str] = set()
        keep_tied: list[list[str]] = []
        for group in groups:
            present = [n for n in group if n in sd]
            if not present:
                continue
            distinct = {id(sd[n]): n for n in present if not is_quantized_tensor(sd[n])}
            if len(distinct) > 1 and not _all_equal([sd[n] for n in distinct.values()]):
                raise StateMismatchError(
                    f"{self.where}: the model ties {group} but the checkpoint stores different "
                    "values for them; untie them in the model before loading"
                )
            tied_alias.update(n for n in group if n not in sd)
            if len({id(sd[n]) for n in present}) == 1:
                keep_tied.append([present[0], *[n for n in group if n != present[0]]])
        missing = sorted(k for k in keys if k not in sd and k not in tied_alias)
        if missing:
            raise StateMismatchError(
                f"{self.where}: the checkpoint has no entry for {len(missing)} model keys, "
                f"e.g. {missing[:8]}"
            )
        mine = {k: sd[k] for k in keys if k in sd}
        quantized = {k: v for k, v in mine.items() if is_quantized_tensor(v)}
        plain = {k: v for k, v in mine.items() if k not in quantized}
        try:
            part.load_state_dict(plain, strict=False)
        except CheckpointError:
            raise
        except (RuntimeError, TypeError, ValueError) as e:
            raise StateMismatchError(f"{self.where}: loading the model failed: {e}") from e
        if quantized:
            install_quantized(part, quantized)
            logger.info(
                "%s: installed %d torchao-quantized weights (assigned, device kept)",
                self.where,
                len(quantized),
            )
        if keep_tied:
            retie_parameters(part, keep_tied)
        return set(mine)


def _all_equal(tensors: list[torch.Tensor]) -> bool:
    first = tensors[0]
    return all(
        t.shape == first.shape and t.dtype == first.dtype and torch.equal(t.cpu(), first.cpu())
        for t in tensors[1:]
    )
