"""Overlapped snapshots (``save(..., overlap=True)``): every legal way of changing state while
a snapshot copies leaves each checkpoint with exactly its step's values, every illegal way
fails the save with nothing committed. Real writer process and shared memory.

The races are made deterministic with :class:`SlowCopy`, installed at the hook points
``snapshot.copy.before``/``.after`` of :mod:`ckptsvc.hooks` (around every ``copy_into``) so
that the snapshot thread's copy waits for a permit the test hands out; the copy on the
training thread is never held back.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_workers.launch import free_port
from helpers_models import assert_bitwise_equal
from torch import nn

from ckptsvc import hooks
from ckptsvc.compat.training_state import SimpleStatefulProvider, TrainingProgress
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, SaveHandle, load_state
from ckptsvc.errors import SaveFailedError, TornSnapshotError
from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.manager import CheckpointConfig, CheckpointManager
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.stage.components import SharingPattern, StateComponent
from ckptsvc.stage.flatten import flatten_state

SNAPSHOT_THREAD = "ckptsvc-snapshot"


# ``node`` (tests/conftest.py): a private node writer per test, checked for leaks


class SlowCopy:
    """Hooks around ``copy_into``: a copy on the snapshot thread starts only with a permit."""

    def __init__(self) -> None:
        self._permits = threading.Semaphore(0)
        self._cond = threading.Condition()
        self.entered = 0  # snapshot-thread copies that reached the gate
        self.done = 0  # ... and finished
        self.other_threads = 0  # copies on any other thread (not held back)

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    def wait_entered(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.entered >= n, 60), "snapshot copy never ran"

    def before(self) -> None:
        if threading.current_thread().name != SNAPSHOT_THREAD:
            self.other_threads += 1
            return
        with self._cond:
            self.entered += 1
            self._cond.notify_all()
        if not self._permits.acquire(timeout=60):
            raise RuntimeError("the test never allowed this snapshot copy")

    def after(self) -> None:
        if threading.current_thread().name != SNAPSHOT_THREAD:
            return
        with self._cond:
            self.done += 1
            self._cond.notify_all()

    def install(self) -> Callable[[], None]:
        """Install the gate; returns the function that removes it."""
        removers = [
            hooks.install("snapshot.copy.before", self.before),
            hooks.install("snapshot.copy.after", self.after),
        ]

        def remove() -> None:
            for undo in removers:
                undo()

        return remove


@pytest.fixture
def slow_copy() -> Iterator[SlowCopy]:
    gate = SlowCopy()
    remove = gate.install()
    yield gate
    remove()


class Net(nn.Module):
    """Parameters (optimised), BatchNorm buffers (changed by forward), an output layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Loop:
    """A tiny training loop whose saved state is model + optimizer + a plain tensor + step."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.model = Net().to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.ema = torch.zeros(4, device=device)  # a plain tensor the loop changes at will
        self.step = 0

    def state(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.opt, "ema": self.ema, "step": self.step}

    def backward(self) -> None:
        self.opt.zero_grad()
        self.model(torch.randn(8, 16, device=self.device)).pow(2).mean().backward()

    def train_step(self) -> None:
        self.backward()
        self.opt.step()
        self.step += 1

    def forward_only(self) -> None:
        """A forward pass in train mode: BatchNorm updates its running statistics."""
        with torch.no_grad():
            self.model(torch.randn(8, 16, device=self.device))
        self.ema.add_(1.0)


def expected(state: Any) -> dict[str, torch.Tensor]:
    """Clones of every tensor ``state`` saves, by name, taken now (at save time)."""
    return {n: t.detach().clone().cpu() for n, t in flatten_state(state).tensors}


def assert_holds(handle: SaveHandle, want: dict[str, torch.Tensor]) -> None:
    got = dict(flatten_state(load_state(handle.path)).tensors)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert_bitwise_equal(got[name], t, name=f"step {handle.step}: {name}")


def blocked_in_fence(fn: Callable[[], Any]) -> threading.Thread:
    """Run ``fn`` on a thread and check it does not finish while the copy is held back."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive(), "did not wait for the snapshot copy"
    return t


