"""Storage faults on local disk: errors (EIO, ENOSPC), latency and hangs at each call type
(open, write, close/fsync, publish/rename, list, read, remove), on the sync and the async
path. The promises, after every fault:

- the save fails with a clear error that names the file and the cause;
- every checkpoint committed before is intact (deep verify, bit-exact load) and still the
  one ``find_latest_checkpoint`` returns;
- training goes on: the next ``save`` call is accepted (and fails or succeeds on its own);
- once the fault ends, the next save succeeds, and ``gc`` reclaims the failed save's debris.

Faults come from :func:`ckptsvc.testing.faultinject.install_os_faults`, which wraps the ``os`` calls
under one directory (in this process; in the node writer through its preload). Real
ENOSPC also comes from a 4 MiB tmpfs when this machine lets us mount one (root).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.errors import CheckpointError, SaveFailedError, StorageError
from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME
from ckptsvc.liveness import pid_alive
from ckptsvc.ops.gc import collect_garbage
from ckptsvc.ops.retention import maybe_delete_oldest_checkpoint
from ckptsvc.read.discovery import CheckpointStatus, checkpoint_info
from ckptsvc.read.discovery import next_checkpoint_path as ckpt_path
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.sharded_checkpoint import load_checkpoint, save_checkpoint
from ckptsvc.testing.faultinject import OsFault, faults_env, install_os_faults
from ckptsvc.workers.latest_pointer import POINTER_NAME

MiB = 2**20
SHARD = "model-0000"
CAUSE = {"EIO": "input/output error", "ENOSPC": "no space left"}


def state(step: int, *, nbytes: int = 64 * 1024) -> dict[str, torch.Tensor]:
    n = nbytes // 8
    return {"a": torch.full((n,), float(step)), "b": torch.arange(n, dtype=torch.float32) + step}


def save(root: str, step: int, **kw: object) -> str:
    path = ckpt_path(root, step)
    save_checkpoint(path, state(step, **kw), safetensors=True, max_shard_size=48 * 1024, step=step)  # type: ignore[arg-type]
    return path


def assert_intact(path: str, step: int, **kw: object) -> None:
    report = verify_checkpoint(path, deep=True)
    assert report.ok, report.problems
    got = load_checkpoint(path)
    want = state(step, **kw)  # type: ignore[arg-type]
    assert got is not None and sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture
def faults(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``faults(op, errno_name=..., match=...)`` arms a fault under tmp_path/run; the
    returned switch file turns it on (it is on at first); unlink it to end the fault."""
    undo: list[Callable[[], None]] = []

    def arm(op: str, **kw: object) -> Path:
        switch = tmp_path / f"switch-{op}-{len(undo)}"
        switch.touch()
        fault = OsFault(root=str(tmp_path / "run"), op=op, switch_path=str(switch), **kw)  # type: ignore[arg-type]
        undo.append(install_os_faults([fault]))
        return switch

    yield arm
    for fn in reversed(undo):
        fn()


# ---- sync path: errors at each call type of a save -------------------------------------------

SAVE_FAULTS = {
    # (op, errno, match): the file the error must name
    "open-EIO-shard": ("open", "EIO", SHARD),
    "write-ENOSPC-shard": ("write", "ENOSPC", SHARD),
    "write-EIO-shard": ("write", "EIO", SHARD),
    "close-EIO-shard": ("close", "EIO", SHARD),  # fsync fails: the classic lost write
    "open-ENOSPC-marker": ("open", "ENOSPC", MARKER_NAME),
    "write-ENOSPC-index": ("write", "ENOSPC", "index.json"),
    "publish-EIO-index": ("publish", "EIO", "index.json"),
    "publish-EIO-manifest": ("publish", "EIO", MANIFEST_NAME),
    "write-ENOSPC-manifest": ("write", "ENOSPC", MANIFEST_NAME),
    "close-EIO-manifest": ("close", "EIO", MANIFEST_NAME),
}


@pytest.mark.parametrize("case", sorted(SAVE_FAULTS))
def test_sync_save_fault(tmp_path: Path, faults: Callable[..., Path], case: str) -> None:
    op, errno_name, match = SAVE_FAULTS[case]
    root = str(tmp_path / "run")
    first = save(root, 1)
    switch = faults(op, errno_name=errno_name, match=match)

    with pytest.raises(StorageError) as info:
        save(root, 2)
    text = str(info.value)
    assert "checkpoint-2" in text and match.strip(".") in text, text
    assert CAUSE[errno_name] in text.lower(), text
    assert find_latest_checkpoint(root) == first
    assert checkpoint_info(ckpt_path(root, 2)).status is not CheckpointStatus.COMPLETE
    assert_intact(first, 1)

    with pytest.raises(StorageError):  # training goes on: the next call fails cleanly too
        save(root, 3)
    switch.unlink()  # the fault ends
    third = save(root, 3)
    assert find_latest_checkpoint(root) == third
    assert_intact(third, 3)
    report = collect_garbage(root, shared_memory=False)
    assert ckpt_path(root, 2) in report.removed
    assert sorted(os.listdir(Path(root, "checkpoints"))) == [
        "checkpoint-1",
        "checkpoint-3",
        POINTER_NAME,
    ]


