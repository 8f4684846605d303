"""Framework integrations with the real frameworks: a Hugging Face ``Trainer`` training a
tiny GPT-2 built from a config on CPU, and a Lightning ``Trainer`` with the CheckpointIO
plugin. Each saves through ckptsvc (node writer process, manifest last), is interrupted,
and resumes in a fresh trainer; the resumed run must end bit-identical to an
uninterrupted one (deterministic CPU kernels; dropout makes that depend on the RNG states)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StorageRoot

from ckptsvc.errors import CheckpointError, StateMismatchError
from ckptsvc.format.manifest import MARKER_NAME
from ckptsvc.liveness import pid_namespace
from ckptsvc.read.discovery import CheckpointStatus, list_checkpoints
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.workers.latest_pointer import POINTER_NAME

# ---- Hugging Face Trainer ----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate (ckptsvc[hf])")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from ckptsvc.integrations.hf_trainer import CkptsvcCallback  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)

SEQ = 16
MAX_STEPS = 6


def _tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.1,  # dropout draws from the torch RNG: exact resume needs it restored
        embd_pdrop=0.1,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def _dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (48, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _args(out: Path, **overrides: Any) -> TrainingArguments:
    kw: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": MAX_STEPS,
        "save_strategy": "steps",
        "save_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "linear",
        "warmup_steps": 2,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    kw.update(overrides)
    return TrainingArguments(**kw)


class _StopAt(TrainerCallback):
    """Interrupt training after ``step`` (the save of that step is already submitted)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step >= self.step:
            control.should_training_stop = True


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _losses(trainer: Trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, torch.Tensor], dict[int, float]]:
    """Final weights and per-step losses of 6 steps with no interruption (saving through
    ckptsvc as well)."""
    out = tmp_path_factory.mktemp("hf-reference")
    model = _tiny_gpt2(seed=0)
    trainer = Trainer(
        model=model, args=_args(out), train_dataset=_dataset(), callbacks=[CkptsvcCallback()]
    )
    trainer.train()
    return _weights(model), _losses(trainer)


def _own_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp dir of this test alone (``tempfile.gettempdir()``), to check it stays empty."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def _fresh_trainer(args: TrainingArguments, *callbacks: TrainerCallback) -> Trainer:
    """A new run on a model of another init (the resume must overwrite every weight)."""
    return Trainer(
        model=_tiny_gpt2(seed=123), args=args, train_dataset=_dataset(), callbacks=list(callbacks)
    )


def _resume_and_check(
    trainer: Trainer,
    resume: str | bool,
    uninterrupted: tuple[dict[str, torch.Tensor], dict[int, float]],
) -> None:
    """Resume ``trainer`` to the end: its weights and the losses of the resumed steps equal
    the uninterrupted run's."""
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == MAX_STEPS
    weights, losses = uninterrupted
    got = _weights(trainer.model)  # type: ignore[arg-type]
    for k, v in weights.items():
        assert torch.equal(got[k], v), f"{k} differs from the uninterrupted run"
    resumed = {s: v for s, v in _losses(trainer).items() if s > 4}
    assert resumed == {s: v for s, v in losses.items() if s > 4}
    assert len(resumed) == 2


