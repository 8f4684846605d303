"""Asynchronous ckptsvc checkpoints for the Hugging Face ``Trainer``: add one callback.

Usage (``pip install 'ckptsvc[hf]'``)::

    from ckptsvc.integrations.hf_trainer import CkptsvcCallback

    ckpt = CkptsvcCallback()                 # root: args.output_dir; or root="s3://bucket/run1"
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ckpt])
    trainer.train(resume_from_checkpoint=ckpt.resume_path())   # None: nothing to resume

Checkpoints go to ``<root>/checkpoints/checkpoint-<global_step>`` (so ``ckptsvc ls``,
``verify``, ``cp``, ``prune`` and ``gc`` work on the run) and hold: the model as Hugging Face
safetensors shards + ``model.safetensors.index.json`` (``from_pretrained(ckpt, config=...)``
loads them), and the optimizer, LR scheduler, RNG states (per rank) and ``TrainerState`` as
ckptsvc components (``<key>_state.*``: safetensors + JSON, nothing pickled).

Call order (the training thread unless noted):

1. ``on_init_end`` / ``on_train_begin``: the root defaults to ``args.output_dir``; at train
   begin the ``AsyncCheckpointer`` starts (its node writer process too) and, when
   :meth:`CkptsvcCallback.resume_path` prepared a resume, the optimizer and scheduler are
   restored from the checkpoint (the ``Trainer`` has restored weights, trainer state and RNG
   from the resume directory by then);
2. ``on_step_end`` / ``on_epoch_end``, right after ``DefaultFlowCallback`` decided to save:
   snapshot model, optimizer, scheduler, RNG and trainer state into shared memory
   (``save_components``: returns after the copy), then clear ``control.should_save`` so the
   ``Trainer``'s synchronous ``_save_checkpoint`` does not run. The node writer writes the
   checkpoint and commits its manifest last; ``save_total_limit`` is applied by
   ``ckptsvc.ops.best_checkpoints.Retention`` on a background thread after each commit;
3. ``on_train_end``: wait for every save and raise the first failure (a run never ends
   believing it is checkpointed when it is not), then stop the engine.

Resuming: ``Trainer.train(resume_from_checkpoint=dir)`` reads ``trainer_state.json``,
weights and ``rng_state.pth`` from a *local* directory. :meth:`CkptsvcCallback.resume_path`
builds one (a "resume view", never the committed checkpoint itself) from the newest complete
checkpoint under the root, or the one given: weight files are linked (local disk) or copied
and CRC-verified (object stores), ``trainer_state.json`` and ``rng_state.pth`` are written
from the checkpoint's components. The optimizer and scheduler are loaded in step 1 straight
from the checkpoint, wherever it is.

Not supported (refused with an error where detectable): ``save_strategy="best"`` and
``load_best_model_at_end`` (the best-model decision runs after the callbacks, so the save
cannot be intercepted), DeepSpeed and FSDP trainers (they save through their own engines).
Not saved: the fp16 ``GradScaler`` state, the ``Trainer``'s ``config.json`` / tokenizer
copies (call ``trainer.save_model()`` for an export), and the states of other
``ExportableState`` callbacks (a callback cannot see them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, SaveHandle, load_components
from ckptsvc.errors import (
    CheckpointNotFoundError,
    ConfigError,
    LifecycleError,
    SaveFailedError,
    StateMismatchError,
)
from ckptsvc.format.json_doc import read_json_doc
from ckptsvc.format.layout import SAFE_WEIGHTS_INDEX_NAME
from ckptsvc.ops.best_checkpoints import Retention
from ckptsvc.ops.transfer import copy_files
from ckptsvc.read.discovery import CheckpointStatus, checkpoint_info, next_checkpoint_path
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
_TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME


class _Captured:
    """A stateful that only records what is loaded into it (to read a component as data)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = state_dict


