"""Asynchronous ``accelerator.save_state`` / ``load_state`` through ckptsvc.

Usage (``pip install 'ckptsvc[hf]'``, which brings ``accelerate``)::

    from ckptsvc.integrations import accelerate as ckpt_accel

    model, opt, dl, sched = accelerator.prepare(model, opt, dl, sched)
    restored = ckpt_accel.load_state(accelerator, "runs/r1")   # None: nothing to resume
    for step, batch in enumerate(dl, start=...):
        ...
        if step % 100 == 0:
            ckpt_accel.save_state(accelerator, "runs/r1", step)  # returns after the copy
    ckpt_accel.close(accelerator)    # wait for every save, raise the first failure

Checkpoints go to ``<root>/checkpoints/checkpoint-<step>`` (so ``ckptsvc ls``, ``verify``,
``prune`` and ``gc`` work on the run) and hold what ``accelerator.save_state`` saves, as
ckptsvc components (safetensors + JSON, nothing pickled):

- ``model``, ``model_1``, ...: each prepared model, unwrapped (``accelerator.unwrap_model``;
  the first as Hugging Face ``model.safetensors``, or shards + its index), GLOBAL;
- ``optimizer``, ``optimizer_1``, ...: each prepared optimizer's ``state_dict``, GLOBAL;
- ``scheduler``, ``scheduler_1``, ...: each prepared scheduler's ``state_dict``, GLOBAL;
- ``scaler``: the ``GradScaler`` (fp16 mixed precision), if any, GLOBAL;
- ``custom_0``, ``custom_1``, ...: each ``register_for_checkpointing`` object, GLOBAL;
- ``accelerator``: ``accelerator.step`` (the gradient-accumulation counter), GLOBAL;
- ``dataloader``: per prepared dataloader its epoch (``iteration``), the seedable
  sampler's epoch and seed, its generator's state and a stateful dataloader's
  ``state_dict``, PER_RANK;
- ``rng``: Python, NumPy, torch CPU and every CUDA generator
  (:class:`~ckptsvc.stage.components.RNGState`), PER_RANK.

Why these patterns: under DDP (and on one process) model, optimizer, scheduler and scaler
are identical on every rank by construction (gradients are all-reduced before each
optimizer step), so one copy is written by rank 0 - what ``accelerator.save_state`` does
too - and every rank loads it. ``validate_replication=True`` saves model and optimizers as
REPLICATED instead: every rank stages them and the save fails when the replicas differ
(a check, at the cost of a copy on every rank). Random generators and dataloader positions
differ per rank, so each rank saves its own.

Call order (the training thread, on every rank):

1. :func:`save_state`: the first call starts this accelerator's ``AsyncCheckpointer`` (kept
   per accelerator and root, closed with the accelerator or at exit); every call
   snapshots the state into shared memory and returns a
   :class:`~ckptsvc.stage.save_handle.SaveHandle`; the node writer writes the checkpoint and
   rank 0 commits its manifest last;
2. :func:`load_state`: a checkpoint, or a root (its newest complete checkpoint), or a
   directory written by ``accelerator.save_state`` (read by
   :mod:`ckptsvc.integrations.accelerate_files`); saves of this accelerator still in
   flight are waited for first;
3. :func:`close`: wait for every save, raise the first failure, stop the engine.

Data position inside an epoch is not saved (nor by Accelerate): after a resume mid-epoch,
skip the batches already seen with ``accelerator.skip_first_batches(dataloader, n)``. With
shuffling, an exact mid-epoch resume needs ``DataLoaderConfiguration(use_seedable_sampler=
True)`` (the permutation is re-derived from seed and epoch). Not supported (refused):
DeepSpeed, FSDP, Megatron-LM and XLA accelerators (they save through their own engines)
and ``register_save_state_pre_hook`` / ``register_load_state_pre_hook`` hooks (they write
and read files of Accelerate's own directory layout).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import SeedableRandomSampler
from accelerate.utils import DistributedType

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, SaveHandle, load_components
from ckptsvc.errors import (
    CheckpointNotFoundError,
    ConfigError,
    SaveFailedError,
    StateMismatchError,
)
from ckptsvc.integrations.accelerate_files import is_accelerate_dir, load_accelerate_dir
from ckptsvc.read.discovery import CheckpointStatus, checkpoint_info, refuse_unloadable
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.stage.components import RNGState, SharingPattern, StateComponent
from ckptsvc.storage import Location

__all__ = [
    "Restored",
    "accelerator_components",
    "close",
    "load_state",
    "save_state",
    "wait_for_saves",
]

logger = logging.getLogger(__name__)

ACCELERATOR_KEY = "accelerator"
DATALOADER_KEY = "dataloader"
RNG_KEY = "rng"
SCALER_KEY = "scaler"
_UNSUPPORTED = (
    DistributedType.DEEPSPEED,
    DistributedType.FSDP,
    DistributedType.MEGATRON_LM,
    DistributedType.XLA,
)


@dataclass(frozen=True)
class Restored:
    """What :func:`load_state` loaded: the checkpoint's path or URL, and its step
    (``None`` for a directory written by ``accelerator.save_state``, which records none)."""

    path: str
    step: int | None


# ---- one AsyncCheckpointer per accelerator and root -----------------------------------------


@dataclass
class _Engines:
    """The checkpointers of one accelerator (by root URL) and their saves."""

    by_root: dict[str, tuple[AsyncCheckpointer, dict[str, Any]]]
    handles: list[SaveHandle]


_LOCK = threading.Lock()
_REGISTRY: weakref.WeakKeyDictionary[Accelerator, _Engines] = weakref.WeakKeyDictionary()


def _close_engines(engines: _Engines) -> None:
    held, engines.by_root = list(engines.by_root.values()), {}
    for ckpt, _ in held:
        ckpt.close()


def _engines(accelerator: Accelerator) -> _Engines:
    with _LOCK:
        found = _REGISTRY.get(accelerator)
        if found is None:
            found = _Engines(by_root={}, handles=[])
            _REGISTRY[accelerator] = found
            # the accelerator going away (or the interpreter exiting) closes its engines
            weakref.finalize(accelerator, _close_engines, found)
        return found


def _engine(
    accelerator: Accelerator, root: str, options: dict[str, Any], storage_options: dict[str, Any]
) -> AsyncCheckpointer:
    engines = _engines(accelerator)
    url = Location.parse(root, storage_options).url
    with _LOCK:
        held = engines.by_root.get(url)
        if held is not None:
            if held[1] != options:
                raise ConfigError(
                    f"save_state({url!r}): this accelerator already saves there with "
                    f"{held[1]}, not {options}; call ckptsvc.integrations.accelerate.close("
                    "accelerator) first to change the options"
                )
            return held[0]
        ckpt = AsyncCheckpointer(
            url,
            storage_options=storage_options,
            max_shard_size=options["max_shard_size"],
            metadata=options["metadata"],
        )
        engines.by_root[url] = (ckpt, options)
        return ckpt


# ---- the state ------------------------------------------------------------------------------


class _Value:
    """A stateful over a getter and a setter (scalars, small dicts)."""

    def __init__(
        self, get: Callable[[], dict[str, Any]], put: Callable[[dict[str, Any]], None]
    ) -> None:
        self._get, self._put = get, put

    def state_dict(self) -> dict[str, Any]:
        return self._get()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._put(state_dict)


def _sampler_generator(dl: Any) -> torch.Generator | None:
    gen = getattr(dl, "synchronized_generator", None)
    if gen is None:
        sampler = dl.get_sampler() if hasattr(dl, "get_sampler") else None
        gen = getattr(sampler, "generator", None)
    if isinstance(gen, torch.Generator) and gen.device.type == "cpu":
        return gen
    return None


def dataloader_state(dl: Any) -> dict[str, Any]:
    """One prepared dataloader's position: epoch, seedable sampler, generator, stateful state."""
    out: dict[str, Any] = {"iteration": int(getattr(dl, "iteration", 0))}
    sampler = dl.get_sampler() if hasattr(dl, "get_sampler") else None
    if isinstance(sampler, SeedableRandomSampler):
        out["sampler"] = {"epoch": int(sampler.epoch), "initial_seed": int(sampler.initial_seed)}
    gen = _sampler_generator(dl)
    if gen is not None:
        out["generator"] = gen.get_state()
    if getattr(dl, "use_stateful_dataloader", False):
        out["state"] = dl.state_dict()
    return out