def test_every_legal_change_during_the_copy_keeps_each_step_exact(
    node: str, tmp_path: Path, slow_copy: SlowCopy
) -> None:
    loop = Loop()
    saves: list[tuple[SaveHandle, dict[str, torch.Tensor]]] = []
    with AsyncCheckpointer(tmp_path) as ckpt:
        loop.train_step()
        for i in range(3):
            loop.backward()  # gradients are not saved; computing them is always legal
            want = expected(loop.state())
            handle = ckpt.save(loop.step, loop.state(), overlap=True)
            saves.append((handle, want))
            slow_copy.wait_entered(i + 1)  # the copy is in progress from here ...
            loop.forward_only()  # BatchNorm statistics and the plain tensor change
            stepping = blocked_in_fence(loop.opt.step)  # optimizer.step waits (pre-hook)
            slow_copy.allow()  # ... to here
            stepping.join(60)
            assert not stepping.is_alive()
            assert handle.exception(60) is None
            assert handle.timings.fence_wait_s > 0
            assert handle.timings.snapshot_s is not None
            loop.step += 1
        ckpt.wait_all(60)
    assert slow_copy.done == 3 and slow_copy.other_threads == 0
    for handle, want in saves:
        assert_holds(handle, want)


def test_explicit_fence_then_in_place_edit(node: str, tmp_path: Path, slow_copy: SlowCopy) -> None:
    loop = Loop()
    loop.train_step()
    with AsyncCheckpointer(tmp_path) as ckpt:
        want = expected(loop.state())
        handle = ckpt.save(1, loop.state(), overlap=True)
        slow_copy.wait_entered(1)
        waited: list[float] = []

        def clip_after_fence() -> None:  # e.g. weight clipping in a custom loop
            waited.append(ckpt.fence())
            assert slow_copy.done == 1  # the fence returned only after the copy
            with torch.no_grad():
                for p in loop.model.parameters():
                    p.clamp_(-0.01, 0.01)

        clipping = blocked_in_fence(clip_after_fence)
        slow_copy.allow()
        clipping.join(60)
        assert not clipping.is_alive() and waited and waited[0] > 0
        handle.wait(60)
    assert handle.timings.fence_wait_s >= waited[0]
    assert_holds(handle, want)
    assert ckpt.fence() == 0.0  # nothing in flight (and a closed checkpointer is fine)


@pytest.mark.parametrize("target", ["parameter", "optimizer state"])
def test_in_place_edit_without_fence_fails_and_commits_nothing(
    node: str, tmp_path: Path, slow_copy: SlowCopy, target: str
) -> None:
    loop = Loop()
    loop.train_step()
    with AsyncCheckpointer(tmp_path) as ckpt:
        handle = ckpt.save(1, loop.state(), overlap=True)
        slow_copy.wait_entered(1)
        weight = loop.model.head.weight
        with torch.no_grad():  # illegal: no ckpt.fence() before the in-place change
            if target == "parameter":
                weight.mul_(2.0)
            else:
                loop.opt.state[weight]["exp_avg"].zero_()
        slow_copy.allow()
        with pytest.raises(SaveFailedError, match="modified in place"):
            ckpt.wait_all(60)
        error = handle.exception(60)
        assert isinstance(error, TornSnapshotError)
        name = "model.head.weight" if target == "parameter" else "optimizer.state"
        assert name in error.tensor and error.step == 1
        assert "ckpt.fence()" in str(error)
        assert not (Path(handle.path) / MANIFEST_NAME).exists()
        assert find_latest_checkpoint(str(tmp_path)) is None
        # the arena came back: the next save works and holds its values
        want = expected(loop.state())
        retry = ckpt.save(2, loop.state(), overlap=True)
        slow_copy.allow()
        retry.wait(60)
    assert_holds(retry, want)
    assert find_latest_checkpoint(str(tmp_path)) == retry.path


def test_edit_after_the_copy_finished_does_not_reach_the_checkpoint(
    node: str, tmp_path: Path, slow_copy: SlowCopy
) -> None:
    loop = Loop()
    loop.train_step()
    with AsyncCheckpointer(tmp_path) as ckpt:
        want = expected(loop.state())
        slow_copy.allow()
        handle = ckpt.save(1, loop.state(), overlap=True)
        ckpt.fence()
        with torch.no_grad():  # the writer may still be writing: it reads the arena
            loop.model.head.weight.fill_(7.0)
            loop.model.head.weight.data.fill_(8.0)  # bypasses version counters: harmless now
        handle.wait(60)
    assert_holds(handle, want)


def test_next_save_while_the_previous_is_still_copying(
    node: str, tmp_path: Path, slow_copy: SlowCopy
) -> None:
    loop = Loop()
    loop.train_step()
    with AsyncCheckpointer(tmp_path, arenas_per_rank=3) as ckpt:
        first_want = expected(loop.state())
        first = ckpt.save(1, loop.state(), overlap=True)
        slow_copy.wait_entered(1)
        loop.forward_only()  # legal: buffers and plain tensors were cloned at save time
        loop.step = 2
        second_want = expected(loop.state())
        second = ckpt.save(2, loop.state(), overlap=True)  # queued behind the first
        assert ckpt._snapshots.in_flight == 2
        stepping = blocked_in_fence(loop.opt.step)
        slow_copy.allow(2)
        stepping.join(60)
        ckpt.wait_all(60)
    assert_holds(first, first_want)
    assert_holds(second, second_want)
    assert not first_want["ema"].equal(second_want["ema"])  # the two steps differ