class _TrainerStateJson:
    """The ``TrainerState`` as the exact JSON ``TrainerState.save_to_json`` writes."""

    def __init__(self, state: TrainerState) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        text = json.dumps(dataclasses.asdict(self._state), indent=2, sort_keys=True) + "\n"
        return {"trainer_state_json": text, "global_step": self._state.global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # pragma: no cover
        raise LifecycleError("the trainer state is restored by Trainer from trainer_state.json")


def _read_component(
    ckpt: str, key: str, pattern: SharingPattern, opts: dict[str, Any], *, required: bool = True
) -> Any:
    """Component ``key`` as data (``None`` when an optional one is absent)."""
    box = _Captured()
    load_components(
        ckpt, [StateComponent(key, box, pattern, required=required)], storage_options=opts
    )
    return box.state


def _hf_rng_state(saved: dict[str, Any], *, distributed: bool) -> dict[str, Any]:
    """An ``RNGState`` state dict in the layout ``Trainer._load_rng_state`` reads."""
    py = saved["python"]
    npd = saved["numpy"]
    key = torch.as_tensor(npd["key"]).numpy().astype("uint32")
    out: dict[str, Any] = {
        "python": (int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss"]),
        "numpy": (
            npd["bit_generator"],
            key,
            int(npd["pos"]),
            int(npd["has_gauss"]),
            float(npd["gauss"]),
        ),
        "cpu": torch.as_tensor(saved["torch_cpu"], dtype=torch.uint8),
    }
    cuda = saved.get("torch_cuda")
    if cuda and torch.cuda.is_available():
        states = [torch.as_tensor(s, dtype=torch.uint8) for s in cuda]
        out["cuda"] = states if distributed else states[torch.cuda.current_device()]
    return out


class CkptsvcCallback(TrainerCallback):
    """Replaces the ``Trainer``'s synchronous checkpoint saves with ckptsvc async saves.

    See the module docstring for the call order. ``root`` (path or URL; default
    ``args.output_dir``) is the model directory; ``storage_options`` go to fsspec;
    ``max_shard_size`` caps weight shard files; ``metadata`` goes to every manifest.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        max_shard_size: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.root: str | None = None if root is None else os.fspath(root)
        self.storage_options = dict(storage_options or {})
        self._max_shard_size = max_shard_size
        self._metadata = dict(metadata or {})
        self._ckpt: AsyncCheckpointer | None = None
        self._retention: Retention | None = None
        self._handles: list[SaveHandle] = []
        self._last_saved_step: int | None = None
        self._resume_from: tuple[str, int] | None = None

    # ---- resuming ---------------------------------------------------------------------------

    def resume_path(
        self, checkpoint: str | None = None, *, local_dir: str | os.PathLike[str] | None = None
    ) -> str | None:
        """A local directory to pass as ``trainer.train(resume_from_checkpoint=...)``.

        ``checkpoint``: a checkpoint written by this callback (path or URL); default: the
        newest complete one under the root (``None`` is returned when there is none, which
        makes the ``Trainer`` start fresh). ``local_dir``: where the resume directory is
        made (default: a new temporary directory); weights of a remote checkpoint are
        downloaded there.
        """
        opts = self.storage_options
        if checkpoint is None:
            checkpoint = find_latest_checkpoint(self._root_or_error(), storage_options=opts)
            if checkpoint is None:
                logger.info("no complete checkpoint under %s: training starts fresh", self.root)
                return None
        ckpt = Location.parse(checkpoint, opts)
        info = checkpoint_info(ckpt)
        keys = {c.key for c in info.manifest.components} if info.manifest is not None else set()
        if info.status is not CheckpointStatus.COMPLETE or not {MODEL_KEY, TRAINER_KEY} <= keys:
            raise CheckpointNotFoundError(
                f"{ckpt.url} is not a complete checkpoint written by CkptsvcCallback "
                f"({info.status.value}{', components ' + str(sorted(keys)) if keys else ''})"
            )
        step = info.step if info.step is not None else -1
        base = (
            Path(local_dir)
            if local_dir is not None
            else Path(tempfile.mkdtemp(prefix="ckptsvc-hf-resume-"))
        )
        view = base / ckpt.name
        view.mkdir(parents=True, exist_ok=True)
        self._link_or_copy_weights(ckpt, view)
        trainer_state = _read_component(ckpt.url, TRAINER_KEY, SharingPattern.GLOBAL, opts)
        (view / _TRAINER_STATE_NAME).write_text(str((trainer_state or {})["trainer_state_json"]))
        self._write_rng_state(ckpt.url, view)
        self._resume_from = (ckpt.url, step)
        logger.info("resume directory for %s (step %s): %s", ckpt.url, step, view)
        return str(view)

    def _link_or_copy_weights(self, ckpt: Location, view: Path) -> None:
        index = read_json_doc(ckpt.join(SAFE_WEIGHTS_INDEX_NAME), what="index")
        names = sorted({SAFE_WEIGHTS_INDEX_NAME, *index["weight_map"].values()})
        if not ckpt.is_local:
            copy_files(
                ckpt,
                str(view),
                paths=names,
                storage_options=self.storage_options,
                dst_storage_options={},
            )
            return
        for name in names:
            link = view / name
            if link.is_symlink() or link.exists():
                link.unlink()
            os.symlink(os.path.join(ckpt.path, name), link)

    def _write_rng_state(self, ckpt_url: str, view: Path) -> None:
        """HF's ``rng_state[_<rank>].pth`` (a tiny pickle of plain values, which the
        ``Trainer`` loads with ``weights_only=True``) from this rank's RNG component."""
        saved = _read_component(
            ckpt_url, RNG_KEY, SharingPattern.PER_RANK, self.storage_options, required=False
        )  # save_only_model checkpoints hold none
        if not saved:
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        name = f"rng_state_{rank}.pth" if distributed else "rng_state.pth"
        torch.save(_hf_rng_state(saved, distributed=distributed), view / name)

    def _root_or_error(self) -> str:
        if self.root is None:
            raise ConfigError(
                "CkptsvcCallback has no root yet: pass root=... (or callbacks=[...] to the "
                "Trainer constructor, which sets it to args.output_dir) before resume_path()"
            )
        return self.root

    # ---- TrainerCallback events -------------------------------------------------------------

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.root is None:
            self.root = str(args.output_dir)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._refuse_unsupported(args)
        if self.root is None:
            self.root = str(args.output_dir)
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
        self._restore(state, kw.get("optimizer"), kw.get("lr_scheduler"))

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
        """Step 1 of a resume: optimizer and scheduler from the checkpoint."""
        resume, self._resume_from = self._resume_from, None
        if resume is None:
            if state.global_step > 0:
                logger.warning(
                    "the Trainer resumed at step %d from a directory resume_path() did not "
                    "prepare: optimizer and scheduler are restored only if it holds the "
                    "Trainer's own optimizer.pt / scheduler.pt",
                    state.global_step,
                )
            return
        url, step = resume
        if step != state.global_step:
            raise StateMismatchError(
                f"the Trainer resumed at step {state.global_step}, but resume_path() prepared "
                f"{url} (step {step}); pass the directory resume_path() returned"
            )
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

    def _components(
        self, args: TrainingArguments, state: TrainerState, kw: dict[str, Any]
    ) -> list[StateComponent]:
        model = kw.get("model")
        if model is None:
            raise ConfigError("the Trainer passed no model to CkptsvcCallback")
        comps = [
            StateComponent(MODEL_KEY, model, SharingPattern.GLOBAL),
            StateComponent(TRAINER_KEY, _TrainerStateJson(state), SharingPattern.GLOBAL),
        ]
        if args.save_only_model:
            return comps
        for key, obj in (
            (OPTIMIZER_KEY, kw.get("optimizer")),
            (SCHEDULER_KEY, kw.get("lr_scheduler")),
        ):
            if obj is not None:
                comps.append(StateComponent(key, obj, SharingPattern.GLOBAL))
        comps.append(StateComponent(RNG_KEY, RNGState(), SharingPattern.PER_RANK))
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
            handle = self._ckpt.save_components(state.global_step, comps)
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
        return next_checkpoint_path(self._root_or_error(), step)

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
        """Wait for in-flight saves and stop the engine; with ``raise_errors`` raise the
        first failed save (``on_train_end`` does)."""
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
            if ckpt is not None:
                ckpt.close()
            if retention is not None:
                retention.close()
