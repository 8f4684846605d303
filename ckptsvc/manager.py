"""``CheckpointManager``: the training loop's face of ckptsvc, Forgather-compatible.

Usage::

    config = CheckpointConfig(output_dir="s3://bucket/run1", save_total_limit=3,
                              storage_options=opts)
    with CheckpointManager(config=config, stateful_provider=trainer, model=model) as ckpt:
        if ckpt.resolve_checkpoint_path(None):
            ckpt.load_checkpoint()                          # latest complete checkpoint
        for step in ...:
            ...
            if step % 1000 == 0:
                ckpt.save_checkpoint(checkpoint_id=step)    # returns after a memory copy
    # leaving the block waits for the last saves and raises if one failed

Call order of ``save_checkpoint`` (training thread unless noted):

1. raise an earlier save's failure that nobody has seen yet;
2. resolve the path (``<output_dir>/checkpoints/checkpoint-<id>``) and the step;
3. snapshot the components: the model (parts merged, torchao weights split into plain
   tensors + a JSON description, see :mod:`ckptsvc.compat.model_state`), the provider's other
   components, callback states by name; best-checkpoint list and quantization description
   go to the manifest's metadata;
4. mark the path in flight for retention (waits if retention is deleting that very path);
5. ``AsyncCheckpointer.save_components`` copies the tensors into shared memory and hands
   the job to the node writer; returns the ``SaveHandle``;
6. (retention thread) once the handle commits, delete what ``save_total_limit`` allows.

``wait()`` blocks until every pending save is committed and raises the first failure;
``close()`` (and leaving a ``with`` block) waits too. A failed background save also
raises from the next ``save_checkpoint``: a run never continues for hours believing it
is checkpointed when it is not.

``load_checkpoint`` loads every component and fails if any required one cannot be
loaded: training never continues on half-restored state.

The configuration and checkpoint ids (:class:`CheckpointConfig`, :func:`default_checkpoint_id`)
live in :mod:`ckptsvc.compat.manager_config`, which components a save or load consists of in
:mod:`ckptsvc.compat.manager_components`; both names stay importable from here, as do
Forgather's ``CheckpointManifest``, ``ComponentManifest``, ``compute_state_hash``,
``Statefuls`` and ``ModelParts`` (:mod:`ckptsvc.compat.forgather_types`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ckptsvc.commit.resume import resolve_latest
from ckptsvc.compat.forgather_types import (
    CheckpointManifest,
    ComponentManifest,
    ModelParts,
    Statefuls,
    compute_state_hash,
)
from ckptsvc.compat.manager_components import (
    callback_source,
    callback_states,
    manager_components,
    process_groups,
    snapshot_component,
)
from ckptsvc.compat.manager_config import (
    CHECKPOINT_NAME_RE,
    CheckpointConfig,
    checkpoint_step,
    default_checkpoint_id,
)
from ckptsvc.compat.model_state import ModelState
from ckptsvc.compat.restore import META_KEY, restore_checkpoint
from ckptsvc.compat.training_state import DistInfo
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.engine.inflight import wait_for_saves
from ckptsvc.engine.pretrained import save_pretrained
from ckptsvc.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    LifecycleError,
    SaveFailedError,
)
from ckptsvc.format.manifest import FileRecord
from ckptsvc.ops.best_checkpoints import BestCheckpoints, Retention
from ckptsvc.ops.tiered_saves import Replication, Tiering, TieringConfig
from ckptsvc.read.discovery import (
    CheckpointStatus,
    checkpoint_info,
    next_checkpoint_path,
    read_manifest,
    validate_checkpoint,
)
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.stage.components import (
    StateComponent,
    StatefulProvider,
)
from ckptsvc.stage.flatten import with_frozen_parameters
from ckptsvc.storage import Location

__all__ = [
    "CheckpointConfig",
    "CheckpointManager",
    "CheckpointManifest",
    "ComponentManifest",
    "ModelParts",
    "Statefuls",
    "compute_state_hash",
    "default_checkpoint_id",
]

logger = logging.getLogger(__name__)

META_FORMAT = 1


class CheckpointManager:
    """Saves and restores complete training state (see the module docstring).

    ``model`` (or ``model_parts``: pipeline stages held by this rank) is the ``"model"``
    component, stored as Hugging Face safetensors shards; a ``"model"`` component from
    the provider lends only its sharing pattern. ``callbacks``: Statefuls saved by name
    (a mapping, or a sequence named by their ``name`` attribute or class name);
    alternatively set ``manager.trainer`` to an object with a ``callbacks`` list, as
    Forgather's trainer does. ``dist``: anything with ``rank``/``local_rank``/
    ``world_size``; default: ``torch.distributed`` if initialised, else one process.
    """

    def __init__(
        self,
        *,
        config: CheckpointConfig,
        stateful_provider: StatefulProvider,
        model: nn.Module,
        dist: object | None = None,
        model_parts: Sequence[nn.Module] | None = None,
        model_preprocessor: Any = None,
        callbacks: Mapping[str, Any] | Sequence[Any] | None = None,
    ) -> None:
        if model is None:
            raise ConfigError("CheckpointManager needs the model")
        if config.save_on_each_node:
            raise ConfigError(
                "save_on_each_node=True (node-local storage) is not supported: ckptsvc commits "
                "one checkpoint per job to shared storage (a path every rank sees, or an object store)"
            )
        self.config = config
        self.dist = DistInfo.detect(dist)
        self.stateful_provider = stateful_provider
        self.model = model
        self.model_parts = list(model_parts) if model_parts else [model]
        self.model_preprocessor = model_preprocessor
        self.trainer: Any = None  # Forgather sets this; its `callbacks` are saved by name
        self.preserve_n_best = 1
        self._callbacks = callbacks
        self._model_state = ModelState(self.model_parts)
        self._best = BestCheckpoints()
        self._storage_options = dict(config.storage_options or {})
        self._checkpointer: Any = None
        self._resumed_from: tuple[str, tuple[FileRecord, ...]] | None = None
        self._pending: list[Any] = []
        self._save_count = 0
        self._closed = False
        self._tiering: Tiering | None = None
        self._replications: list[Replication] = []
        retention_root, retention_opts = config.output_dir, self._storage_options
        if config.tiering is not None:
            tcfg = config.tiering
            if isinstance(tcfg, Mapping):
                tcfg = TieringConfig(**tcfg)
            self._tiering = Tiering(
                tcfg, local_root=config.output_dir, local_options=self._storage_options
            )
            retention_root, retention_opts = tcfg.remote_root, self._tiering.remote_options
        self._retention = Retention(
            retention_root,
            keep=config.save_total_limit,
            preserved=self._preserved,
            storage_options=retention_opts,
            on_deleted=self._tiering.delete_local_copy if self._tiering else None,
        )
        self._components()  # validate the provider's components now, not at the first save

    # ---- Forgather's attributes -------------------------------------------------------------

    @property
    def best_checkpoints(self) -> list[tuple[str, float]]:
        """``(path, metric)`` of the best checkpoints, best first (Forgather's attribute)."""
        return list(self._best.entries)

    @best_checkpoints.setter
    def best_checkpoints(self, value: Sequence[tuple[str, float]]) -> None:
        self._best.entries = [(str(p), float(m)) for p, m in value]

    @property
    def best_checkpoint(self) -> str | None:
        """The single best checkpoint (Forgather's deprecated attribute), or ``None``."""
        return self._best.best_checkpoint

    # ---- components -------------------------------------------------------------------------

    def _components(self) -> tuple[StateComponent, list[StateComponent]]:
        """(model component, other components) for the current save or load."""
        states = callback_states(callback_source(self._callbacks, self.trainer))
        return manager_components(self.stateful_provider, self._model_state, states)

    # ---- save -------------------------------------------------------------------------------

    def _preserved(self) -> list[str]:
        """Paths retention must keep: the best checkpoints (on the remote tier too)."""
        paths = self._best.paths()
        t = self._tiering
        if t is None:
            return paths
        return paths + [t.remote_path(p) for p in paths if not t.is_remote(p)]

    def _options_for(self, path: str) -> dict[str, Any]:
        return self._tiering.options_for(path) if self._tiering else self._storage_options

    def _engine(self) -> Any:
        if self._checkpointer is None:
            if self._tiering is not None and self.dist.rank == 0:
                for future in self._tiering.start():  # replications a crash left undone
                    future.add_done_callback(_log_replication_failure)

            self._checkpointer = AsyncCheckpointer(
                self.config.output_dir,
                storage_options=self._storage_options,
                max_shard_size=self.config.max_shard_size,
                rank=self.dist.rank,
                incremental=self.config.incremental,
                memory_budget_bytes=self.config.memory_budget_bytes,
            )
            if self._resumed_from is not None:
                self._checkpointer.set_incremental_base(*self._resumed_from)
        return self._checkpointer

    def start(self) -> None:
        """Connect to (or start) the node writer now; otherwise the first save does, and
        its blocking time includes the writer's start-up."""
        self._engine()

    def save_checkpoint(
        self,
        checkpoint_path: str | None = None,
        checkpoint_id: str | int | None = None,
        *,
        step: int | None = None,
    ) -> str:
        """Snapshot the training state and return the checkpoint's path; the writer makes
        it durable in the background (``async_save=False``: returns once committed)."""
        if self._closed:
            raise LifecycleError("save_checkpoint() on a closed CheckpointManager")
        self._raise_finished_failures()
        if not checkpoint_path:
            checkpoint_path = next_checkpoint_path(
                self.config.output_dir,
                checkpoint_id if checkpoint_id is not None else default_checkpoint_id(),
            )
        step = checkpoint_step(step, checkpoint_id, checkpoint_path, self._save_count)
        if self._tiering is not None and CHECKPOINT_NAME_RE.search(checkpoint_path) is None:
            raise ConfigError(
                f"with tiering, checkpoints must be <output_dir>/checkpoints/checkpoint-<id>; "
                f"got {checkpoint_path}"
            )
        model_comp, others = self._components()
        split = self._model_state.snapshot()
        frozen = snapshot_component(
            model_comp, with_frozen_parameters(split.tensors, self.model_parts), model=self.model
        )
        metadata = {
            **self.config.metadata,
            META_KEY: {
                "format": META_FORMAT,
                "step": step,
                "components": sorted(c.key for c in [frozen, *others]),
                "quantized": split.description or None,
                **self._best.to_json(),
            },
        }
        writes_retention = self.dist.rank == 0
        tier_path = self._tiering.remote_path(checkpoint_path) if self._tiering else None
        if writes_retention:
            self._retention.begin_save(tier_path or checkpoint_path)
        try:
            handle = self._engine().save_components(
                step,
                [frozen, *others],
                process_groups=process_groups(self.stateful_provider),
                metadata=metadata,
                checkpoint_path=checkpoint_path,
                overlap=self.config.overlap,
                overwrite=True,  # Forgather replaces a checkpoint of the same step
            )
        except BaseException:
            if writes_retention:
                self._retention.cancel_save(tier_path or checkpoint_path)
            raise
        self._save_count += 1
        self._pending.append(handle)
        if writes_retention:
            if self._tiering is not None:
                replication = Replication(self._tiering, handle)
                self._replications.append(replication)
                self._retention.after_save(replication)  # its waiter starts the copy
            else:
                self._retention.after_save(handle)
        logger.info(
            "checkpoint %s (step %s) snapshotted in %.3f s",
            checkpoint_path,
            step,
            handle.timings.blocking_s,
        )
        if not self.config.async_save:
            self.wait()
        return checkpoint_path

    def fence(self, timeout_s: float | None = None) -> float:
        """Wait until the overlapped snapshots in flight (``overlap=True``) are copied;
        return the seconds waited. Call before changing weights in place outside
        ``optimizer.step()``; the optimizers among the components fence by themselves."""
        return 0.0 if self._checkpointer is None else float(self._checkpointer.fence(timeout_s))

    @property
    def last_handle(self) -> Any:
        """The ``SaveHandle`` of the latest save (timings, ``wait``), or ``None``."""
        return self._pending[-1] if self._pending else None

    def _raise_finished_failures(self) -> None:
        """Raise (once) the failure of a save that finished since the last call."""
        done = [h for h in self._pending if h.done()]
        self._pending = [h for h in self._pending if not h.done()]
        failed = [h for h in done if h.exception() is not None]
        if failed:
            _raise_failed(failed)

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until every pending save is committed (and retention ran); raise the
        first failure as :class:`SaveFailedError` (``__cause__`` is the underlying error)."""
        handles, self._pending = self._pending, []
        failed = []
        for h in handles:
            if h.exception(timeout_s) is not None:
                failed.append(h)
        if failed:
            _raise_failed(failed)
        replications, self._replications = self._replications, []
        for r in replications:
            error = r.exception(timeout_s)
            if error is not None:
                raise SaveFailedError(
                    f"replicating {r.local_handle.path} to {r.path} failed: {error}; the "
                    "local copy is complete and is retried by the next manager's start"
                ) from error
        self._retention.wait()

    # ---- best checkpoints -------------------------------------------------------------------

    def update_best_checkpoints(
        self,
        checkpoint_path: str,
        metrics: dict[str, float],
        metric_key: str,
        greater_is_better: bool | None,
        preserve_n_best: int,
    ) -> bool:
        """Record ``checkpoint_path`` if its metric ranks among the ``preserve_n_best``
        best (call before ``save_checkpoint`` so retention already spares it)."""
        self.preserve_n_best = preserve_n_best
        return self._best.update(
            checkpoint_path, metrics, metric_key, greater_is_better, preserve_n_best
        )

    def set_best_checkpoint(self, best_checkpoint: str) -> None:
        """Forgather's single-best API (deprecated there): never delete this checkpoint."""
        self._best.best_checkpoint = best_checkpoint

    def get_best_checkpoints_summary(self, metric_key: str = "loss") -> str:
        """The best checkpoints with their ``metric_key`` values, one per line."""
        return self._best.summary(metric_key)

    # ---- load -------------------------------------------------------------------------------

    def resolve_checkpoint_path(
        self, checkpoint_path: str | None, *, wait_s: float | None = None
    ) -> str | None:
        """``checkpoint_path`` if it holds a complete checkpoint, else ``None`` (warned);
        with ``None``, the latest complete checkpoint under ``output_dir``. Saves of this
        process still in flight to that path (or under ``output_dir``), this manager's or
        any other checkpointer's, are waited for first, so a checkpoint saved a moment ago
        is found; past ``wait_s`` seconds (``None``: no limit)
        :class:`~ckptsvc.errors.SaveInFlightError` names the step still in flight. With
        tiering, the latest on either tier, and a local path falls back to its remote copy."""
        wait_for_saves(
            checkpoint_path or self.config.output_dir,
            storage_options=self._storage_options,
            timeout_s=wait_s,
        )
        if self._tiering is not None:
            return self._tiering.resolve(checkpoint_path)
        opts = self._storage_options
        if checkpoint_path is None:
            latest = find_latest_checkpoint(self.config.output_dir, storage_options=opts)
            if not latest:
                logger.warning("no complete checkpoint under %s", self.config.output_dir)
            return latest
        return checkpoint_path if _usable(checkpoint_path, opts) else None

    def load_checkpoint(
        self, checkpoint_path: str | None = None, *, wait_s: float | None = None
    ) -> str:
        """Restore every component from ``checkpoint_path`` (default: the latest); return
        the path loaded. Any component that cannot be restored raises. Saves of this
        process in flight there are waited for first (see :meth:`resolve_checkpoint_path`)."""
        if checkpoint_path is None and self._tiering is None and self.dist.world_size > 1:
            # every rank loads: rank 0 alone lists the run and tells the others (one
            # discovery per job, not per rank; ckptsvc.commit.resume)
            wait_for_saves(
                self.config.output_dir, storage_options=self._storage_options, timeout_s=wait_s
            )
            resolved = resolve_latest(
                self.config.output_dir,
                storage_options=self._storage_options,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            )
        else:
            resolved = self.resolve_checkpoint_path(checkpoint_path, wait_s=wait_s)
        if resolved is None:
            where = checkpoint_path or f"{self.config.output_dir} (latest)"
            raise CheckpointNotFoundError(f"no complete checkpoint to load at {where}")
        model_comp, others = self._components()
        source = callback_source(self._callbacks, self.trainer)
        doc = restore_checkpoint(
            Location.parse(resolved, self._options_for(resolved)),
            model_state=self._model_state,
            model_component=model_comp,
            others=others,
            legacy_callbacks=list(source.values() if isinstance(source, Mapping) else source or []),
            process_groups=process_groups(self.stateful_provider),
            dist=self.dist,
        )
        if "best_checkpoints" in doc:
            self._best.restore(doc, exists=self._exists)
        self._remember_base(resolved)
        return resolved

    def _remember_base(self, path: str) -> None:
        """The loaded checkpoint becomes the base of the next incremental save (when it is
        on the tier saves go to: a server-side copy needs the same store)."""
        if self._tiering is not None and self._tiering.is_remote(path):
            return
        manifest = read_manifest(Location.parse(path, self._storage_options))
        if manifest is None:
            return
        self._resumed_from = (path, manifest.files)
        if self._checkpointer is not None:
            self._checkpointer.set_incremental_base(path, manifest.files)

    def _exists(self, path: str) -> bool:
        """A complete checkpoint at ``path`` (with tiering: either tier's copy of it)."""
        if self._tiering is not None:
            return self._tiering.exists(path)
        return validate_checkpoint(path, storage_options=self._storage_options)

    # ---- export -----------------------------------------------------------------------------

    def save_model(
        self, output_dir: str | os.PathLike[str] | None = None, overwrite_output_dir: bool = False
    ) -> None:
        """Export the model Hugging Face style (see :func:`ckptsvc.engine.pretrained.save_pretrained`):
        weights, ``config.json`` when the model has a config, the preprocessor.
        Synchronous; rank 0 writes, every rank returns after it (barrier)."""
        out = os.fspath(output_dir) if output_dir is not None else self.config.output_dir
        if self.dist.rank == 0:
            save_pretrained(
                out,
                model=self.model,
                model_parts=self.model_parts,
                preprocessor=self.model_preprocessor,
                safetensors=self.config.save_safetensors,
                max_shard_size=self.config.max_shard_size,
                overwrite=overwrite_output_dir,
                storage_options=self._storage_options,
            )
        td = torch.distributed
        if self.dist.world_size > 1 and td.is_available() and td.is_initialized():
            td.barrier()

    # ---- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for pending saves and retention, stop the writer connection; raise a
        save failure nobody has seen yet (after cleaning up)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._retention.close()
            if self._checkpointer is not None:
                self._checkpointer.close()
            if self._tiering is not None:
                self._tiering.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as e:  # do not mask the exception already propagating
            logger.error("while unwinding: %s", e)


def _usable(path: str, opts: dict[str, Any]) -> bool:
    info = checkpoint_info(path, storage_options=opts)
    if info.status is CheckpointStatus.ABSENT:
        logger.warning("checkpoint path does not exist: %s", path)
    elif info.status is CheckpointStatus.INCOMPLETE:
        logger.warning("incomplete checkpoint at %s (%s)", path, info.reason)
    return info.status in (CheckpointStatus.COMPLETE, CheckpointStatus.LEGACY)


def _log_replication_failure(future: Any) -> None:
    error = future.exception()
    if error is not None:
        logger.error("replicating a local checkpoint left by an earlier run failed: %s", error)


def _raise_failed(failed: Sequence[Any]) -> None:
    first = failed[0]
    error = first.exception()
    more = f" (and {len(failed) - 1} more failed saves)" if len(failed) > 1 else ""
    if isinstance(error, SaveFailedError) and not more:
        raise error
    raise SaveFailedError(f"save of {first.path} failed{more}: {error}") from error
