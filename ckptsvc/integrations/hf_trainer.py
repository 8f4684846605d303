"""Asynchronous ckptsvc checkpoints for the Hugging Face ``Trainer``: add one callback.

Usage (``pip install 'ckptsvc[hf]'``)::

    from ckptsvc.integrations.hf_trainer import CkptsvcCallback

    ckpt = CkptsvcCallback()                 # root: args.output_dir; or root="s3://bucket/run1"
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ckpt])
    trainer.train(resume_from_checkpoint=True)      # or a checkpoint directory, as with HF

Layout: the ``Trainer``'s own. Each checkpoint is ``<root>/checkpoint-<global_step>`` and
holds the model as Hugging Face safetensors (``model.safetensors``, or shards +
``model.safetensors.index.json``) + ``config.json`` (``from_pretrained(<checkpoint>)`` loads it), ``trainer_state.json`` and
``rng_state.pth`` (``rng_state_<process_index>.pth`` with several processes) as the
``Trainer`` writes them, and the optimizer, LR scheduler, RNG states and trainer step as
ckptsvc components (``<key>_state.*``: safetensors + JSON); all in one commit,
``checkpoint_manifest.json`` last. ckptsvc's discovery lists ``<root>/checkpoint-*`` besides
``<root>/checkpoints/checkpoint-*``, so ``find_latest_checkpoint``, ``ckptsvc ls``,
``verify``, ``prune`` and ``gc`` work on the run. What the ``Trainer`` reads on resume, and
why no ``optimizer.pt`` is written: :mod:`ckptsvc.integrations.hf_resume`.

Call order (the training thread unless noted):

1. ``on_init_end`` (the ``Trainer`` constructor): the root defaults to ``args.output_dir``.
   When the root *is* the output directory, on the world's process zero ``ckptsvc.ops.gc``
   removes saves a dead process left incomplete (``get_last_checkpoint`` would pick such
   a directory). When it is not (an ``s3://`` root, another local directory) and a
   complete checkpoint exists, a single-process run makes the newest one visible as
   ``<output_dir>/checkpoint-<step>`` (a symlink on local disk; downloaded, CRC-verified,
   from an object store) so ``resume_from_checkpoint=True`` finds it (``stage_resume=False``
   turns this off); it is removed at train end or :meth:`CkptsvcCallback.close`;
2. ``on_train_begin``: if the ``Trainer`` resumed (weights and trainer state are loaded by
   then, RNG states follow in its epoch loop), optimizer and scheduler are restored from
   the components of the checkpoint it resumed from - the one staged or prepared by
   :meth:`CkptsvcCallback.resume_path`, else ``<root>/checkpoint-<step>`` if its trainer
   state is the resumed one (else an error) - then the ``AsyncCheckpointer`` starts;
3. ``on_step_end`` / ``on_epoch_end``, right after ``DefaultFlowCallback`` decided to save:
   snapshot model, optimizer, scheduler, RNG and trainer state into shared memory
   (``save_components``: returns after the copy), then clear ``control.should_save`` so the
   ``Trainer``'s synchronous ``_save_checkpoint`` does not run. The node writer writes the
   checkpoint and commits its manifest last; ``save_total_limit`` is applied by
   ``ckptsvc.ops.best_checkpoints.Retention`` on a background thread after each commit;
4. ``on_train_end``: wait for every save and raise the first failure (a run never ends
   believing it is checkpointed when it is not), stop the engine, remove resume views.

Resuming from an object store: the ``Trainer`` reads a *local* directory. With one process
``resume_from_checkpoint=True`` works (step 1); otherwise pass ``ckpt.resume_path()``: a
temporary directory of the newest checkpoint's weights, configs, ``trainer_state.json`` and
RNG files (the optimizer is read from the store), removed at train end or ``close()``. On
local disk ``resume_path()`` returns the checkpoint itself; for a checkpoint of an earlier
version (``<root>/checkpoints/checkpoint-<step>``) it builds that directory.

Not supported (refused with an error where detectable): ``save_strategy="best"`` and
``load_best_model_at_end`` (the best-model decision runs after the callbacks, so the save
cannot be intercepted), DeepSpeed and FSDP trainers (they save through their own engines).
Not saved: the fp16 ``GradScaler`` state, ``training_args.bin`` (the ``Trainer`` does not
read it on resume), the tokenizer (call ``trainer.save_model()`` for an export), and the
states of other ``ExportableState`` callbacks (a callback cannot see them).
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, SaveHandle, load_components
from ckptsvc.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    LifecycleError,
    SaveFailedError,
    StateMismatchError,
)
from ckptsvc.format.manifest import Manifest
from ckptsvc.integrations.hf_resume import (
    TRAINER_STATE_NAME,
    make_resume_view,
    read_trainer_state,
    remove_view,
    rng_file,
    trainer_state_file,
)
from ckptsvc.ops.best_checkpoints import Retention
from ckptsvc.ops.gc import collect_garbage
from ckptsvc.read.discovery import CheckpointStatus, checkpoint_info
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.stage.components import RNGState, SharingPattern, StateComponent
from ckptsvc.storage import Location

__all__ = ["CkptsvcCallback"]

logger = logging.getLogger(__name__)

#: component keys of a checkpoint written by this callback
MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
SCHEDULER_KEY = "scheduler"
RNG_KEY = "rng"
TRAINER_KEY = "hf_trainer"


class _TrainerStep:
    """The ``hf_trainer`` component: the step (its ``trainer_state.json`` is a file of it)."""

    def __init__(self, state: TrainerState) -> None:
        self._step = state.global_step

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self._step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # pragma: no cover
        raise LifecycleError("the trainer state is restored by Trainer from trainer_state.json")


class CkptsvcCallback(TrainerCallback):
    """Replaces the ``Trainer``'s synchronous checkpoint saves with ckptsvc async saves.

    See the module docstring for the layout and call order. ``root`` (path or URL; default
    ``args.output_dir``) is where ``checkpoint-<step>`` directories go; ``storage_options``
    go to fsspec; ``max_shard_size`` caps weight shard files; ``metadata`` goes to every
    manifest; ``stage_resume`` (default on) makes the newest checkpoint of a root other than
    ``args.output_dir`` visible there so ``resume_from_checkpoint=True`` finds it.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        max_shard_size: int | None = None,
        metadata: dict[str, Any] | None = None,
        stage_resume: bool = True,
    ) -> None:
        self.root: str | None = None if root is None else os.fspath(root)
        self.storage_options = dict(storage_options or {})
        self._max_shard_size = max_shard_size
        self._metadata = dict(metadata or {})
        self._stage_resume = stage_resume
        self._ckpt: AsyncCheckpointer | None = None
        self._retention: Retention | None = None
        self._handles: list[SaveHandle] = []
        self._last_saved_step: int | None = None
        #: (checkpoint URL, step, prepared by an explicit resume_path() call)
        self._resume_from: tuple[str, int, bool] | None = None
        self._views: list[str] = []
        self._finalizer = weakref.finalize(self, _remove_views, self._views)

    # ---- resuming ---------------------------------------------------------------------------

    def resume_path(
        self, checkpoint: str | None = None, *, local_dir: str | os.PathLike[str] | None = None
    ) -> str | None:
        """A local directory to pass as ``trainer.train(resume_from_checkpoint=...)``.

        ``checkpoint``: a checkpoint written by this callback (path or URL); default: the
        newest complete one under the root (``None`` is returned when there is none, which
        makes the ``Trainer`` start fresh). A checkpoint on local disk is returned as it is
        (unless ``local_dir`` is given); otherwise a resume directory is made under
        ``local_dir`` (default: a new temporary directory) with the weights, configs,
        ``trainer_state.json`` and RNG files, and removed at train end or :meth:`close`.
        """
        found = self._find(checkpoint)
        if found is None:
            return None
        ckpt, manifest, step = found
        self._resume_from = (ckpt.url, step, True)
        if ckpt.is_local and local_dir is None and manifest.file(TRAINER_STATE_NAME) is not None:
            logger.info("resume from %s (step %s)", ckpt.path, step)
            return ckpt.path
        base = local_dir if local_dir is not None else tempfile.mkdtemp(prefix="ckptsvc-hf-")
        view = Path(base) / ckpt.name
        self._views.append(str(base) if local_dir is None else str(view))
        make_resume_view(ckpt, manifest, view, trainer_key=TRAINER_KEY, rng_key=RNG_KEY)
        logger.info("resume directory for %s (step %s): %s", ckpt.url, step, view)
        return str(view)

    def _find(self, checkpoint: str | None) -> tuple[Location, Manifest, int] | None:
        """The complete checkpoint of this callback to resume from (``None``: none yet)."""
        opts = self.storage_options
        if checkpoint is None:
            checkpoint = find_latest_checkpoint(self._root_or_error(), storage_options=opts)
            if checkpoint is None:
                logger.info("no complete checkpoint under %s: training starts fresh", self.root)
                return None
        ckpt = Location.parse(checkpoint, opts)
        info = checkpoint_info(ckpt)
        keys = {c.key for c in info.manifest.components} if info.manifest is not None else set()
        if (
            info.status is not CheckpointStatus.COMPLETE
            or info.manifest is None
            or not {MODEL_KEY, TRAINER_KEY} <= keys
        ):
            raise CheckpointNotFoundError(
                f"{ckpt.url} is not a complete checkpoint written by CkptsvcCallback "
                f"({info.status.value}{', components ' + str(sorted(keys)) if keys else ''}); "
                "pass a checkpoint-<step> directory the callback wrote"
            )
        return ckpt, info.manifest, info.step if info.step is not None else -1

    def _root_or_error(self) -> str:
        if self.root is None:
            raise ConfigError(
                "CkptsvcCallback has no root yet: pass root=... (or callbacks=[...] to the "
                "Trainer constructor, which sets it to args.output_dir) before resume_path()"
            )
        return self.root

    def _prepare_output_dir(self, args: TrainingArguments, state: TrainerState) -> None:
        """Step 1: make ``get_last_checkpoint(args.output_dir)`` find what it should."""
        root = Location.parse(self._root_or_error(), self.storage_options)
        out = Path(str(args.output_dir)).absolute()
        if root.is_local and Path(root.path).absolute() == out:
            if state.is_world_process_zero and out.is_dir():
                collect_garbage(str(out), shared_memory=False)  # dead saves, never live ones
            return
        if not self._stage_resume:
            return
        if args.world_size > 1:
            logger.info(
                "checkpoints are under %s, not output_dir: pass resume_from_checkpoint="
                "ckpt.resume_path() to resume (each process gets its own directory)",
                root.url,
            )
            return
        found = self._find(None)
        if found is None:
            return
        ckpt, manifest, step = found
        view = out / ckpt.name
        if view.is_symlink() or view.exists():
            logger.warning("%s exists: not replacing it with a view of %s", view, ckpt.url)
            return
        out.mkdir(parents=True, exist_ok=True)
        self._views.append(str(view))
        if ckpt.is_local and manifest.file(TRAINER_STATE_NAME) is not None:
            os.symlink(ckpt.path, view, target_is_directory=True)
        else:
            make_resume_view(ckpt, manifest, view, trainer_key=TRAINER_KEY, rng_key=RNG_KEY)
        self._resume_from = (ckpt.url, step, False)
        logger.info("newest checkpoint %s visible as %s for resume_from_checkpoint", ckpt.url, view)

    # ---- TrainerCallback events -------------------------------------------------------------

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.root is None:
            self.root = str(args.output_dir)
        self._prepare_output_dir(args, state)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._refuse_unsupported(args)
        if self.root is None:
            self.root = str(args.output_dir)
        try:
            self._restore(state, kw.get("optimizer"), kw.get("lr_scheduler"))
        except BaseException:
            self.close()  # the resume views go; no engine was started
            raise
        if self._ckpt is None:
            self._ckpt = AsyncCheckpointer(
                self.root,
                storage_options=self.storage_options,
                max_shard_size=self._max_shard_size,
                metadata=self._metadata,
            )
            limit = args.save_total_limit
            if limit is not None and limit > 0 and state.is_world_process_zero:
                self._retention = Retention(
                    self.root,
                    keep=limit,
                    preserved=lambda: (),
                    storage_options=self.storage_options,
                )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._maybe_save(args, state, control, kw)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._maybe_save(args, state, control, kw)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.close(raise_errors=True)

    # ---- saving -----------------------------------------------------------------------------

    def _refuse_unsupported(self, args: TrainingArguments) -> None:
        if args.load_best_model_at_end or args.save_strategy == "best":
            raise ConfigError(
                "CkptsvcCallback does not support load_best_model_at_end or save_strategy='best' "
                "(the Trainer decides on the best model after callbacks run); use "
                "save_strategy='steps' or 'epoch' and pick the best checkpoint from its metrics"
            )
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise ConfigError(
                "CkptsvcCallback does not support DeepSpeed or FSDP trainers (they save through "
                "their own engines); use ckptsvc.CheckpointManager with FSDP2"
            )

    def _restore(self, state: TrainerState, optimizer: Any, scheduler: Any) -> None:
        """Step 2 of a resume: optimizer and scheduler from the checkpoint resumed from."""
        prepared, self._resume_from = self._resume_from, None
        if state.global_step == 0:
            if prepared is not None and prepared[2]:
                raise StateMismatchError(
                    f"resume_path() prepared {prepared[0]} (step {prepared[1]}), but the "
                    "Trainer started fresh; pass its result as resume_from_checkpoint"
                )
            return
        url = self._resumed_checkpoint(state, prepared)
        if url is None:
            return
        comps = [
            StateComponent(key, obj, SharingPattern.GLOBAL)
            for key, obj in ((OPTIMIZER_KEY, optimizer), (SCHEDULER_KEY, scheduler))
            if obj is not None
        ]
        manifest = checkpoint_info(url, storage_options=self.storage_options).manifest
        present = {c.key for c in manifest.components} if manifest is not None else set()
        comps = [c for c in comps if c.key in present]  # save_only_model checkpoints have none
        load_components(url, comps, storage_options=self.storage_options)
        logger.info("restored %s from %s", [c.key for c in comps], url)

    def _resumed_checkpoint(
        self, state: TrainerState, prepared: tuple[str, int, bool] | None
    ) -> str | None:
        """The URL of the checkpoint the ``Trainer`` resumed from, or ``None`` (with a
        warning) when it is no checkpoint of this callback."""
        step = state.global_step
        if prepared is not None:
            if prepared[1] == step:
                return prepared[0]
            if prepared[2]:
                raise StateMismatchError(
                    f"the Trainer resumed at step {step}, but resume_path() prepared "
                    f"{prepared[0]} (step {prepared[1]}); pass the directory resume_path() "
                    "returned"
                )
        ckpt = Location.parse(self._path(step), self.storage_options)
        try:
            info = checkpoint_info(ckpt)
            ours = (
                info.status is CheckpointStatus.COMPLETE
                and info.manifest is not None
                and TRAINER_KEY in {c.key for c in info.manifest.components}
            )
            saved = (
                read_trainer_state(ckpt, info.manifest, trainer_key=TRAINER_KEY)
                if ours and info.manifest is not None
                else None
            )
        except (CheckpointError, OSError, ValueError) as e:
            raise CheckpointNotFoundError(
                f"the Trainer resumed at step {step}; reading {ckpt.url} to restore the "
                f"optimizer and scheduler failed ({type(e).__name__}: {e}); check it with "
                "`ckptsvc verify`"
            ) from e
        if saved is None:
            logger.warning(
                "the Trainer resumed at step %d from a directory that is no checkpoint of "
                "CkptsvcCallback (%s is none): optimizer and scheduler are restored only if it "
                "holds the Trainer's own optimizer.pt / scheduler.pt",
                step,
                ckpt.url,
            )
            return None
        if saved.get("global_step") != step or saved.get("log_history") != state.log_history:
            raise StateMismatchError(
                f"the Trainer resumed at step {step} from a directory whose trainer state "
                f"differs from {ckpt.url}'s; resume from {ckpt.url} itself, or pass "
                "ckpt.resume_path(<checkpoint>) for a checkpoint elsewhere"
            )
        return ckpt.url

    def _components(
        self, args: TrainingArguments, state: TrainerState, kw: dict[str, Any]
    ) -> list[StateComponent]:
        model = kw.get("model")
        if model is None:
            raise ConfigError("the Trainer passed no model to CkptsvcCallback")
        comps = [
            StateComponent(MODEL_KEY, model, SharingPattern.GLOBAL),
            StateComponent(
                TRAINER_KEY,
                _TrainerStep(state),
                SharingPattern.GLOBAL,
                files={TRAINER_STATE_NAME: trainer_state_file(state)},
            ),
        ]
        if args.save_only_model:
            return comps
        for key, obj in (
            (OPTIMIZER_KEY, kw.get("optimizer")),
            (SCHEDULER_KEY, kw.get("lr_scheduler")),
        ):
            if obj is not None:
                comps.append(StateComponent(key, obj, SharingPattern.GLOBAL))
        name, data = rng_file(args)
        comps.append(
            StateComponent(RNG_KEY, RNGState(), SharingPattern.PER_RANK, files={name: data})
        )
        return comps

    def _maybe_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        kw: dict[str, Any],
    ) -> None:
        if not control.should_save:
            return
        control_state = control.state()  # as Trainer._save_checkpoint records it
        control.should_save = False  # the Trainer's synchronous save must not run
        if self._last_saved_step == state.global_step:
            return
        if self._ckpt is None:
            raise LifecycleError("CkptsvcCallback saw a save before on_train_begin")
        self._raise_earlier_failure()
        exported: Any = state.stateful_callbacks  # a dict once TrainerState is built
        exported["TrainerControl"] = control_state
        comps = self._components(args, state, kw)
        path = self._path(state.global_step)
        if self._retention is not None:
            self._retention.begin_save(path)
        try:
            handle = self._ckpt.save_components(state.global_step, comps, checkpoint_path=path)
        except BaseException:
            if self._retention is not None:
                self._retention.cancel_save(path)
            raise
        if self._retention is not None:
            self._retention.after_save(handle)
        self._handles.append(handle)
        self._last_saved_step = state.global_step
        logger.info(
            "checkpoint step %d: snapshot in %.3f s, writing %s",
            state.global_step,
            handle.timings.blocking_s,
            handle.path,
        )

    def _path(self, step: int) -> str:
        """``<root>/checkpoint-<step>``: the ``Trainer``'s layout."""
        root = self._root_or_error()
        if "://" in root:
            return f"{root.rstrip('/')}/checkpoint-{step}"
        return os.path.join(root, f"checkpoint-{step}")

    def _raise_earlier_failure(self) -> None:
        failed = [h for h in self._handles if h.done() and h.exception(0) is not None]
        self._handles = [h for h in self._handles if not h.done()]
        if failed:
            first = failed[0]
            raise SaveFailedError(
                f"an earlier checkpoint save (step {first.step}, {first.path}) failed: "
                f"{first.exception(0)}"
            ) from first.exception(0)

    def close(self, *, raise_errors: bool = False) -> None:
        """Wait for in-flight saves, stop the engine and remove the resume directories this
        callback made; with ``raise_errors`` raise the first failed save (``on_train_end``
        does)."""
        ckpt, self._ckpt = self._ckpt, None
        retention, self._retention = self._retention, None
        handles, self._handles = self._handles, []
        try:
            if ckpt is not None and raise_errors:
                for h in handles:
                    h.wait()
                ckpt.wait_all()
            if retention is not None and raise_errors:
                retention.wait()
        finally:
            _remove_views(self._views)
            if ckpt is not None:
                ckpt.close()
            if retention is not None:
                retention.close()


def _remove_views(views: list[str]) -> None:
    """Remove the resume directories in ``views`` (at close, or at exit if never closed)."""
    while views:
        remove_view(views.pop())