def test_close_with_a_snapshot_in_flight_finishes_it(
    node: str, tmp_path: Path, slow_copy: SlowCopy
) -> None:
    loop = Loop()
    loop.train_step()
    ckpt = AsyncCheckpointer(tmp_path, arenas_per_rank=2)  # both saves hold an arena
    hooks_before = len(loop.opt._optimizer_step_pre_hooks)
    want = expected(loop.state())
    handle = ckpt.save(1, loop.state(), overlap=True)
    ckpt.save(2, {**loop.state(), "step": 2}, overlap=True)  # one more optimizer: same hook
    assert len(loop.opt._optimizer_step_pre_hooks) == hooks_before + 1
    slow_copy.wait_entered(1)

    def allow_once_closing() -> None:
        while not ckpt._closed:
            threading.Event().wait(0.01)
        slow_copy.allow(2)

    threading.Thread(target=allow_once_closing, daemon=True).start()
    ckpt.close()
    assert handle.done() and handle.exception() is None
    assert_holds(handle, want)
    assert find_latest_checkpoint(str(tmp_path)).endswith("checkpoint-2")  # type: ignore[union-attr]
    assert len(loop.opt._optimizer_step_pre_hooks) == hooks_before  # hooks removed
    loop.train_step()  # stepping after close is fine


def test_state_without_an_optimizer_is_copied_before_save_returns(
    node: str, tmp_path: Path, slow_copy: SlowCopy, caplog: pytest.LogCaptureFixture
) -> None:
    loop = Loop()
    loop.train_step()
    state = {"model": loop.model.state_dict(), "optimizer": loop.opt.state_dict()}
    with AsyncCheckpointer(tmp_path) as ckpt:
        want = expected(state)
        handle = ckpt.save(1, state, overlap=True)
        assert slow_copy.other_threads == 1 and slow_copy.entered == 0  # copied in save
        with torch.no_grad():
            loop.model.head.weight.fill_(3.0)  # legal: the copy already happened
        handle.wait(60)
    assert_holds(handle, want)
    assert "copied synchronously" in caplog.text


def test_components_overlap_torn_fails_the_rank_and_commits_nothing(
    node: str, tmp_path: Path, slow_copy: SlowCopy
) -> None:
    loop = Loop()
    loop.train_step()

    def components() -> list[StateComponent]:
        return [
            StateComponent("model", loop.model, SharingPattern.GLOBAL),
            StateComponent("optimizer", loop.opt, SharingPattern.GLOBAL),
        ]

    with AsyncCheckpointer(tmp_path) as ckpt:
        torn = ckpt.save_components(1, components(), overlap=True)
        slow_copy.wait_entered(1)
        with torch.no_grad():
            loop.model.get_parameter("body.0.bias").add_(1.0)
        slow_copy.allow()
        with pytest.raises(SaveFailedError):
            ckpt.wait_all(60)
        error = torn.exception(60)
        assert isinstance(error, TornSnapshotError) and "model.body.0.bias" in error.tensor
        assert not (Path(torn.path) / MANIFEST_NAME).exists()
        ok = ckpt.save_components(2, components(), overlap=True)
        slow_copy.wait_entered(2)
        stepping = blocked_in_fence(loop.opt.step)
        slow_copy.allow()
        stepping.join(60)
        ok.wait(60)
    assert find_latest_checkpoint(str(tmp_path)) == ok.path


class Trainer:
    """Model, optimizer, scheduler and progress behind a manager with ``overlap=True``."""

    def __init__(self, root: Path) -> None:
        self.loop = Loop()
        self.sched = torch.optim.lr_scheduler.StepLR(self.loop.opt, step_size=2, gamma=0.5)
        self.progress = TrainingProgress()
        provider = SimpleStatefulProvider(
            {"optimizer": self.loop.opt, "scheduler": self.sched, "progress": self.progress}
        )
        self.manager = CheckpointManager(
            config=CheckpointConfig(output_dir=str(root), save_total_limit=None, overlap=True),
            stateful_provider=provider,
            model=self.loop.model,
        )

    def step(self) -> None:
        self.loop.train_step()
        self.sched.step()
        self.progress.global_step += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        return expected({"model": self.loop.model, "optimizer": self.loop.opt})


