"""The files the Hugging Face ``Trainer`` reads on resume, for :mod:`~ckptsvc.integrations.hf_trainer`.

What ``Trainer.train(resume_from_checkpoint=...)`` reads (transformers' ``trainer.py``), all
from one *local* directory:

- ``resume_from_checkpoint=True``: ``get_last_checkpoint(args.output_dir)``, the
  ``checkpoint-<n>`` directory with the highest ``n`` (it checks nothing else);
- ``_load_from_checkpoint``: ``config.json`` (a version check) and the weights
  (``model.safetensors`` for a model in one file, else ``model.safetensors.index.json`` +
  its shards);
- ``TrainerState.load_from_json``: ``trainer_state.json``;
- ``_load_rng_state``: ``rng_state.pth`` (``rng_state_<process_index>.pth`` when
  ``world_size > 1``), skipped with an info message when absent;
- ``_load_optimizer_and_scheduler`` / ``_load_scaler``: ``optimizer.pt`` + ``scheduler.pt`` /
  ``scaler.pt``, each only when present.

A checkpoint of ``CkptsvcCallback`` holds the first four (``trainer_state.json`` and the RNG
file as :attr:`~ckptsvc.stage.components.StateComponent.files` of its ``hf_trainer`` and
``rng`` components, in the same commit, listed in the manifest) and none of the ``.pt``
files: the callback restores optimizer and scheduler from its own components, so nothing is
loaded twice. :func:`make_resume_view` builds the directory the ``Trainer`` needs where the
checkpoint itself cannot serve (an object store; a checkpoint of an older callback, which
held ``trainer_state.json`` and the RNG states as components only).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerState, TrainingArguments
from transformers.training_args import ParallelMode

from ckptsvc.engine.async_checkpointer import load_components
from ckptsvc.format.json_doc import read_json_doc
from ckptsvc.format.layout import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from ckptsvc.format.manifest import Manifest
from ckptsvc.ops.transfer import copy_files
from ckptsvc.stage.components import SharingPattern, StateComponent
from ckptsvc.storage import Location

__all__ = [
    "TRAINER_STATE_NAME",
    "make_resume_view",
    "read_trainer_state",
    "remove_view",
    "rng_file",
    "trainer_state_file",
]

TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
#: the model files ``from_pretrained`` and ``_load_from_checkpoint`` read besides the shards
_CONFIG_NAMES = ("config.json", "generation_config.json")


def trainer_state_file(state: TrainerState) -> bytes:
    """``trainer_state.json`` exactly as ``TrainerState.save_to_json`` writes it."""
    text = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"
    return text.encode("utf-8")


def rng_file(args: TrainingArguments) -> tuple[str, bytes]:
    """(name, bytes) of this process's RNG file as ``Trainer._save_rng_state`` writes it:
    ``rng_state.pth`` or, with several processes, ``rng_state_<process_index>.pth`` (a
    pickle of plain values, loaded by the ``Trainer`` with ``weights_only=True``)."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        if args.parallel_mode == ParallelMode.DISTRIBUTED:
            states["cuda"] = torch.cuda.random.get_rng_state_all()
        else:
            states["cuda"] = torch.cuda.random.get_rng_state()
    buf = io.BytesIO()
    torch.save(states, buf)
    name = "rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth"
    return name, buf.getvalue()


class _Captured:
    """A stateful that only records what is loaded into it (to read a component as data)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = state_dict


def _read_component(
    ckpt: Location, key: str, pattern: SharingPattern, *, required: bool = True
) -> Any:
    """Component ``key`` as data (``None`` when an optional one is absent)."""
    box = _Captured()
    load_components(
        ckpt.url,
        [StateComponent(key, box, pattern, required=required)],
        storage_options=ckpt.storage_options,
    )
    return box.state


def read_trainer_state(ckpt: Location, manifest: Manifest, *, trainer_key: str) -> dict[str, Any]:
    """The ``TrainerState`` saved in ``ckpt`` as JSON data: its ``trainer_state.json``, or
    (older callback) the ``trainer_state_json`` of component ``trainer_key``."""
    if manifest.file(TRAINER_STATE_NAME) is not None:
        return dict(read_json_doc(ckpt.join(TRAINER_STATE_NAME), what="trainer state"))
    saved = _read_component(ckpt, trainer_key, SharingPattern.GLOBAL) or {}
    return dict(json.loads(str(saved["trainer_state_json"])))


def make_resume_view(
    ckpt: Location, manifest: Manifest, view: Path, *, trainer_key: str, rng_key: str
) -> None:
    """Make ``view`` a directory the ``Trainer`` resumes from: the weights, configs,
    ``trainer_state.json`` and RNG files of ``ckpt``, downloaded (and verified against the
    manifest) from an object store or linked on local disk; files an older callback did not
    write are made from its components."""
    names = set(_CONFIG_NAMES) | {TRAINER_STATE_NAME}
    names.add(SAFE_WEIGHTS_NAME)  # a model in one file has no index (as transformers saves it)
    if manifest.file(SAFE_WEIGHTS_INDEX_NAME) is not None:
        index = read_json_doc(ckpt.join(SAFE_WEIGHTS_INDEX_NAME), what="index")
        names |= {SAFE_WEIGHTS_INDEX_NAME, *index["weight_map"].values()}
    present = sorted(
        f.path
        for f in manifest.files
        if f.path in names or (f.path.startswith("rng_state") and f.path.endswith(".pth"))
    )
    view.mkdir(parents=True, exist_ok=True)
    if ckpt.is_local:
        for name in present:
            link = view / name
            if link.is_symlink() or link.exists():
                link.unlink()
            os.symlink(os.path.join(ckpt.path, name), link)
    else:
        copy_files(
            ckpt,
            str(view),
            paths=present,
            storage_options=ckpt.storage_options,
            dst_storage_options={},
        )
    if TRAINER_STATE_NAME not in present:  # an older callback's checkpoint
        state = read_trainer_state(ckpt, manifest, trainer_key=trainer_key)
        (view / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    if not any(p.startswith("rng_state") for p in present):
        _write_rng_from_component(ckpt, view, rng_key=rng_key)


def remove_view(view: str) -> None:
    """Remove a resume view (a symlink to a checkpoint or a directory this module made)."""
    if os.path.islink(view):
        os.unlink(view)
    else:
        shutil.rmtree(view, ignore_errors=True)


def _write_rng_from_component(ckpt: Location, view: Path, *, rng_key: str) -> None:
    """``rng_state[_<rank>].pth`` from this rank's RNG component (an older checkpoint)."""
    saved = _read_component(ckpt, rng_key, SharingPattern.PER_RANK, required=False)
    if not saved:  # save_only_model checkpoints hold none
        return
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    name = f"rng_state_{rank}.pth" if distributed else "rng_state.pth"
    torch.save(_hf_rng_state(saved, distributed=distributed), view / name)


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
