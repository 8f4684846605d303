"""Reading a directory written by ``accelerator.save_state`` (Accelerate's own layout).

:func:`ckptsvc.integrations.accelerate.load_state` calls :func:`load_accelerate_dir` for a
local directory without a ckptsvc manifest that holds Accelerate's files, so a run
checkpointed by Accelerate can resume under ckptsvc. The files, as
``accelerate.checkpointing.save_accelerator_state`` names them (``_<i>`` for the i-th
object after the first):

- ``model.safetensors`` (or ``pytorch_model.bin``): the prepared model's ``state_dict``;
- ``optimizer.bin``, ``scheduler.bin``: ``state_dict`` of each prepared optimizer and scheduler;
- ``sampler.bin``: a pickled ``SeedableRandomSampler`` (iterable datasets only);
  ``dl_state_dict.bin``: a stateful dataloader's ``state_dict``;
- ``scaler.pt``: the ``GradScaler``;
- ``random_states_<process>.pkl``: Python, NumPy, torch and device generators, and
  ``accelerator.step``;
- ``custom_checkpoint_<i>.pkl``: each ``register_for_checkpointing`` object's ``state_dict``.

Every pickle is read with ``torch.load(weights_only=True)`` (tensors, containers, numbers,
strings, and NumPy arrays for the RNG states - what Accelerate itself allows). A file that
needs more (``sampler.bin`` always pickles the sampler object; a custom state may hold
classes) raises :class:`~ckptsvc.errors.UnsafeCheckpointError` naming it: ckptsvc never
unpickles arbitrary objects (unpickling runs code). Resume such a run once with Accelerate's
own ``load_state``, then save it with :func:`ckptsvc.integrations.accelerate.save_state`,
which stores every state as tensors and JSON.
"""

from __future__ import annotations

import codecs
import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_model

from ckptsvc.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StateMismatchError,
    UnsafeCheckpointError,
)

__all__ = ["is_accelerate_dir", "load_accelerate_dir", "read_pickle"]

logger = logging.getLogger(__name__)

_RNG_RE = re.compile(r"^random_states_\d+\.pkl$")
_CUSTOM_RE = re.compile(r"^custom_checkpoint_\d+\.pkl$")
#: what Accelerate's own loader allows besides tensors: NumPy arrays of the RNG states
_SAFE_GLOBALS: list[Any] = [
    np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
    codecs.encode,
]


def is_accelerate_dir(path: str) -> bool:
    """Whether local ``path`` looks written by ``accelerator.save_state``: it holds
    ``random_states_<n>.pkl`` or ``optimizer.bin``."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(_RNG_RE.match(n) or n == "optimizer.bin" for n in names)


def read_pickle(path: Path) -> Any:
    """A file written by ``torch.save``, read with ``weights_only=True`` (NumPy arrays
    allowed); content that needs more raises :class:`UnsafeCheckpointError`."""
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{path}: missing; the directory written by accelerator.save_state must hold it "
            "for the state this accelerator prepared"
        )
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle it: it holds more than tensors and plain values "
            f"({str(e).splitlines()[0]}); ckptsvc never unpickles objects: resume this run with "
            "accelerator.load_state, then save it with ckptsvc.integrations.accelerate.save_state"
        ) from e
    except (EOFError, RuntimeError) as e:
        raise CorruptCheckpointError(f"{path}: not a readable torch file ({e})") from e


def _indexed(base: str, i: int, ext: str) -> str:
    return f"{base}{'' if i == 0 else f'_{i}'}.{ext}"


def _load_models(accelerator: Accelerator, root: Path) -> None:
    for i, model in enumerate(accelerator._models):
        safe = root / _indexed("model", i, "safetensors")
        if safe.is_file():
            load_model(model, str(safe), strict=True, device="cpu")
        else:
            state = read_pickle(root / _indexed("pytorch_model", i, "bin"))
            model.load_state_dict(state)


def _load_dataloaders(accelerator: Accelerator, root: Path) -> None:
    for i, dl in enumerate(accelerator._dataloaders):
        sampler_file = root / _indexed("sampler", i, "bin")
        if sampler_file.is_file():
            dl.set_sampler(read_pickle(sampler_file))
        state_file = root / _indexed("dl_state_dict", i, "bin")
        if getattr(dl, "use_stateful_dataloader", False) and state_file.is_file():
            dl.load_state_dict(read_pickle(state_file))


def _load_rng(accelerator: Accelerator, root: Path) -> None:
    path = root / f"random_states_{accelerator.process_index}.pkl"
    if not path.is_file():
        logger.warning("%s: missing; random states not restored (as Accelerate does)", path)
        return
    states = read_pickle(path)
    if "step" in states:
        accelerator.step = int(states["step"])
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    cuda = states.get("torch_cuda_manual_seed")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _load_custom(accelerator: Accelerator, root: Path) -> None:
    found = sorted(n for n in os.listdir(root) if _CUSTOM_RE.match(n))
    objects = list(accelerator._custom_objects)
    if len(found) != len(objects):
        raise StateMismatchError(
            f"{root} holds {len(found)} custom checkpoints but {len(objects)} objects are "
            "registered with register_for_checkpointing; register the same objects as the "
            "run that saved"
        )
    for i, obj in enumerate(objects):
        obj.load_state_dict(read_pickle(root / f"custom_checkpoint_{i}.pkl"))


def load_accelerate_dir(accelerator: Accelerator, path: str) -> None:
    """Restore ``accelerator`` from a directory written by ``accelerator.save_state``: what
    ``accelerator.load_state(path)`` restores, reading pickles only as described in the
    module docstring."""
    root = Path(path)
    _load_models(accelerator, root)
    for i, opt in enumerate(accelerator._optimizers):
        opt.load_state_dict(read_pickle(root / _indexed("optimizer", i, "bin")))
    for i, sched in enumerate(accelerator._schedulers):
        sched.load_state_dict(read_pickle(root / _indexed("scheduler", i, "bin")))
    _load_dataloaders(accelerator, root)
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(read_pickle(root / "scaler.pt"))
    _load_rng(accelerator, root)
    _load_custom(accelerator, root)
