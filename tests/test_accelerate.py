"""``ckptsvc.integrations.accelerate`` with the real ``accelerate``: a tiny training run
(tests/dist_workers/accelerate_worker.py) saved asynchronously, stopped mid-epoch and
resumed in a fresh accelerator must produce the losses of an uninterrupted run, step for
step, on one process and on two (``accelerate launch``, gloo); a directory written by
``accelerator.save_state`` resumes the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate", reason="needs accelerate (ckptsvc[hf])")

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from dist_workers.accelerate_worker import Counter, build, train
from dist_workers.launch import free_port

from ckptsvc.errors import (
    ConfigError,
    CorruptCheckpointError,
    StateMismatchError,
    UnsafeCheckpointError,
)
from ckptsvc.integrations import accelerate as ckpt_accel
from ckptsvc.read.discovery import CheckpointStatus, list_checkpoints
from ckptsvc.read.verify import verify_checkpoint

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "dist_workers" / "accelerate_worker.py"
COMPONENTS = {
    "model",
    "optimizer",
    "scheduler",
    "custom_0",
    "accelerator",
    "dataloader",
    "rng",
}


def _resumed(first: dict[int, float], second: dict[int, float], at: int) -> dict[int, float]:
    assert min(second) == at + 1, f"the resumed run started at step {min(second)}"
    return {**{k: v for k, v in first.items() if k <= at}, **second}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The losses of a run with no interruption (and no saves)."""
    return train(str(tmp_path_factory.mktemp("reference")))["losses"]


def test_save_async_and_resume_with_identical_losses(
    tmp_path: Path, node: str, reference: dict[int, float]
) -> None:
    root = str(tmp_path / "run")
    first = train(root, stop_after=8, save_every=4)["losses"]  # stops mid-epoch 2
    infos = list_checkpoints(root)
    assert [(i.location.name, i.status) for i in infos] == [
        ("checkpoint-4", CheckpointStatus.COMPLETE),
        ("checkpoint-8", CheckpointStatus.COMPLETE),
    ]
    manifest = infos[-1].manifest
    assert manifest is not None
    assert {c.key for c in manifest.components} == COMPONENTS
    assert verify_checkpoint(infos[-1].url, deep=True).ok
    # the weights are Hugging Face's model.safetensors (one shard) under unwrapped names
    from safetensors import safe_open

    ckpt8 = tmp_path / "run/checkpoints/checkpoint-8"
    assert not (ckpt8 / "model.safetensors.index.json").exists()
    with safe_open(str(ckpt8 / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["0.bias", "0.weight", "3.bias", "3.weight"]

    second = train(root, seed=99, resume=root)["losses"]  # other initial weights
    assert _resumed(first, second, 8) == reference


def test_load_restores_every_part_of_the_state(tmp_path: Path, node: str) -> None:
    acc, model, opt, dl, sched, counter = build(0)
    dl.set_epoch(2)
    counter.seen = 5
    acc.step = 3
    for _ in range(2):
        for x, y in dl:
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    handle = ckpt_accel.save_state(acc, str(tmp_path), 7)
    draws = (torch.rand(3), float(torch.randn(1)))
    handle.wait()
    ckpt_accel.close(acc)

    acc2, model2, opt2, dl2, sched2, counter2 = build(42)
    restored = ckpt_accel.load_state(acc2, str(tmp_path))
    assert restored == ckpt_accel.Restored(str(tmp_path / "checkpoints" / "checkpoint-7"), 7)
    assert (counter2.seen, acc2.step, dl2.iteration) == (5, 3, 4)
    assert dl2.get_sampler().epoch == 4
    for k, v in model2.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert sched2.state_dict() == sched.state_dict()
    for i, st in saved_opt["state"].items():
        assert torch.equal(opt2.state_dict()["state"][i]["exp_avg"], st["exp_avg"])
    again = (torch.rand(3), float(torch.randn(1)))
    assert torch.equal(again[0], draws[0]) and again[1] == draws[1]
    ckpt_accel.close(acc2)


def test_resumes_from_a_directory_written_by_accelerator_save_state(
    tmp_path: Path, node: str, reference: dict[int, float]
) -> None:
    root = str(tmp_path / "run")
    first = train(root, stop_after=8, save_every=4, use_accelerate=True)["losses"]
    written = sorted(os.listdir(tmp_path / "run" / "step_8"))
    assert written == [
        "custom_checkpoint_0.pkl",
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "scheduler.bin",
    ]
    second = train(root, seed=99, resume=f"{root}/step_8")["losses"]
    assert _resumed(first, second, 8) == reference


@dataclass
class _Opaque:
    """Not a tensor nor a plain value: torch.save pickles it as a class instance."""

    value: int


class _HoldsObject:
    def __init__(self) -> None:
        self.inner = _Opaque(3)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner = state["inner"]


def _bare_accelerator(*objects: Any) -> Accelerator:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True)
    acc.register_for_checkpointing(*objects)
    return acc


def test_pickled_objects_are_refused(tmp_path: Path, node: str) -> None:
    src = _HoldsObject()
    _bare_accelerator(src).save_state(str(tmp_path))
    dst = _HoldsObject()
    dst.inner = _Opaque(0)
    acc = _bare_accelerator(dst)
    with pytest.raises(UnsafeCheckpointError, match=r"custom_checkpoint_0\.pkl.*never unpickles"):
        ckpt_accel.load_state(acc, str(tmp_path))
    assert dst.inner == _Opaque(0)  # nothing was loaded


def test_mismatches_and_an_empty_root(tmp_path: Path, node: str) -> None:
    acc = _bare_accelerator(Counter())
    assert ckpt_accel.load_state(acc, str(tmp_path / "nothing")) is None
    ckpt_accel.save_state(acc, str(tmp_path / "run"), 1)
    ckpt_accel.close(acc)
    acc.save_state(str(tmp_path / "acc"))

    two = _bare_accelerator(Counter(), Counter())
    with pytest.raises(StateMismatchError, match="custom_1"):
        ckpt_accel.load_state(two, str(tmp_path / "run"))
    with pytest.raises(StateMismatchError, match="1 custom checkpoints but 2 objects"):
        ckpt_accel.load_state(two, str(tmp_path / "acc"))
    ckpt_accel.close(two)

    # a damaged checkpoint is refused, never taken for "nothing to resume"
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    with (ckpt / "custom_0_state.json").open("a") as f:
        f.write(" ")
    with pytest.raises(CorruptCheckpointError, match="checkpoint-1"):
        ckpt_accel.load_state(acc, str(ckpt))


def test_refuses_state_pre_hooks(tmp_path: Path) -> None:
    acc = _bare_accelerator()
    acc.register_save_state_pre_hook(lambda models, weights, out: None)
    with pytest.raises(ConfigError, match="pre-hooks"):
        ckpt_accel.save_state(acc, str(tmp_path), 1)


# ---- two processes under `accelerate launch` ---------------------------------------------------


def _launch(args: dict[str, Any], out: Path) -> dict[int, dict[int, float]]:
    """Run the worker on 2 CPU processes (torchrun through ``accelerate launch``, gloo);
    the losses of each rank."""
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # --multi_gpu selects the torchrun launcher; Accelerator(cpu=True) makes it MULTI_CPU
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        str(WORKER),
        json.dumps({**args, "out": str(out)}),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((out / f"rank_{r}.json").read_text()) for r in (0, 1)]
    return {r["rank"]: {int(k): v for k, v in r["losses"].items()} for r in results}


