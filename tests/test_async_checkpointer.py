"""AsyncCheckpointer end to end: real writer process, shared memory, kills, slow storage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faulty_fs  # noqa: F401  (registers faulty:// in this process)
import pytest
import torch
from conftest import StorageRoot
from conftest import shm_segments as segments
from helpers_models import TiedLM, TinyMLP, assert_bitwise_equal, assert_state_dicts_bitwise_equal
from safetensors.torch import load_file

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, SaveHandle, load_state
from ckptsvc.errors import (
    CheckpointError,
    CommitConflictError,
    InvalidStateError,
    SaveFailedError,
    StorageError,
    WriterDiedError,
)
from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.liveness import pid_alive
from ckptsvc.read.discovery import next_checkpoint_path
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.sharded_checkpoint import load_checkpoint

TESTS_DIR = str(Path(__file__).parent)
# ``node`` (tests/conftest.py): a private node writer per test, checked for leaks


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def training_state(step: int) -> dict[str, Any]:
    """A model + optimizer + scalars whose tensor values all depend on ``step``."""
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    return {
        "model": model,
        "optim": opt,
        "step": step,
        "lr": [0.1, None],
        "big": torch.full((64, 1024), float(step)),
    }


def child_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
    }


# ---- the happy path ------------------------------------------------------------------------


def test_save_is_a_normal_complete_checkpoint(node: str, tmp_path: Path) -> None:
    model = TiedLM()
    state = {"model": model, "meta": {"epoch": 3, "name": "run", "betas": (0.9, 0.95)}}
    with AsyncCheckpointer(tmp_path, max_shard_size=1024, metadata={"run": "t"}) as ckpt:
        handle = ckpt.save(7, state)
        assert handle.path == next_checkpoint_path(str(tmp_path), 7)
        handle.wait(60)
        assert handle.exception() is None and handle.done()
    path = Path(handle.path)
    assert find_latest_checkpoint(str(tmp_path)) == handle.path
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["param_sharing"] == [["embed.weight", "head.weight"]]
    assert index["metadata"]["run"] == "t"
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    from_shards = {
        k: v for s in shards for k, v in load_file(str(s)).items()
    }  # the reference reader
    sd = model.state_dict()  # the model shards hold exactly its keys (tied: stored once)
    assert_state_dicts_bitwise_equal(load_checkpoint(handle.path), sd)  # type: ignore[arg-type]
    assert sorted(from_shards) == sorted(k for k in sd if k != "head.weight")
    assert (path / "meta_state.json").exists()  # the other keys in files of their own
    back = load_state(handle.path)
    assert back["meta"] == {"epoch": 3, "name": "run", "betas": (0.9, 0.95)}
    assert back["model"]["head.weight"] is back["model"]["embed.weight"]
    fresh = TiedLM(seed=1)
    fresh.load_state_dict(back["model"])
    assert_bitwise_equal(fresh.body.weight, model.body.weight.detach())
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert set(manifest["metadata"]["ckptsvc"]["files"]) == {
        p.name for p in path.iterdir() if p.name != MANIFEST_NAME
    }


def test_reserve_creates_every_arena_before_the_first_save(node: str, tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path, arenas_per_rank=2) as ckpt:
        state = training_state(1)
        ckpt.reserve(state, wait=True)
        created = segments(node)
        assert len(created) == 2
        ckpt.save(1, state).wait(60)
        ckpt.save(2, state).wait(60)
        assert segments(node) == created  # used, never re-created
        ckpt.reserve({"w": torch.zeros(1 << 20)}, wait=True)  # bigger: the free ones are replaced
        assert len(segments(node)) == 2 and not set(segments(node)) & set(created)


class _HeldCreation:
    """Patches the arena's segment creation so that it waits until :meth:`go` (the test
    decides when the background creation ends, with no timing)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from ckptsvc.stage import arena

        self.started = threading.Event()
        self._go = threading.Event()
        self.threads: list[str] = []
        create = arena.ShmSegment.create

        def held(*args: Any, **kwargs: Any) -> Any:
            self.threads.append(threading.current_thread().name)
            self.started.set()
            assert self._go.wait(120)
            return create(*args, **kwargs)

        monkeypatch.setattr(arena.ShmSegment, "create", staticmethod(held))

    def go(self) -> None:
        self._go.set()