def load_dataloader_state(dl: Any, state: dict[str, Any]) -> None:
    """Put a position from :func:`dataloader_state` back into a prepared dataloader."""
    if hasattr(dl, "set_epoch"):
        dl.set_epoch(int(state["iteration"]))
    sampler = dl.get_sampler() if hasattr(dl, "get_sampler") else None
    saved_sampler = state.get("sampler")
    if isinstance(sampler, SeedableRandomSampler) and saved_sampler:
        sampler.epoch = int(saved_sampler["epoch"])
        sampler.initial_seed = int(saved_sampler["initial_seed"])
    gen = _sampler_generator(dl)
    if gen is not None and state.get("generator") is not None:
        gen.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))
    if state.get("state") is not None and getattr(dl, "use_stateful_dataloader", False):
        dl.load_state_dict(state["state"])


def _dataloaders(accelerator: Accelerator) -> _Value:
    dls = list(accelerator._dataloaders)

    def get() -> dict[str, Any]:
        return {"dataloaders": [dataloader_state(dl) for dl in dls]}

    def put(state: dict[str, Any]) -> None:
        saved = list(state.get("dataloaders") or [])
        if len(saved) != len(dls):
            raise StateMismatchError(
                f"the checkpoint holds {len(saved)} dataloader states but the accelerator "
                f"prepared {len(dls)} dataloaders; prepare the same dataloaders as the run "
                "that saved"
            )
        for dl, st in zip(dls, saved, strict=True):
            load_dataloader_state(dl, st)

    return _Value(get, put)


