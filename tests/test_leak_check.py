"""The leak check behind the ``node`` fixture (tests/conftest.py) finds each kind of leak."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import SHM, LeakBaseline, node_leaks, node_writer_pids, shm_segments

from ckptsvc import AsyncCheckpointer
from ckptsvc.storage import Location
from ckptsvc.workers.claim import claim_checkpoint

TESTS_DIR = Path(__file__).parent


def test_a_clean_test_has_no_leaks(node: str, tmp_path: Path) -> None:
    before = LeakBaseline()
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": torch.ones(8)}).wait(60)
        assert node_writer_pids(node) == [ckpt.writer_pid]
    assert node_leaks(node, before) == []  # the idle writer was stopped
    assert node_writer_pids(node) == []


def test_checkpointer_factory_closes_what_it_made_before_the_check(
    checkpointer: Callable[..., AsyncCheckpointer], tmp_path: Path
) -> None:
    ckpt = checkpointer(tmp_path, max_shard_size=4096)
    ckpt.save(1, {"w": torch.ones(4096)}).wait(60)  # left open: the teardown closes it


@pytest.mark.skipif(not os.path.isdir(SHM), reason="needs /dev/shm")
def test_a_left_segment_is_a_leak_and_is_removed(node: str) -> None:
    before = LeakBaseline()
    name = f"ckptsvc-{node}-0-{os.getpid()}-1"
    Path(SHM, name).write_bytes(b"\0" * 64)
    (leak,) = node_leaks(node, before)
    assert "shared memory" in leak and name in leak
    assert shm_segments(node) == []


def test_a_ckptsvc_thread_still_running_is_a_leak(node: str) -> None:
    before = LeakBaseline()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="ckptsvc-test-leak", daemon=True)
    thread.start()
    try:
        (leak,) = node_leaks(node, before, grace_s=0.1)
        assert "threads" in leak and "ckptsvc-test-leak" in leak
    finally:
        stop.set()
        thread.join()


def test_a_held_claim_is_a_leak(node: str, tmp_path: Path) -> None:
    before = LeakBaseline()
    claim = claim_checkpoint(Location.parse(str(tmp_path / "ckpt")))
    try:
        (leak,) = node_leaks(node, before)
        assert "claims" in leak and "ckpt" in leak
    finally:
        claim.release()
    assert node_leaks(node, before) == []


def test_an_unclosed_checkpointer_leaks_its_arena_writer_and_threads(
    node: str, tmp_path: Path
) -> None:
    before = LeakBaseline()
    ckpt = AsyncCheckpointer(tmp_path)
    ckpt.save(1, {"w": torch.ones(1024)}).wait(60)
    writer = ckpt.writer_pid
    try:
        leaks = node_leaks(node, before, grace_s=1.0)
    finally:
        ckpt.close()  # the writer was killed: close() only unlinks and disconnects
    assert len(leaks) == 3, leaks
    assert "shared memory" in leaks[0]
    assert "threads" in leaks[1] and "ckptsvc-writer-client" in leaks[1]
    assert "node writers" in leaks[2] and str(writer) in leaks[2]
    assert node_leaks(node, LeakBaseline()) == []


@pytest.mark.slow
def test_the_node_fixture_fails_a_leaking_test(tmp_path: Path) -> None:
    """End to end: a pytest session with this conftest fails a test that leaks."""
    (tmp_path / "conftest.py").write_text((TESTS_DIR / "conftest.py").read_text())
    (tmp_path / "test_leaky.py").write_text(
        "import os\n"
        "def test_leaky(node):\n"
        f"    open(os.path.join({SHM!r}, f'ckptsvc-{{node}}-0-1-1'), 'wb').close()\n"
        "def test_clean(node):\n"
        "    pass\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(tmp_path)])}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "2 passed, 1 error" in run.stdout, run.stdout
    assert "the test leaked:" in run.stdout and "shared memory of node" in run.stdout