def test_manager_overlap_saves_and_resumes_each_step_exactly(
    node: str, tmp_path: Path, slow_copy: SlowCopy
) -> None:
    trainer = Trainer(tmp_path)
    saved: list[tuple[str, dict[str, torch.Tensor], int]] = []
    with trainer.manager:
        for i in range(3):
            trainer.step()
            want = trainer.tensors()
            path = trainer.manager.save_checkpoint(checkpoint_id=i + 1)
            saved.append((path, want, trainer.progress.global_step))
            slow_copy.wait_entered(i + 1)
            trainer.loop.forward_only()
            stepping = blocked_in_fence(trainer.step)  # the optimizer among the components
            slow_copy.allow()
            stepping.join(60)
        trainer.manager.wait(60)
    for path, want, global_step in saved:
        fresh = Trainer(tmp_path)
        with fresh.manager:
            assert fresh.manager.load_checkpoint(path) == path
            got = fresh.tensors()
            assert sorted(got) == sorted(want)
            for name, t in want.items():
                assert_bitwise_equal(got[name], t, name=f"{path}: {name}")
            assert fresh.progress.global_step == global_step


def _rank_main(rank: int, world: int, port: int, root: str, node: str, out: str) -> None:
    """One gloo rank: a save that rank 1 tears, then a clean one; results to ``out``."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CKPTSVC_NODE_ID=node,
        CKPTSVC_WRITER_LINGER_S="1",
    )
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    gate = SlowCopy()
    gate.install()
    loop = Loop()
    loop.train_step()
    comps = [
        StateComponent("model", loop.model, SharingPattern.GLOBAL),
        StateComponent("optimizer", loop.opt, SharingPattern.PER_RANK),
    ]
    result: dict[str, Any] = {}
    with AsyncCheckpointer(root) as ckpt:
        first = ckpt.save_components(1, comps, overlap=True)
        gate.wait_entered(1)
        if rank == 1:  # illegal: no fence
            with torch.no_grad():
                loop.opt.state[loop.model.head.weight]["exp_avg"].add_(1.0)
        gate.allow()
        error = first.exception(120)
        result["first"] = [first.path, type(error).__name__, str(error)]
        dist.barrier()
        second = ckpt.save_components(2, comps, overlap=True)
        gate.allow()
        error = second.exception(120)
        result["second"] = [second.path, None if error is None else repr(error)]
    dist.barrier()
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


@pytest.mark.multiproc
@pytest.mark.slow
def test_distributed_torn_rank_fails_the_commit_everywhere(node: str, tmp_path: Path) -> None:
    root, out = str(tmp_path / "run"), str(tmp_path / "result")
    torch.multiprocessing.spawn(
        _rank_main, args=(2, free_port(), root, node, out), nprocs=2, join=True
    )
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    path1 = results[0]["first"][0]
    assert results[1]["first"][1] == "TornSnapshotError"
    assert "optimizer.state" in results[1]["first"][2]
    assert results[0]["first"][1] == "SaveFailedError"  # rank 0's verdict names rank 1
    assert "rank 1" in results[0]["first"][2] and "TornSnapshotError" in results[0]["first"][2]
    assert not (Path(path1) / MANIFEST_NAME).exists()
    assert all(r["second"][1] is None for r in results), results
    assert find_latest_checkpoint(root) == results[0]["second"][0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_overlap_keeps_each_step_exact(node: str, tmp_path: Path, slow_copy: SlowCopy) -> None:
    loop = Loop("cuda")
    saves: list[tuple[SaveHandle, dict[str, torch.Tensor]]] = []
    with AsyncCheckpointer(tmp_path) as ckpt:
        loop.train_step()
        for i in range(3):
            loop.backward()
            want = expected(loop.state())
            saves.append((ckpt.save(loop.step, loop.state(), overlap=True), want))
            slow_copy.wait_entered(i + 1)
            loop.forward_only()  # queued on the training stream while the copy waits
            stepping = blocked_in_fence(loop.opt.step)
            slow_copy.allow()
            stepping.join(60)
            loop.step += 1
        torn = ckpt.save(99, loop.state(), overlap=True)
        slow_copy.wait_entered(4)
        with torch.no_grad():
            loop.model.head.weight.mul_(2.0)
        slow_copy.allow()
        with pytest.raises(SaveFailedError, match="modified in place"):
            ckpt.wait_all(60)  # first: a failure someone has looked at is not raised again
        assert isinstance(torn.exception(60), TornSnapshotError)
    for handle, want in saves:
        assert_holds(handle, want)