def _step_value(accelerator: Accelerator) -> _Value:
    def put(state: dict[str, Any]) -> None:
        accelerator.step = int(state["step"])

    return _Value(lambda: {"step": int(accelerator.step)}, put)


def _indexed(base: str, i: int) -> str:
    return base if i == 0 else f"{base}_{i}"


def _check_supported(accelerator: Accelerator, what: str) -> None:
    if accelerator.distributed_type in _UNSUPPORTED:
        raise ConfigError(
            f"{what}: {accelerator.distributed_type.value} accelerators save through their own "
            "engines; use accelerator.save_state / load_state (or ckptsvc.dcp for FSDP2)"
        )
    hooks = accelerator._save_model_state_pre_hook or accelerator._load_model_state_pre_hook
    if hooks:
        raise ConfigError(
            f"{what}: the accelerator has save/load state pre-hooks "
            "(register_save_state_pre_hook), which write and read Accelerate's own files; "
            "remove them, or save with accelerator.save_state"
        )


def accelerator_components(
    accelerator: Accelerator, *, validate_replication: bool = False
) -> list[StateComponent]:
    """The components of ``accelerator``'s state (table in the module docstring)."""
    shared = SharingPattern.REPLICATED if validate_replication else SharingPattern.GLOBAL
    comps = [
        StateComponent(
            _indexed("model", i),
            accelerator.unwrap_model(m),
            shared,
            validate_replication=validate_replication,
        )
        for i, m in enumerate(accelerator._models)
    ]
    comps += [
        StateComponent(
            _indexed("optimizer", i), o, shared, validate_replication=validate_replication
        )
        for i, o in enumerate(accelerator._optimizers)
    ]
    comps += [
        StateComponent(_indexed("scheduler", i), s, SharingPattern.GLOBAL)
        for i, s in enumerate(accelerator._schedulers)
    ]
    if accelerator.scaler is not None:
        comps.append(StateComponent(SCALER_KEY, accelerator.scaler, SharingPattern.GLOBAL))
    comps += [
        StateComponent(f"custom_{i}", obj, SharingPattern.GLOBAL)
        for i, obj in enumerate(accelerator._custom_objects)
    ]
    comps.append(StateComponent(ACCELERATOR_KEY, _step_value(accelerator), SharingPattern.GLOBAL))
    comps.append(StateComponent(DATALOADER_KEY, _dataloaders(accelerator), SharingPattern.PER_RANK))
    comps.append(StateComponent(RNG_KEY, RNGState(), SharingPattern.PER_RANK))
    return comps


# ---- the API --------------------------------------------------------------------------------


def save_state(
    accelerator: Accelerator,
    root: str | os.PathLike[str],
    step: int,
    *,
    storage_options: dict[str, Any] | None = None,
    max_shard_size: int | None = None,
    metadata: dict[str, Any] | None = None,
    validate_replication: bool = False,
    overwrite: bool = False,
) -> SaveHandle:
    """Snapshot everything ``accelerator.save_state`` would save and return; the checkpoint
    ``<root>/checkpoints/checkpoint-<step>`` is written and committed in the background.

    Every process calls it with the same ``root`` and ``step``. ``storage_options`` go to
    fsspec (``root`` may be ``s3://...``, ``gs://...``); ``max_shard_size`` caps weight shard
    files; ``metadata`` goes to every manifest (these three are fixed by the first save to
    a root). ``validate_replication`` and ``overwrite`` as in
    :meth:`~ckptsvc.AsyncCheckpointer.save_components`. A save that failed earlier is raised
    here (:class:`~ckptsvc.errors.SaveFailedError`) rather than forgotten.

    Example::

        handle = save_state(accelerator, "runs/r1", step=100)
        handle.wait()   # optional: durable and committed
    """
    _check_supported(accelerator, f"save_state({root!r})")
    opts = dict(storage_options or {})
    options = {"max_shard_size": max_shard_size, "metadata": dict(metadata or {})}
    engines = _engines(accelerator)
    _raise_failed(engines)
    ckpt = _engine(accelerator, os.fspath(root), options, opts)
    comps = accelerator_components(accelerator, validate_replication=validate_replication)
    handle = ckpt.save_components(step, comps, overwrite=overwrite)
    with _LOCK:
        engines.handles.append(handle)
    logger.info(
        "checkpoint step %d: snapshot in %.3f s, writing %s",
        step,
        handle.timings.blocking_s,
        handle.path,
    )
    return handle