def test_reserve_creates_the_arena_in_the_background_and_the_first_save_waits_for_it(
    node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = _HeldCreation(monkeypatch)
    with AsyncCheckpointer(tmp_path) as ckpt:
        state = training_state(1)
        ckpt.reserve(state)  # returns while the creation is held
        assert held.started.wait(60) and segments(node) == []
        box: dict[str, Any] = {}
        saver = threading.Thread(target=lambda: box.update(handle=ckpt.save(1, state)))
        saver.start()  # plans (reused), then waits in acquire for the arena being created
        held.go()
        saver.join(120)
        box["handle"].wait(60)
        assert held.threads == ["ckptsvc-arena-warmup"]  # the save created none itself
        assert len(segments(node)) == 1
        assert box["handle"].timings.arena_wait_s >= 0
    back = load_state(box["handle"].path)["model"]
    assert_state_dicts_bitwise_equal(back, state["model"].state_dict())


def test_close_waits_for_a_background_creation_and_leaves_no_arena(
    node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = _HeldCreation(monkeypatch)
    ckpt = AsyncCheckpointer(tmp_path)
    ckpt.reserve(training_state(1))
    assert held.started.wait(60)
    closer = threading.Thread(target=ckpt.close)
    closer.start()
    held.go()
    closer.join(120)
    assert not closer.is_alive() and segments(node) == []


def test_timings_are_reported(node: str, tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path) as ckpt:
        state = training_state(1)
        handle = ckpt.save(1, state)
        early = handle.timings
        assert early.nbytes == sum(t.numel() * t.element_size() for t in _tensors(state))
        assert early.blocking_s >= early.copy_s >= 0 and early.arena_wait_s >= 0
        handle.wait(60)
    t = handle.timings
    assert t.queue_wait_s is not None and t.write_s is not None and t.commit_s is not None
    assert t.durable_s is not None and t.durable_s >= t.blocking_s


def _tensors(state: dict[str, Any]) -> list[torch.Tensor]:
    from ckptsvc.stage.flatten import flatten_state

    return [t for _, t in flatten_state(state).tensors]


def test_each_checkpoint_holds_its_own_steps_values(node: str, tmp_path: Path) -> None:
    """The classic async bug: a checkpoint must never see a later step's values."""
    options = {"delay_s": 0.01}  # slow storage: several saves in flight while values change
    root = f"faulty://{tmp_path}"
    model = torch.nn.Linear(256, 256)
    extra = torch.zeros(4096)
    handles: list[SaveHandle] = []
    with AsyncCheckpointer(root, storage_options=options, max_shard_size=64 << 10) as ckpt:
        for step in range(12):
            with torch.no_grad():
                model.weight.fill_(step)
                model.bias.fill_(-step)
                extra.fill_(step * 10)
            handles.append(ckpt.save(step, {"model": model, "extra": extra, "step": step}))
        ckpt.wait_all(120)
    for h in handles:
        state = load_state(h.path, storage_options=options)
        assert state["step"] == h.step
        assert torch.all(state["model"]["weight"] == h.step), h.step
        assert torch.all(state["model"]["bias"] == -h.step), h.step
        assert torch.all(state["extra"] == h.step * 10), h.step


def test_double_buffering_under_slow_storage(node: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    options = {"gate_path": str(gate)}
    with AsyncCheckpointer(
        f"faulty://{tmp_path}/root", storage_options=options, arenas_per_rank=2
    ) as ckpt:
        first = ckpt.save(1, training_state(1))
        second = ckpt.save(2, training_state(2))  # a second arena: no wait for the first
        assert not first.done() and not second.done()
        assert len(segments(node)) == 2
        third: list[SaveHandle] = []
        first_done_when_third_returned: list[bool] = []

        def save_third() -> None:
            third.append(ckpt.save(3, training_state(3)))
            first_done_when_third_returned.append(first.done())

        t = threading.Thread(target=save_third)
        t.start()
        t.join(1.0)
        assert t.is_alive(), "a third save must wait for a free arena (back-pressure)"
        gate.unlink()
        t.join(60)
        assert first_done_when_third_returned == [True]
        assert third[0].timings.arena_wait_s > 0
        assert len(segments(node)) == 2  # reused, never a third arena
        ckpt.wait_all(60)
    latest = find_latest_checkpoint(f"faulty://{tmp_path}/root", storage_options=options)
    assert latest is not None and latest.endswith("checkpoint-3")
    assert load_state(latest, storage_options=options)["step"] == 3


# ---- failures ------------------------------------------------------------------------------


def test_storage_error_fails_that_save_only(node: str, tmp_path: Path) -> None:
    fail = tmp_path / "fail"
    options = {"fail_path": str(fail), "fail_after_bytes": 4096}
    root = f"faulty://{tmp_path}/root"
    with AsyncCheckpointer(root, storage_options=options) as ckpt:
        ckpt.save(1, training_state(1)).wait(60)
        fail.touch()
        bad = ckpt.save(2, training_state(2))
        error = bad.exception(60)
        assert isinstance(error, SaveFailedError) and isinstance(error.__cause__, StorageError)
        assert "injected I/O error" in str(error) and "checkpoint-2" in str(error)
        with pytest.raises(SaveFailedError):
            bad.wait()
        fail.unlink()
        ckpt.save(3, training_state(3)).wait(60)
        ckpt.wait_all()  # the failure was observed through its handle: nothing to raise
    assert not (tmp_path / "root" / "checkpoints" / "checkpoint-2" / MANIFEST_NAME).exists()
    assert find_latest_checkpoint(root, storage_options=options).endswith("checkpoint-3")  # type: ignore[union-attr]


def test_wait_all_raises_an_unobserved_failure(node: str, tmp_path: Path) -> None:
    fail = tmp_path / "fail"
    fail.touch()
    with AsyncCheckpointer(
        f"faulty://{tmp_path}/r", storage_options={"fail_path": str(fail)}
    ) as ckpt:
        ckpt.save(1, training_state(1))
        with pytest.raises(SaveFailedError, match="step 1"):
            ckpt.wait_all(60)
        ckpt.wait_all(60)  # reported once


def test_killed_writer_fails_the_save_and_the_next_save_restarts_it(
    node: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    options = {"gate_path": str(gate)}
    root = f"faulty://{tmp_path}/root"
    with AsyncCheckpointer(root, storage_options=options) as ckpt:
        old_pid = ckpt.writer_pid
        assert old_pid is not None
        handle = ckpt.save(1, training_state(1))
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(WriterDiedError):
            handle.wait(60)
        gate.unlink()
        ckpt.save(2, training_state(2)).wait(60)
        assert ckpt.writer_pid not in (None, old_pid)
    assert find_latest_checkpoint(root, storage_options=options).endswith("checkpoint-2")  # type: ignore[union-attr]
    assert not (tmp_path / "root" / "checkpoints" / "checkpoint-1" / MANIFEST_NAME).exists()


_TRAINER = """
import json, os, sys, time, torch
import faulty_fs
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
root, gate = sys.argv[1:3]
ckpt = AsyncCheckpointer(root, storage_options={"gate_path": gate})
w = torch.arange(100_000, dtype=torch.float32)
ckpt.save(1, {"w": w}).wait(60)
open(gate, "w").close()
ckpt.save(2, {"w": w + 1})
print(json.dumps({"writer": ckpt.writer_pid}), flush=True)
time.sleep(600)
"""


def test_killed_trainer_leaves_no_manifest_and_no_shared_memory(
    node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPTSVC_WRITER_LINGER_S", "60")  # only the EOF path may reclaim in time
    gate = tmp_path / "gate"
    root = f"faulty://{tmp_path}/root"
    child = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, root, str(gate)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        info = json.loads(child.stdout.readline())  # type: ignore[union-attr]
        assert any(f"-{child.pid}-" in s for s in segments(node))
        wait_until(
            lambda: (tmp_path / "root" / "checkpoints" / "checkpoint-2").exists(), "save 2 to start"
        )
        child.send_signal(signal.SIGKILL)
        child.wait()
        gate.unlink()
        wait_until(
            lambda: not segments(node), "the writer to reclaim the dead trainer's arenas", 20
        )
        assert pid_alive(info["writer"])
        os.kill(info["writer"], signal.SIGTERM)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not (tmp_path / "root" / "checkpoints" / "checkpoint-2" / MANIFEST_NAME).exists()
    latest = find_latest_checkpoint(root, storage_options={"gate_path": str(gate)})
    assert latest is not None and latest.endswith("checkpoint-1")


def test_invalid_state_raises_and_next_save_works(node: str, tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path, arenas_per_rank=1) as ckpt:
        with pytest.raises(InvalidStateError, match="'bad'"):
            ckpt.save(1, {"w": torch.ones(3), "bad": object()})
        with pytest.raises(InvalidStateError, match="metadata"):
            ckpt.save(1, {"w": torch.ones(3)}, metadata={"x": object()})
        ckpt.save(2, {"w": torch.ones(3)}).wait(60)  # the single arena was released


def test_same_step_twice_in_flight_is_refused(node: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    with AsyncCheckpointer(
        f"faulty://{tmp_path}/r", storage_options={"gate_path": str(gate)}
    ) as ckpt:
        first = ckpt.save(1, {"w": torch.ones(3)})
        with pytest.raises(CommitConflictError, match="checkpoint-1"):
            ckpt.save(1, {"w": torch.ones(3)})
        gate.unlink()
        first.wait(60)
        with pytest.raises(CommitConflictError, match="overwrite=True"):
            ckpt.save(1, {"w": torch.zeros(3)})  # committed: never rewritten in place
        ckpt.save(1, {"w": torch.zeros(3)}, overwrite=True).wait(60)  # replaced once durable
    assert torch.all(load_state(next_checkpoint_path(f"faulty://{tmp_path}/r", 1))["w"] == 0)


def test_storage_options_must_be_plain_data(node: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidStateError, match="storage_options"):
        AsyncCheckpointer(tmp_path, storage_options={"client_kwargs": {"config": object()}})


def test_forked_child_cannot_disturb_the_parent(node: str, tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": torch.ones(3)}).wait(60)
        arenas = segments(node)
        pid = os.fork()
        if pid == 0:  # the child: save refused; close (and atexit) must not touch the parent's
            code = 1
            try:
                try:
                    ckpt.save(2, {"w": torch.ones(3)})
                except CheckpointError:
                    code = 0
                ckpt.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert segments(node) == arenas
        ckpt.save(3, {"w": torch.ones(3)}).wait(60)  # the connection still works


def test_memory_root_is_refused(node: str) -> None:
    with pytest.raises(StorageError, match="one process"):
        AsyncCheckpointer("memory://nope/root")


def test_closed_checkpointer_refuses_saves(node: str, tmp_path: Path) -> None:
    ckpt = AsyncCheckpointer(tmp_path)
    ckpt.close()
    ckpt.close()  # idempotent
    with pytest.raises(Exception, match="closed"):
        ckpt.save(1, {"w": torch.ones(1)})
    assert segments(node) == []


# ---- processes -----------------------------------------------------------------------------

_RANK = """
import json, sys, torch
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
root, rank = sys.argv[1], int(sys.argv[2])
with AsyncCheckpointer(root, rank=rank) as ckpt:
    handles = [ckpt.save(s, {"w": torch.full((50_000,), float(rank * 100 + s))}) for s in range(3)]
    for h in handles:
        h.wait(120)
    print(json.dumps({"writer": ckpt.writer_pid}), flush=True)
"""


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_local_ranks_share_one_writer(node: str, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, str(tmp_path / f"rank{r}"), str(r)],
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    writers = {json.loads(o)["writer"] for o in outs}
    assert len(writers) == 1, writers
    for r in (0, 1):
        for s in range(3):
            got = load_state(next_checkpoint_path(str(tmp_path / f"rank{r}"), s))
            assert torch.all(got["w"] == r * 100 + s)


_EXIT_WITHOUT_CLOSE = """
import sys, torch
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
ckpt = AsyncCheckpointer(sys.argv[1])
ckpt.save(5, {"w": torch.ones(10_000)})
"""  # no wait, no close: atexit must finish the save and unlink the arena


def test_interpreter_exit_completes_saves_and_unlinks_arenas(node: str, tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-c", _EXIT_WITHOUT_CLOSE, str(tmp_path)],
        check=True,
        env=child_env(),
        timeout=120,
    )
    assert find_latest_checkpoint(str(tmp_path)) == next_checkpoint_path(str(tmp_path), 5)
    assert segments(node) == []


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_no_leak_across_100_saves(node: str, tmp_path: Path) -> None:
    state = {"w": torch.randn(256, 1024), "b": torch.randn(1024), "n": 0}  # ~1 MiB
    with AsyncCheckpointer(tmp_path, arenas_per_rank=2) as ckpt:
        writer = ckpt.writer_pid
        assert writer is not None
        for step in range(10):
            ckpt.save(step, state)
        ckpt.wait_all(120)
        rss, writer_rss = _rss_bytes(os.getpid()), _rss_bytes(writer)
        fds = len(os.listdir("/proc/self/fd"))
        for step in range(10, 110):
            state["n"] = step
            ckpt.save(step, state)
            assert len(segments(node)) <= 2
        ckpt.wait_all(300)
        assert len(segments(node)) <= 2
        assert _rss_bytes(os.getpid()) - rss < 64 << 20
        assert _rss_bytes(writer) - writer_rss < 64 << 20
        assert len(os.listdir("/proc/self/fd")) <= fds + 2
    assert segments(node) == []


@pytest.mark.cloud
def test_object_store_roundtrip(node: str, storage_root: StorageRoot) -> None:
    root = storage_root
    if not root.multiprocess:
        with pytest.raises(StorageError):
            AsyncCheckpointer(root.url, storage_options=root.storage_options)
        return
    with AsyncCheckpointer(
        root.url, storage_options=root.storage_options, max_shard_size=8192
    ) as ckpt:
        handles = [ckpt.save(s, training_state(s)) for s in (1, 2)]
        ckpt.wait_all(120)
    latest = find_latest_checkpoint(root.url, storage_options=root.storage_options)
    assert latest == handles[-1].path
    back = load_state(latest, storage_options=root.storage_options)
    assert back["step"] == 2 and torch.all(back["big"] == 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_is_snapshotted_before_save_returns(node: str, tmp_path: Path) -> None:
    w = torch.zeros(1 << 20, device="cuda")
    with AsyncCheckpointer(tmp_path) as ckpt:
        handles = []
        for step in range(4):
            w.fill_(step)
            handles.append(ckpt.save(step, {"w": w}))
        ckpt.wait_all(120)
    for h in handles:
        assert torch.all(load_state(h.path)["w"] == h.step)
