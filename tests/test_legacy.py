"""Checkpoints written by Forgather's own CheckpointManager load through CheckpointManager.

The fixture is written here, file by file, the way Forgather writes it: weights as
``pytorch_model-*.bin`` + index, each component as ``{key}_state.pt`` /
``{key}_state_rank_{r}.pt`` (``torch.save``), ``checkpoint_metadata.pt`` with the best
checkpoints and callback states keyed by position, and Forgather's manifest.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_models import TiedLM, assert_bitwise_equal

from ckptsvc.compat.training_state import SimpleStatefulProvider, TrainingProgress
from ckptsvc.errors import CorruptCheckpointError, StateMismatchError
from ckptsvc.manager import CheckpointConfig, CheckpointManager
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.legacy import is_legacy_state_checkpoint
from ckptsvc.stage.components import RNGState

pytestmark = pytest.mark.usefixtures("node")  # a private node writer per test (conftest)


class Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.value = int(sd["value"])


class Plain:
    """A non-Stateful callback: it still takes a position in Forgather's numbering."""


class Custom:
    """A class torch.load(weights_only=True) refuses to unpickle."""

    def __init__(self) -> None:
        self.x = 1


def _trained() -> tuple[TiedLM, torch.optim.Optimizer, Any]:
    model = TiedLM(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    for _ in range(3):
        loss = model(torch.arange(6).reshape(2, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def write_forgather_checkpoint(
    ckpt: Path, *, manifest: bool = True, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A Forgather checkpoint of a trained TiedLM; returns what was saved."""
    ckpt.mkdir(parents=True)
    model, opt, sched = _trained()
    sd = model.state_dict()  # tied: both names, one storage (torch.save keeps the sharing)
    shard = "pytorch_model-00001-of-00001.bin"
    torch.save(sd, ckpt / shard)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {
        "metadata": {"total_size": total, "param_sharing": [["embed.weight", "head.weight"]]},
        "weight_map": dict.fromkeys(sd, shard),
    }
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=4))
    torch.manual_seed(1234)
    rng = {"torch_rng_state": torch.get_rng_state(), "initial_seed": torch.initial_seed()}
    trainer = {"global_step": 30, "epoch": 1, "samples_seen": 240, "tokens_seen": 0, "extra": {}}
    states = {
        "optimizer_state.pt": opt.state_dict(),
        "scheduler_state.pt": sched.state_dict(),
        "trainer_state.pt": trainer,
        "rng_state_rank_0.pt": rng,
        **(extra or {}),
    }
    for name, state in states.items():
        torch.save(state, ckpt / name)
    best = [(str(ckpt), 0.25)]
    torch.save(
        {"best_checkpoints": best, "callback_states": {"callback_1_Counter": {"value": 9}}},
        ckpt / "checkpoint_metadata.pt",
    )
    if manifest:
        doc = {
            "checkpoint_path": str(ckpt),
            "world_size": 1,
            "timestamp": datetime.datetime.now().isoformat(),
            "components": {
                key: {
                    "key": key,
                    "sharing_pattern": pattern,
                    "ranks": [0],
                    "replicated_across": None,
                    "group_name": None,
                    "size_bytes": os.path.getsize(ckpt / f"{key}_state{suffix}.pt"),
                    "checksum": None,
                    "metadata": {},
                }
                for key, pattern, suffix in (
                    ("optimizer", "global", ""),
                    ("scheduler", "global", ""),
                    ("trainer", "global", ""),
                    ("rng", "per_rank", "_rank_0"),
                )
            },
            "training_args_hash": None,
            "forgather_version": "0.9.0",
            "pytorch_version": torch.__version__,
            "metadata": {},
        }
        (ckpt / "checkpoint_manifest.json").write_text(json.dumps(doc, indent=2))
    return {"model": model, "opt": opt, "sched": sched, "rng": rng["torch_rng_state"], "best": best}


class Run:
    def __init__(self, root: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self.model = TiedLM(seed=9)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.5)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.9)
        self.progress = TrainingProgress()
        self.callbacks = [Plain(), Counter()]
        provider = SimpleStatefulProvider(
            {
                "optimizer": self.opt,
                "scheduler": self.sched,
                "trainer": self.progress,
                "rng": RNGState(),
            }
        )
        cfg = CheckpointConfig(
            output_dir=root, save_total_limit=None, storage_options=storage_options
        )
        self.manager = CheckpointManager(
            config=cfg, stateful_provider=provider, model=self.model, callbacks=self.callbacks
        )


def _check_restored(run: Run, saved: dict[str, Any]) -> None:
    for k, v in saved["model"].state_dict().items():
        assert_bitwise_equal(run.model.state_dict()[k], v, name=k)
    assert run.model.head.weight is run.model.embed.weight
    got, want = run.opt.state_dict(), saved["opt"].state_dict()
    assert got["param_groups"] == want["param_groups"]
    for pid in want["state"]:
        for k, v in want["state"][pid].items():
            assert_bitwise_equal(got["state"][pid][k], v, name=f"opt.{pid}.{k}")
    assert run.sched.state_dict() == saved["sched"].state_dict()
    assert run.progress.global_step == 30 and run.progress.samples_seen == 240
    assert torch.equal(torch.get_rng_state(), saved["rng"])
    assert run.callbacks[1].value == 9


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
def test_forgather_checkpoint_loads(tmp_path: Path, manifest: bool) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-30"
    saved = write_forgather_checkpoint(ckpt, manifest=manifest)
    assert find_latest_checkpoint(str(tmp_path / "run")) == str(ckpt)
    torch.manual_seed(99)  # the load must restore the generator, not leave this one
    run = Run(str(tmp_path / "run"))
    with run.manager as m:
        assert m.load_checkpoint() == str(ckpt)
        assert m.best_checkpoints == saved["best"]
    _check_restored(run, saved)


def test_forgather_checkpoint_loads_from_s3(tmp_path: Path, s3_root: Any) -> None:
    local = tmp_path / "run" / "checkpoints" / "checkpoint-30"
    saved = write_forgather_checkpoint(local)
    fs = s3_root.fs()
    remote = s3_root.url.removeprefix("s3://") + "/checkpoints/checkpoint-30"
    for f in local.iterdir():
        fs.put_file(str(f), f"{remote}/{f.name}")
    run = Run(s3_root.url, storage_options=s3_root.storage_options)
    with run.manager as m:
        assert m.load_checkpoint().endswith("checkpoints/checkpoint-30")
    saved["best"] = []  # the saved best path is local; it does not exist on S3
    _check_restored(run, saved)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-30"
    write_forgather_checkpoint(ckpt, extra={"trainer_state.pt": {"obj": Custom()}})
    run = Run(str(tmp_path / "run"))
    with run.manager as m, pytest.raises(CorruptCheckpointError, match="weights_only"):
        m.load_checkpoint()


def test_a_missing_component_file_is_an_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-30"
    write_forgather_checkpoint(ckpt)
    (ckpt / "scheduler_state.pt").unlink()
    run = Run(str(tmp_path / "run"))
    with run.manager as m, pytest.raises(StateMismatchError, match="scheduler"):
        m.load_checkpoint()


def test_detection() -> None:
    assert is_legacy_state_checkpoint(["optimizer_state.pt", "pytorch_model.bin"], None)
    assert is_legacy_state_checkpoint(["checkpoint_metadata.pt"], None)
    assert not is_legacy_state_checkpoint(["optimizer_state.json", "model.safetensors"], None)