def test_sync_latency_only_slows_the_save(tmp_path: Path, faults: Callable[..., Path]) -> None:
    root = str(tmp_path / "run")
    for op in ("open", "write", "close", "publish"):
        faults(op, delay_s=0.01)
    path = save(root, 1)
    assert_intact(path, 1)


def test_sync_hang_is_invisible_until_it_ends(tmp_path: Path, faults: Callable[..., Path]) -> None:
    root = str(tmp_path / "run")
    first = save(root, 1)
    hang = tmp_path / "hang"
    hang.touch()
    faults("write", hang_path=str(hang), match=SHARD)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            save(root, 2)
        except BaseException as e:  # reported to the test thread
            errors.append(e)

    saver = threading.Thread(target=run)
    saver.start()
    marker = Path(ckpt_path(root, 2), MARKER_NAME)
    while not marker.exists() and saver.is_alive():
        saver.join(0.01)
    assert saver.is_alive(), f"the save should hang on its shard write: {errors}"
    assert find_latest_checkpoint(root) == first  # the hanging save is invisible
    assert checkpoint_info(ckpt_path(root, 2)).status is CheckpointStatus.INCOMPLETE
    hang.unlink()
    saver.join(60)
    assert not saver.is_alive() and not errors
    assert find_latest_checkpoint(root) == ckpt_path(root, 2)
    assert_intact(ckpt_path(root, 2), 2)


# ---- sync path: list, read and remove faults ---------------------------------------------------


def test_list_fault_fails_discovery_clearly_then_recovers(
    tmp_path: Path, faults: Callable[..., Path]
) -> None:
    root = str(tmp_path / "run")
    first = save(root, 1)
    switch = faults("list", errno_name="EIO")
    with pytest.raises(StorageError, match="checkpoints") as info:
        find_latest_checkpoint(root)
    assert CAUSE["EIO"] in str(info.value).lower()
    with pytest.raises(StorageError):
        maybe_delete_oldest_checkpoint(root, 1)
    switch.unlink()
    assert find_latest_checkpoint(root) == first


@pytest.mark.parametrize("errno_name", ["EIO"])
def test_read_fault_fails_load_and_verify_clearly(
    tmp_path: Path, faults: Callable[..., Path], errno_name: str
) -> None:
    root = str(tmp_path / "run")
    first = save(root, 1)
    switch = faults("read", errno_name=errno_name, match=SHARD)
    with pytest.raises(CheckpointError, match="model-0000") as info:
        load_checkpoint(first)
    assert CAUSE["EIO"] in str(info.value).lower()
    with pytest.raises(StorageError, match="model-0000"):
        verify_checkpoint(first)  # a storage failure is raised, not reported as damage
    switch.unlink()
    assert_intact(first, 1)


def test_remove_fault_during_retention_loses_nothing(
    tmp_path: Path, faults: Callable[..., Path]
) -> None:
    root = str(tmp_path / "run")
    paths = [save(root, s) for s in (1, 2, 3)]
    switch = faults("remove", errno_name="EIO")
    with pytest.raises(StorageError, match="checkpoint-1"):
        maybe_delete_oldest_checkpoint(root, 2)
    assert find_latest_checkpoint(root) == paths[2]
    for step, path in ((2, paths[1]), (3, paths[2])):
        assert_intact(path, step)
    switch.unlink()
    collect_garbage(root, shared_memory=False)  # finishes the interrupted deletion
    assert sorted(os.listdir(Path(root, "checkpoints"))) == [
        "checkpoint-2",
        "checkpoint-3",
        POINTER_NAME,
    ]


# ---- async path: faults in the node writer -----------------------------------------------------