@pytest.mark.slow
def test_hf_resume_local_with_hf_layout(
    tmp_path: Path,
    node: str,
    monkeypatch: pytest.MonkeyPatch,
    uninterrupted: tuple[dict[str, torch.Tensor], dict[int, float]],
) -> None:
    tmp = _own_tempdir(tmp_path, monkeypatch)
    out = tmp_path / "out"
    model = _tiny_gpt2(seed=0)
    Trainer(
        model=model,
        args=_args(out),
        train_dataset=_dataset(),
        callbacks=[CkptsvcCallback(), _StopAt(4)],
    ).train()

    # the Trainer's layout: HF finds the newest checkpoint itself
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert find_latest_checkpoint(str(out)) == str(out / "checkpoint-4")
    infos = list_checkpoints(str(out))
    assert [(i.location.name, i.status) for i in infos] == [
        ("checkpoint-2", CheckpointStatus.COMPLETE),
        ("checkpoint-4", CheckpointStatus.COMPLETE),
    ]
    for i in infos:
        assert verify_checkpoint(i.url, deep=True).ok
        assert {c.key for c in i.manifest.components} == {  # type: ignore[union-attr]
            "model",
            "optimizer",
            "scheduler",
            "rng",
            "hf_trainer",
        }
        names = set(os.listdir(i.url))
        assert {"trainer_state.json", "rng_state.pth", "config.json"} <= names
        assert not names & {"optimizer.pt", "scheduler.pt"}  # restored from components
        state = json.loads((Path(i.url) / "trainer_state.json").read_text())
        assert state["global_step"] == int(i.location.name.split("-")[1])

    # from_pretrained reads the checkpoint directory as it is
    loaded = GPT2LMHeadModel.from_pretrained(out / "checkpoint-4")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    copy = tmp_path / "copy"  # the explicit-directory resume gets its own run directory
    shutil.copytree(out, copy)
    _resume_and_check(_fresh_trainer(_args(out), CkptsvcCallback()), True, uninterrupted)
    explicit = str(copy / "checkpoint-4")
    _resume_and_check(_fresh_trainer(_args(copy), CkptsvcCallback()), explicit, uninterrupted)
    assert [i.location.name for i in list_checkpoints(str(copy))] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert list(tmp.iterdir()) == []


@pytest.mark.slow
def test_hf_resume_true_skips_a_save_a_dead_process_left(
    tmp_path: Path,
    node: str,
    uninterrupted: tuple[dict[str, torch.Tensor], dict[int, float]],
) -> None:
    """``get_last_checkpoint`` takes the highest step, complete or not: the callback's
    constructor has ``gc`` remove a dead process's incomplete save first."""
    out = tmp_path / "out"
    Trainer(
        model=_tiny_gpt2(seed=0),
        args=_args(out),
        train_dataset=_dataset(),
        callbacks=[CkptsvcCallback(), _StopAt(4)],
    ).train()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    torn = out / "checkpoint-6"
    torn.mkdir()
    (torn / "model-00001-of-00001.safetensors").write_bytes(b"torn")
    marker = {
        "pid": dead.pid,
        "host": socket.gethostname(),
        "pidns": pid_namespace(),
        "started": datetime.now(timezone.utc).isoformat(),
    }
    (torn / MARKER_NAME).write_text(json.dumps(marker))
    assert get_last_checkpoint(str(out)) == str(torn)

    trainer = _fresh_trainer(_args(out), CkptsvcCallback())
    assert not torn.exists()
    _resume_and_check(trainer, True, uninterrupted)


@pytest.mark.slow
def test_hf_resume_true_with_another_local_root(
    tmp_path: Path,
    node: str,
    uninterrupted: tuple[dict[str, torch.Tensor], dict[int, float]],
) -> None:
    """A root other than output_dir: the newest checkpoint is linked into output_dir for
    ``resume_from_checkpoint=True``, and the link is gone after training."""
    out, root = tmp_path / "out", tmp_path / "ckpts"
    Trainer(
        model=_tiny_gpt2(seed=0),
        args=_args(out),
        train_dataset=_dataset(),
        callbacks=[CkptsvcCallback(root), _StopAt(4)],
    ).train()
    assert not [p for p in os.listdir(out) if p.startswith("checkpoint-")]
    trainer = _fresh_trainer(_args(out), CkptsvcCallback(root))
    assert (out / "checkpoint-4").resolve() == (root / "checkpoint-4").resolve()
    _resume_and_check(trainer, True, uninterrupted)
    assert not [p for p in os.listdir(out) if p.startswith("checkpoint-")]
    assert (root / "checkpoint-4" / "trainer_state.json").is_file()  # the link only went
    assert [i.location.name for i in list_checkpoints(str(root))] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]


