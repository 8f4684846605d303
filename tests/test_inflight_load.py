"""A load in the process that has saves in flight to the same root waits for them (Forgather's
synchronous save would have found the checkpoint), or past its timeout names the step still
in flight; it never says "no checkpoint". Saves are held in flight by a gate on faulty://
storage (writes block while the gate file exists); the gate is opened only once the loader
logs that it is waiting, so a loader that did not wait would fail."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faulty_fs  # noqa: F401  (registers faulty:// in this process)
import pytest
import torch
from helpers_models import TinyMLP, assert_state_dicts_bitwise_equal

import ckptsvc
from ckptsvc.compat.forgather_types import CheckpointManifest
from ckptsvc.compat.training_state import SimpleStatefulProvider, TrainingProgress
from ckptsvc.engine import inflight
from ckptsvc.errors import IncompleteCheckpointError, SaveInFlightError
from ckptsvc.manager import CheckpointConfig, CheckpointManager

pytestmark = pytest.mark.usefixtures("node")  # real node writers, ~1 s a test


class OpenGateWhenWaiting(logging.Handler):
    """Removes the gate file when a loader logs that it waits for a save in flight."""

    def __init__(self, gate: Path) -> None:
        super().__init__(logging.INFO)
        self.gate = gate
        self.waited: list[str] = []
        self.armed = True  # False: only record that a loader waited

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("waiting for the save of step"):
            self.waited.append(record.getMessage())
            if self.armed:
                self.gate.unlink(missing_ok=True)


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[OpenGateWhenWaiting]:
    path = tmp_path / "gate"
    handler = OpenGateWhenWaiting(path)
    log = logging.getLogger(inflight.__name__)
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
        path.unlink(missing_ok=True)  # never leave a writer blocked


def manager(
    root: str, opts: dict[str, Any], model: torch.nn.Module, progress: TrainingProgress
) -> CheckpointManager:
    config = CheckpointConfig(output_dir=root, save_total_limit=None, storage_options=opts)
    provider = SimpleStatefulProvider({"progress": progress})
    return CheckpointManager(config=config, stateful_provider=provider, model=model)


def test_a_new_manager_resuming_right_after_an_async_save_waits_for_it(
    tmp_path: Path, gate: OpenGateWhenWaiting
) -> None:
    opts = {"gate_path": str(gate.gate)}
    root = f"faulty://{tmp_path}/run"
    model, progress = TinyMLP(seed=1), TrainingProgress(global_step=4)
    with manager(root, opts, model, progress) as saver:
        gate.gate.touch()
        path = saver.save_checkpoint(checkpoint_id=4)
        assert not saver.last_handle.done()  # held by the gate

        fresh_model, fresh_progress = TinyMLP(seed=2), TrainingProgress()
        with manager(root, opts, fresh_model, fresh_progress) as resumer:
            gate.armed = False
            with pytest.raises(SaveInFlightError, match=r"step 4 to .*checkpoint-4"):
                resumer.load_checkpoint(wait_s=0.0)  # the gate is still shut: in flight
            assert gate.waited and gate.gate.exists()
            gate.waited.clear()
            gate.armed = True
            loaded = resumer.load_checkpoint()  # waits; its log line opens the gate
        assert gate.waited and loaded == path
    assert fresh_progress.global_step == 4
    assert_state_dicts_bitwise_equal(fresh_model.state_dict(), model.state_dict())
    manifest = CheckpointManifest.from_checkpoint(path, storage_options=opts)
    assert set(manifest.components) == {"model", "progress"}
    assert manifest.components["progress"].sharing_pattern == "global"


def test_find_latest_checkpoint_waits_for_an_async_save_of_this_process(
    tmp_path: Path, gate: OpenGateWhenWaiting, checkpointer: Any
) -> None:
    opts = {"gate_path": str(gate.gate)}
    root = f"faulty://{tmp_path}/run"
    ckpt = checkpointer(root, storage_options=opts)
    state = {"w": torch.arange(6.0), "step": 3}
    gate.gate.touch()
    handle = ckpt.save(3, state)
    assert not handle.done()
    assert [h.step for h in inflight.in_flight(root, storage_options=opts)] == [3]
    latest = ckptsvc.find_latest_checkpoint(root, storage_options=opts)
    assert gate.waited and latest == handle.path
    loaded = ckptsvc.load_state(latest, storage_options=opts)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], state["w"])
    handle.wait()  # the loader's wait left the outcome to the owner
    assert inflight.in_flight(root, storage_options=opts) == []


def test_loads_of_a_checkpoint_path_wait_for_its_save_in_flight(
    tmp_path: Path, gate: OpenGateWhenWaiting, checkpointer: Any
) -> None:
    """``load_state`` / ``load_checkpoint`` / ``load_components`` of an explicit path this
    process is still saving wait for it; with ``wait_s=0`` they say which step is in
    flight (an ``IncompleteCheckpointError``), and the read layer, which does not wait,
    says that this process is still saving it."""
    from ckptsvc.read.component_load import load_state as read_only_load_state

    opts = {"gate_path": str(gate.gate)}
    ckpt = checkpointer(f"faulty://{tmp_path}/run", storage_options=opts)
    model = TinyMLP(seed=1)

    def via_load_components(path: str, **kw: Any) -> dict[str, Any]:
        target = TinyMLP(seed=2)
        component = ckptsvc.StateComponent("model", target, ckptsvc.SharingPattern.GLOBAL)
        ckptsvc.load_components(path, [component], storage_options=opts, **kw)
        return target.state_dict()

    loaders = {
        "load_state": lambda p, **kw: ckptsvc.load_state(p, storage_options=opts, **kw)["model"],
        "load_checkpoint": lambda p, **kw: ckptsvc.load_checkpoint(p, storage_options=opts, **kw),
        "load_components": via_load_components,
    }
    for step, (name, load) in enumerate(loaders.items(), start=1):
        gate.gate.touch()
        handle = ckpt.save(step, {"model": model, "step": step})
        assert not handle.done(), name
        gate.armed = False
        with pytest.raises(IncompleteCheckpointError, match=rf"step {step} to .*checkpoint-{step}"):
            load(handle.path, wait_s=0.0)
        with pytest.raises(IncompleteCheckpointError, match=r"this process \(pid \d+\) is still"):
            read_only_load_state(handle.path, storage_options=opts)
        assert not handle.done(), name
        gate.waited.clear()
        gate.armed = True
        loaded = load(handle.path)  # waits; its log line opens the gate
        assert gate.waited, f"{name} did not wait for the save in flight"
        assert_state_dicts_bitwise_equal(loaded, model.state_dict())
        handle.wait()