def load_state(
    accelerator: Accelerator,
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
) -> Restored | None:
    """Restore ``accelerator``'s state from ``path`` on every process.

    ``path`` is a checkpoint written by :func:`save_state`, a root (its newest complete
    checkpoint; ``None`` is returned when it has none, so a first run starts fresh), or a
    directory written by ``accelerator.save_state`` (local). Saves of this accelerator still
    in flight are waited for first. Accelerate's pickled files are read with
    ``torch.load(weights_only=True)``; a file that needs arbitrary unpickling (a pickled
    sampler, a custom object's state holding classes) is refused with
    :class:`~ckptsvc.errors.UnsafeCheckpointError` naming it (ckptsvc never unpickles
    objects).

    Raises :class:`~ckptsvc.errors.StateMismatchError` when the checkpoint holds other
    models, optimizers, dataloaders or registered objects than the accelerator prepared,
    :class:`~ckptsvc.errors.CheckpointNotFoundError` when ``path`` is neither a checkpoint
    nor a root, and :class:`~ckptsvc.errors.CorruptCheckpointError` /
    :class:`~ckptsvc.errors.IncompleteCheckpointError` for a checkpoint whose files do not
    match its manifest or that never committed.

    Example::

        restored = load_state(accelerator, "runs/r1")
        start = 0 if restored is None else restored.step + 1
    """
    _check_supported(accelerator, f"load_state({path!r})")
    opts = dict(storage_options or {})
    wait_for_saves(accelerator)
    loc = Location.parse(os.fspath(path), opts)
    info = checkpoint_info(loc)
    if info.manifest is None and loc.is_local and is_accelerate_dir(loc.path):
        load_accelerate_dir(accelerator, loc.path)
        logger.info("restored %s (written by accelerator.save_state)", loc.url)
        return Restored(loc.url, None)
    if info.mismatch or info.status in (CheckpointStatus.INCOMPLETE, CheckpointStatus.DAMAGED):
        # a checkpoint that cannot be loaded, never "nothing to resume"
        refuse_unloadable(info, hint="pass the run's root to load its newest complete one")
    if info.status is not CheckpointStatus.COMPLETE:
        found = find_latest_checkpoint(loc.url, storage_options=opts)
        if found is None:
            logger.info("no complete checkpoint under %s: starting fresh", loc.url)
            return None
        loc = Location.parse(found, opts)
        info = checkpoint_info(loc)
        if info.status is not CheckpointStatus.COMPLETE:
            raise CheckpointNotFoundError(
                f"{loc.url} is not a checkpoint written by ckptsvc ({info.status.value}); "
                "pass a checkpoint of save_state, its root, or a directory of "
                "accelerator.save_state"
            )
    _load_checkpoint(accelerator, loc.url, opts, info.manifest)
    return Restored(loc.url, info.step)


def _load_checkpoint(
    accelerator: Accelerator, url: str, opts: dict[str, Any], manifest: Any
) -> None:
    comps = accelerator_components(accelerator)
    saved = {c.key for c in manifest.components}
    wanted = {c.key for c in comps}
    if saved != wanted:
        raise StateMismatchError(
            f"{url} holds components {sorted(saved)} but this accelerator has "
            f"{sorted(wanted)}; prepare the same models, optimizers, schedulers and "
            "register_for_checkpointing objects as the run that saved"
        )
    load_components(url, comps, storage_options=opts)
    logger.info("restored %s", url)


def wait_for_saves(accelerator: Accelerator) -> None:
    """Wait until every save of ``accelerator`` finished; raise the first failure
    (:class:`~ckptsvc.errors.SaveFailedError`)."""
    engines = _engines(accelerator)
    with _LOCK:
        handles, engines.handles = engines.handles, []
    _raise_first(handles)


def close(accelerator: Accelerator) -> None:
    """Wait for every save of ``accelerator``, stop its engines, raise the first failed
    save. Call it at the end of training on every process (saving again afterwards starts
    a new engine)."""
    with _LOCK:
        engines = _REGISTRY.pop(accelerator, None)
    if engines is None:
        return
    try:
        _raise_first(engines.handles)
    finally:
        _close_engines(engines)


def _raise_failed(engines: _Engines) -> None:
    with _LOCK:
        done = [h for h in engines.handles if h.done()]
        engines.handles = [h for h in engines.handles if not h.done()]
    _raise_first(done)


def _raise_first(handles: list[SaveHandle]) -> None:
    """Wait for every handle; raise the first failure."""
    errors = [(h, h.exception()) for h in handles]
    for h, error in errors:
        if error is not None:
            raise SaveFailedError(
                f"checkpoint save to {h.path} (step {h.step}) failed: {error}"
            ) from error