@pytest.fixture(scope="module")
def reference_2proc(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[int, float]]:
    base = tmp_path_factory.mktemp("reference-2")
    return _launch({"root": str(base / "run")}, base / "out")


@pytest.mark.slow
def test_two_processes_save_async_and_resume_with_identical_losses(
    tmp_path: Path, node: str, reference_2proc: dict[int, dict[int, float]]
) -> None:
    root = str(tmp_path / "run")
    first = _launch(
        {"root": root, "stop_after": 4, "save_every": 2}, tmp_path / "out1"
    )  # mid-epoch 2 of 3
    info = list_checkpoints(root)[-1]
    assert info.location.name == "checkpoint-4" and info.status is CheckpointStatus.COMPLETE
    assert verify_checkpoint(info.url, deep=True).ok
    names = set(os.listdir(info.location.path))
    # PER_RANK: one object per rank (its document is in the shard's header)
    assert {"rng_state_rank_0.safetensors", "rng_state_rank_1.safetensors"} <= names
    assert not {"rng_state_rank_0.json", "rng_state_rank_1.json"} & names
    assert not any(n.startswith("optimizer_state_rank_") for n in names)  # GLOBAL: rank 0 once
    second = _launch({"root": root, "seed": 99, "resume": root}, tmp_path / "out2")
    for rank in (0, 1):
        assert _resumed(first[rank], second[rank], 4) == reference_2proc[rank], rank


@pytest.mark.slow
def test_two_processes_resume_from_accelerator_save_state(
    tmp_path: Path, node: str, reference_2proc: dict[int, dict[int, float]]
) -> None:
    root = str(tmp_path / "run")
    first = _launch(
        {"root": root, "stop_after": 4, "save_every": 2, "use_accelerate": True}, tmp_path / "out1"
    )
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(f"{root}/step_4"))
    second = _launch({"root": root, "seed": 99, "resume": f"{root}/step_4"}, tmp_path / "out2")
    for rank in (0, 1):
        assert _resumed(first[rank], second[rank], 4) == reference_2proc[rank], rank


@pytest.mark.slow
def test_two_processes_validate_replication(tmp_path: Path, node: str) -> None:
    root = str(tmp_path / "run")
    _launch(
        {"root": root, "stop_after": 2, "save_every": 2, "validate_replication": True},
        tmp_path / "out",
    )
    info = list_checkpoints(root)[-1]
    assert info.status is CheckpointStatus.COMPLETE and info.manifest is not None
    patterns = {c.key: c.sharing_pattern for c in info.manifest.components}
    assert patterns["model"] == patterns["optimizer"] == "replicated", patterns
    assert patterns["scheduler"] == "global" and patterns["rng"] == "per_rank", patterns
    assert verify_checkpoint(info.url, deep=True).ok