def wait_gone(pid: int | None, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pid is not None and pid_alive(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"the node writer {pid} did not exit (linger 1 s)")
        time.sleep(0.05)


@pytest.fixture
def writer_faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Start a private node writer that injects ``OsFault(op, **kw)`` under tmp_path/run."""
    monkeypatch.setenv("CKPTSVC_NODE_ID", f"flt{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("CKPTSVC_WRITER_LINGER_S", "1")

    def arm(op: str, **kw: object) -> Path:
        switch = tmp_path / f"switch-{op}"
        switch.touch()
        fault = OsFault(root=str(tmp_path / "run"), op=op, switch_path=str(switch), **kw)  # type: ignore[arg-type]
        for key, value in faults_env([fault]).items():
            monkeypatch.setenv(key, value)
        return switch

    return arm


ASYNC_FAULTS = {
    "write-ENOSPC-shard": ("write", "ENOSPC", SHARD),
    "write-EIO-shard": ("write", "EIO", SHARD),
    "close-EIO-shard": ("close", "EIO", SHARD),
    "open-EIO-shard": ("open", "EIO", SHARD),
    "publish-ENOSPC-index": ("publish", "ENOSPC", "model.safetensors.index.json"),
    "publish-EIO-manifest": ("publish", "EIO", MANIFEST_NAME),
}


@pytest.mark.parametrize("case", sorted(ASYNC_FAULTS))
def test_async_save_fault(tmp_path: Path, writer_faults: Callable[..., Path], case: str) -> None:
    op, errno_name, match = ASYNC_FAULTS[case]
    root = str(tmp_path / "run")
    switch = writer_faults(op, errno_name=errno_name, match=match)
    switch.unlink()  # off for the first save
    with AsyncCheckpointer(root, max_shard_size=48 * 1024) as ckpt:
        writer = ckpt.writer_pid
        first = ckpt.save(1, {"model": state(1)})
        first.wait(120)
        switch.touch()
        bad = ckpt.save(2, {"model": state(2)})  # training goes on: save returns at once
        error = bad.exception(120)
        assert isinstance(error, SaveFailedError), error
        assert isinstance(error.__cause__, StorageError), error.__cause__
        assert error.__cause__.errno == getattr(errno, errno_name), error.__cause__.errno
        text = str(error)
        assert "checkpoint-2" in text and match.strip(".") in text, text
        assert CAUSE[errno_name] in text.lower(), text
        assert find_latest_checkpoint(root) == first.path
        switch.unlink()
        third = ckpt.save(3, {"model": state(3)})
        third.wait(120)
    assert find_latest_checkpoint(root) == third.path
    for path in (first.path, third.path):
        assert verify_checkpoint(path).ok
    assert not Path(bad.path, MANIFEST_NAME).exists()
    if writer is not None:  # idle now: stop it rather than wait out its grace and linger
        os.kill(writer, signal.SIGTERM)
    wait_gone(writer)  # the failed save's marker names the writer: gc waits for its exit
    assert bad.path in collect_garbage(root, shared_memory=False).removed


def test_async_hang_blocks_neither_training_nor_discovery(
    tmp_path: Path, writer_faults: Callable[..., Path]
) -> None:
    root = str(tmp_path / "run")
    hang = tmp_path / "hang"
    writer_faults("write", hang_path=str(hang), match=SHARD)
    with AsyncCheckpointer(root, max_shard_size=48 * 1024, arenas_per_rank=2) as ckpt:
        first = ckpt.save(1, {"model": state(1)})
        first.wait(120)
        hang.touch()
        second = ckpt.save(2, {"model": state(2)})  # returned although the storage hangs
        with pytest.raises(TimeoutError):
            second.wait(0.2)
        assert hang.exists() and not second.done()
        assert find_latest_checkpoint(root) == first.path
        hang.unlink()
        second.wait(120)
    assert find_latest_checkpoint(root) == second.path
    assert verify_checkpoint(second.path).ok


# ---- real ENOSPC: a 4 MiB tmpfs ----------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave_bytes: int) -> Path:
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler = mnt / "filler"
    filler.write_bytes(b"\0" * max(0, free - leave_bytes))
    return filler


def test_real_enospc_sync(small_tmpfs: Path) -> None:
    root = str(small_tmpfs / "run")
    first = save(root, 1, nbytes=MiB)
    filler = _fill(small_tmpfs, leave_bytes=MiB // 2)
    with pytest.raises(StorageError, match="no space left") as info:
        save(root, 2, nbytes=MiB)
    assert "checkpoint-2" in str(info.value)
    assert find_latest_checkpoint(root) == first
    assert_intact(first, 1, nbytes=MiB)
    filler.unlink()
    assert_intact(save(root, 3, nbytes=MiB), 3, nbytes=MiB)


def test_real_enospc_async(small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTSVC_NODE_ID", f"enospc{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("CKPTSVC_WRITER_LINGER_S", "1")
    root = str(small_tmpfs / "run")
    with AsyncCheckpointer(root, max_shard_size=MiB) as ckpt:
        first = ckpt.save(1, state(1, nbytes=MiB))
        first.wait(120)
        filler = _fill(small_tmpfs, leave_bytes=MiB // 2)
        error = ckpt.save(2, state(2, nbytes=MiB)).exception(120)
        assert isinstance(error, SaveFailedError) and "no space left" in str(error)
        assert "checkpoint-2" in str(error)
        assert find_latest_checkpoint(root) == first.path
        filler.unlink()
        third = ckpt.save(3, state(3, nbytes=MiB))
        third.wait(120)
    assert verify_checkpoint(first.path).ok and verify_checkpoint(third.path).ok
    assert find_latest_checkpoint(root) == third.path
