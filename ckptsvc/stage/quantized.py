"""torchao-quantized weights: store them as plain tensors plus a JSON description, and
install them back into a module on load.

A torchao-quantized weight (``quantize_(model, Int8WeightOnlyConfig())`` and friends) is a
tensor *subclass* (``Int8Tensor``, ``IntxUnpackedToInt8Tensor``, ``Float8Tensor``, ...)
whose bytes live in inner tensors (``qdata``, ``scale``, ``zero_point``) and whose layout
lives in Python attributes (``block_size``, ``dtype``, activation-quantization kwargs).
Safetensors cannot hold a subclass, so a save stores:

- each inner tensor as an ordinary tensor named ``{module}._{leaf}_{inner}`` (for
  ``fc.weight``: ``fc._weight_qdata``, ``fc._weight_scale``, ...), the naming torchao's
  ``flatten_tensor_state_dict`` and Hugging Face's torchao loader use;
- a JSON description per quantized name, ``{"_type": "Int8Tensor", "_data": {attributes},
  "_tensor_data_names": [...]}``, encoded by torchao's own attribute encoder, under
  ``{"format": "torchao", "torchao_version": ..., "tensors": {fqn: description}}``.

Nothing is cloned on the save path (the inner tensors are handed to the snapshot copy as
they are). Loading rebuilds each subclass from its inner tensors and attributes through
torchao's allow-listed constructor table (never pickle), then :func:`install_quantized`
puts it into the module: the parameter is *assigned* (``Tensor.copy_`` cannot copy one
quantized tensor into another), it keeps the device the module's parameter had, and is
frozen (``requires_grad=False``, as ``quantize_`` leaves it). The caller re-ties tied
weights afterwards (assignment breaks sharing).

torchao is optional: it is imported only when a state holds a quantized tensor or a
checkpoint describes one. The supported pairing is torchao 0.18.x with torch 2.13.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ckptsvc.errors import CorruptCheckpointError, InvalidStateError, StateMismatchError

__all__ = [
    "QUANTIZED_FORMAT",
    "QuantizedSplit",
    "has_quantized_tensors",
    "install_quantized",
    "is_quantized_tensor",
    "join_quantized",
    "require_torchao",
    "split_quantized",
]

logger = logging.getLogger(__name__)

QUANTIZED_FORMAT = "torchao"
#: the torchao release line this ckptsvc is tested with (torch 2.13)
TORCHAO_PIN = "torchao>=0.18,<0.19"


def require_torchao() -> ModuleType:
    """Import torchao or raise :class:`InvalidStateError` saying how to install it."""
    try:
        import torchao
        from torchao.prototype.safetensors import safetensors_utils  # noqa: F401
    except ImportError as e:
        raise InvalidStateError(
            f"this state holds torchao-quantized tensors but torchao cannot be imported ({e}); "
            f"install the release that matches torch {torch.__version__}: pip install '{TORCHAO_PIN}'"
        ) from e
    return torchao


def is_quantized_tensor(value: object) -> bool:
    """True for a torchao tensor subclass (a quantized weight), False for plain tensors."""
    if not isinstance(value, torch.Tensor) or type(value) in (torch.Tensor, nn.Parameter):
        return False
    return any(c.__module__.startswith("torchao") for c in type(value).__mro__)


def has_quantized_tensors(state_dict: Mapping[str, object]) -> bool:
    return any(is_quantized_tensor(v) for v in state_dict.values())


def _inner_prefix(fqn: str) -> str:
    module, _, leaf = fqn.rpartition(".")
    return f"{module}._{leaf}_" if module else f"_{leaf}_"


def _data_names(t: torch.Tensor) -> list[str]:
    names = list(getattr(t, "tensor_data_names", ()))
    names += list(getattr(t, "optional_tensor_data_names", ()))
    return [n for n in names if getattr(t, n, None) is not None]


@dataclass(frozen=True)
class QuantizedSplit:
    """A state dict with every quantized tensor replaced by its inner tensors.

    ``tensors`` holds only plain tensors; ``description`` is JSON-serialisable and empty
    when nothing was quantized (then ``tensors`` is the input, unchanged).
    """

    tensors: dict[str, torch.Tensor]
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def quantized_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.description.get("tensors", {})))


def split_quantized(state_dict: Mapping[str, torch.Tensor]) -> QuantizedSplit:
    """Replace each torchao tensor by its inner tensors and describe it (see the module doc).

    Raises :class:`InvalidStateError` naming the key for a subclass torchao cannot
    describe, or when an inner tensor's name collides with an existing key.
    """
    if not has_quantized_tensors(state_dict):
        return QuantizedSplit(dict(state_dict))
    torchao = require_torchao()
    from torchao.prototype.safetensors.safetensors_utils import (
        ALLOWED_TENSORS_SUBCLASSES,
        TensorSubclassAttributeJSONEncoder,
    )

    out: dict[str, torch.Tensor] = {}
    described: dict[str, Any] = {}
    for fqn, t in state_dict.items():
        if not is_quantized_tensor(t):
            out[fqn] = t
            continue
        kind = type(t).__name__
        if kind not in ALLOWED_TENSORS_SUBCLASSES:
            raise InvalidStateError(
                f"state[{fqn!r}]: torchao tensor type {kind} has no safe serialised form in "
                f"torchao {torchao.__version__} (supported: {sorted(ALLOWED_TENSORS_SUBCLASSES)}); "
                "dequantize it or use one of the supported configs"
            )
        try:
            desc = json.loads(json.dumps(t, cls=TensorSubclassAttributeJSONEncoder))
        except (TypeError, ValueError) as e:
            raise InvalidStateError(
                f"state[{fqn!r}]: cannot describe the {kind} attributes as JSON ({e})"
            ) from e
        prefix = _inner_prefix(fqn)
        for name in _data_names(t):
            inner = getattr(t, name)
            if not isinstance(inner, torch.Tensor) or is_quantized_tensor(inner):
                raise InvalidStateError(
                    f"state[{fqn!r}]: inner tensor {name!r} is not a plain tensor"
                )
            out[prefix + name] = inner.detach()
        described[fqn] = desc
    for fqn, desc in described.items():
        for name in desc["_tensor_data_names"]:
            key = _inner_prefix(fqn) + name
            if key in state_dict:
                raise InvalidStateError(
                    f"state[{fqn!r}]: its inner tensor name {key!r} is also a key of the state; "
                    "rename that entry"
                )
    description = {
        "format": QUANTIZED_FORMAT,
        "torchao_version": str(torchao.__version__),
        "tensors": described,
    }
    return QuantizedSplit(out, description)


def join_quantized(
    tensors: Mapping[str, torch.Tensor], description: Mapping[str, Any], *, where: str
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_quantized`: rebuild each described tensor from its inner
    tensors (which are consumed); other entries pass through.

    ``where`` names the checkpoint in errors (:class:`CorruptCheckpointError` for a
    description that does not match the tensors).
    """
    if not description:
        return dict(tensors)
    if description.get("format") != QUANTIZED_FORMAT or not isinstance(
        description.get("tensors"), dict
    ):
        raise CorruptCheckpointError(f"{where}: unknown quantized-tensor description format")
    torchao = require_torchao()
    from torchao.prototype.safetensors.safetensors_utils import object_from_dict

    saved_version = description.get("torchao_version")
    if (
        saved_version
        and str(saved_version).split(".")[:2] != str(torchao.__version__).split(".")[:2]
    ):
        logger.warning(
            "%s was saved with torchao %s, loading with %s; quantized layouts may differ",
            where,
            saved_version,
            torchao.__version__,
        )
    out = dict(tensors)
    for fqn, desc in description["tensors"].items():
        if not isinstance(desc, dict) or not isinstance(desc.get("_data"), dict):
            raise CorruptCheckpointError(
                f"{where}: quantized tensor {fqn!r} has a malformed description"
            )
        prefix = _inner_prefix(fqn)
        inner: dict[str, torch.Tensor] = {}
        for name in desc.get("_tensor_data_names") or []:
            key = prefix + name
            if key not in out:
                raise CorruptCheckpointError(
                    f"{where}: quantized tensor {fqn!r} needs {key!r}, which the checkpoint lacks"
                )
            inner[name] = out.pop(key)
        spec = {"_type": desc.get("_type"), "_data": {**desc["_data"], **inner}}
        try:
            out[fqn] = object_from_dict(spec)
        except (TypeError, ValueError) as e:
            raise CorruptCheckpointError(
                f"{where}: cannot rebuild quantized tensor {fqn!r} ({desc.get('_type')}): {e}"
            ) from e
    return out