@pytest.mark.slow
def test_hf_resume_from_a_foreign_copy_is_refused(tmp_path: Path, node: str) -> None:
    """The Trainer resumed from a directory whose trainer state is not that of
    ``<root>/checkpoint-<step>``: the callback cannot know which optimizer state belongs to
    it and says so, instead of restoring the wrong one."""
    out = tmp_path / "out"
    Trainer(
        model=_tiny_gpt2(seed=0),
        args=_args(out),
        train_dataset=_dataset(),
        callbacks=[CkptsvcCallback(), _StopAt(4)],
    ).train()
    other = tmp_path / "other" / "checkpoint-4"
    shutil.copytree(out / "checkpoint-4", other)
    state = json.loads((other / "trainer_state.json").read_text())
    state["log_history"][0]["loss"] += 1.0  # another run's history
    (other / "trainer_state.json").write_text(json.dumps(state))
    trainer = _fresh_trainer(_args(out), CkptsvcCallback())
    with pytest.raises(StateMismatchError, match="resume_path"):
        trainer.train(resume_from_checkpoint=str(other))


@pytest.mark.slow
def test_hf_resume_from_s3(
    tmp_path: Path,
    node: str,
    s3_root: StorageRoot,
    monkeypatch: pytest.MonkeyPatch,
    uninterrupted: tuple[dict[str, torch.Tensor], dict[int, float]],
) -> None:
    tmp = _own_tempdir(tmp_path, monkeypatch)
    out = tmp_path / "out"
    root, opts = s3_root.url, s3_root.storage_options
    Trainer(
        model=_tiny_gpt2(seed=0),
        args=_args(out),
        train_dataset=_dataset(),
        callbacks=[CkptsvcCallback(root, storage_options=opts), _StopAt(4)],
    ).train()
    infos = list_checkpoints(root, storage_options=opts)
    assert [i.url for i in infos] == [f"{root}/checkpoint-2", f"{root}/checkpoint-4"]
    assert all(i.status is CheckpointStatus.COMPLETE for i in infos)
    assert not out.exists() or not [p for p in os.listdir(out) if p.startswith("checkpoint-")]

    # resume_from_checkpoint=True: the constructor made the newest one visible locally
    trainer = _fresh_trainer(_args(out), CkptsvcCallback(root, storage_options=opts))
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    _resume_and_check(trainer, True, uninterrupted)
    assert not [p for p in os.listdir(out) if p.startswith("checkpoint-")]  # view removed

    # an explicit checkpoint: resume_path() of its URL (stops at 5, so nothing is saved)
    cb2 = CkptsvcCallback(root, storage_options=opts, stage_resume=False)
    trainer2 = _fresh_trainer(_args(out), cb2, _StopAt(5))
    path = cb2.resume_path(f"{root}/checkpoint-4")
    assert path is not None and Path(path).is_relative_to(tmp)
    assert not (Path(path) / "optimizer_state.safetensors").exists()  # read from S3
    trainer2.train(resume_from_checkpoint=path)
    assert _losses(trainer2)[5] == uninterrupted[1][5]
    assert list(tmp.iterdir()) == []


def test_hf_resume_path_without_checkpoints_and_save_total_limit(tmp_path: Path) -> None:
    cb = CkptsvcCallback()
    trainer = Trainer(
        model=_tiny_gpt2(0),
        args=_args(tmp_path, save_total_limit=1),
        train_dataset=_dataset(),
        callbacks=[cb],
    )
    assert cb.root == str(tmp_path)  # set from args.output_dir by the constructor
    assert cb.resume_path() is None  # nothing yet: train() starts fresh
    trainer.train(resume_from_checkpoint=cb.resume_path())
    names = [i.location.name for i in list_checkpoints(str(tmp_path))]
    assert names == ["checkpoint-6"]  # retention kept the newest one only


def test_hf_failed_save_fails_the_run(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="file-not-dir"):  # looking for a resume
        Trainer(
            model=_tiny_gpt2(0),
            args=_args(tmp_path / "out", max_steps=2),
            train_dataset=_dataset(),
            callbacks=[CkptsvcCallback(blocker)],
        )
    cb = CkptsvcCallback(blocker, stage_resume=False)
    trainer = Trainer(
        model=_tiny_gpt2(0),
        args=_args(tmp_path / "out", max_steps=2),
        train_dataset=_dataset(),
        callbacks=[cb],
    )
    with pytest.raises(CheckpointError, match="file-not-dir"):  # raised by save() itself now
        trainer.train()


def test_hf_refuses_load_best_model_at_end(tmp_path: Path) -> None:
    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True)
    trainer = Trainer(
        model=_tiny_gpt2(0),
        args=args,
        train_dataset=_dataset(),
        eval_dataset=_dataset()[:4],
        callbacks=[CkptsvcCallback()],
    )
    with pytest.raises(CheckpointError, match="load_best_model_at_end"):
        trainer.train()


# ---- Lightning ---------------------------------------------------------------------------------


def _lightning() -> Any:
    return pytest.importorskip("lightning.pytorch", reason="needs lightning (ckptsvc[lightning])")


def _lit_module(pl: Any, seed: int) -> Any:
    from dist_workers.lightning_worker import Tiny  # the DDP test's module (imports lightning)

    return Tiny(seed)


def _lit_data() -> Any:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)  # two batches per epoch
    ds = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)


def _lit_trainer(pl: Any, out: Path, max_steps: int, plugin: Any) -> Any:
    # epoch-end saves: Lightning restarts a non-resumable dataloader's epoch from its
    # first batch, so only epoch boundaries resume onto the same data as an unbroken run
    ckpt_cb = pl.callbacks.ModelCheckpoint(
        dirpath=str(out / "ckpts"),
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        save_top_k=-1,
        filename="{step}",
    )
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt_cb],
        plugins=[plugin],
        deterministic=True,
    )


def _interrupt_and_resume(pl: Any, out: Path, make_plugin: Any) -> tuple[Any, Path]:
    """Train to step 4 (checkpoints at epoch ends), then resume a fresh module to step 6."""
    first = _lit_module(pl, seed=0)
    _lit_trainer(pl, out, 4, make_plugin()).fit(first, _lit_data())
    resumed = _lit_module(pl, seed=123)
    ckpt = out / "ckpts" / "step=4.ckpt"
    _lit_trainer(pl, out, 6, make_plugin()).fit(resumed, _lit_data(), ckpt_path=str(ckpt))
    return resumed, out / "ckpts"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # Lightning's
def test_lightning_checkpoint_io_saves_async_and_resumes(tmp_path: Path) -> None:
    pl = _lightning()
    from lightning.fabric.plugins import TorchCheckpointIO

    from ckptsvc.integrations.lightning import CkptsvcCheckpointIO

    # Lightning's own torch.save plugin is the reference: same resume, same result
    reference, _ = _interrupt_and_resume(pl, tmp_path / "torch", TorchCheckpointIO)
    resumed, ckpt_dir = _interrupt_and_resume(pl, tmp_path / "ckptsvc", CkptsvcCheckpointIO)
    for (k, v), (_, w) in zip(
        reference.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(v, w), f"{k} differs from the run resumed by TorchCheckpointIO"

    saved = sorted(p.name for p in ckpt_dir.iterdir() if p.name != POINTER_NAME)
    assert saved == sorted(p.name for p in (tmp_path / "torch" / "ckpts").iterdir())
    assert saved[:2] == ["step=2.ckpt", "step=4.ckpt"]
    for name in saved:  # each "file" is a complete, verified ckptsvc checkpoint directory
        assert verify_checkpoint(str(ckpt_dir / name), deep=True).ok
    # the dirpath is a root to discovery (ls, verify, gc, prune): Lightning's names, in order
    assert [i.location.name for i in list_checkpoints(str(ckpt_dir))] == saved

    plugin = CkptsvcCheckpointIO()
    ours = plugin.load_checkpoint(ckpt_dir / "step=4.ckpt")
    theirs = TorchCheckpointIO().load_checkpoint(tmp_path / "torch" / "ckpts" / "step=4.ckpt")
    assert ours["global_step"] == theirs["global_step"] == 4
    assert ours["hyper_parameters"] == {"hidden": 16, "lr": 0.05}
    assert ours["loops"] == theirs["loops"]
    assert ours["lr_schedulers"] == theirs["lr_schedulers"]
    for k, v in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][k], v), k
    assert (
        ours["optimizer_states"][0]["param_groups"] == theirs["optimizer_states"][0]["param_groups"]
    )
    for i, slots in theirs["optimizer_states"][0]["state"].items():
        for name, value in slots.items():
            assert torch.equal(ours["optimizer_states"][0]["state"][i][name], value), (i, name)

    plugin.remove_checkpoint(ckpt_dir / "step=2.ckpt")
    assert not (ckpt_dir / "step=2.ckpt").exists()
    plugin.teardown()