def _resolve_parent(module: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = fqn.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    return parent, leaf


@torch.no_grad()
def install_quantized(module: nn.Module, quantized: Mapping[str, torch.Tensor]) -> None:
    """Assign each quantized tensor to its parameter slot in ``module``.

    The slot keeps the device its current parameter is on (a meta-device slot takes the
    loaded tensor's device); the new parameter is frozen. Raises
    :class:`StateMismatchError` for a name the module does not have or a shape mismatch.
    """
    for fqn, t in sorted(quantized.items()):
        try:
            parent, leaf = _resolve_parent(module, fqn)
        except AttributeError as e:
            raise StateMismatchError(
                f"quantized weight {fqn!r} has no matching submodule in {type(module).__name__}"
            ) from e
        old = getattr(parent, leaf, None)
        if not isinstance(old, torch.Tensor):
            raise StateMismatchError(
                f"quantized weight {fqn!r}: {type(parent).__name__} has no tensor {leaf!r}"
            )
        if tuple(old.shape) != tuple(t.shape):
            raise StateMismatchError(
                f"quantized weight {fqn!r}: checkpoint shape {tuple(t.shape)} != module shape {tuple(old.shape)}"
            )
        if old.device.type != "meta" and t.device != old.device:
            t = t.to(old.device)
        if isinstance(old, nn.Parameter) or leaf in parent._parameters:
            setattr(parent, leaf, nn.Parameter(t, requires_grad=False))
        else:
            parent._buffers[leaf] = t
        logger.debug("installed quantized %s (%s) on %s", fqn, type(t).__name__, t.device)
