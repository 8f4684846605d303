"""Processes that used ckptsvc exit 0: no thread of ours is inside a torch call when the
interpreter finalizes.

A Python thread that comes back from a torch call (which released the GIL) while the
interpreter finalizes is ended by CPython (before 3.14) with ``pthread_exit``; the
unwinding reaches a ``noexcept`` C++ destructor and ``std::terminate`` aborts the process
("terminate called without an active exception", rc -6) after its work was done. The
first test shows that mechanism on its own; the others hold ckptsvc's threads in torch
calls at exit through public APIs, with real ranks (gloo, the job's TCPStore).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from dist_workers.launch import describe, launch

pytestmark = pytest.mark.multiproc


def test_a_thread_inside_a_torch_call_at_exit_aborts_the_interpreter(tmp_path: Path) -> None:
    """What the tests below guard against, shown without ckptsvc: a daemon thread still
    in ``torch.mm`` when the main thread ends kills the process with SIGABRT. If a
    Python or torch release stops this (CPython 3.14 parks such threads instead), the
    guard is no longer needed and this test says so."""
    script = textwrap.dedent(
        """
        import threading, time, torch
        square = torch.randn(128, 128)
        started = threading.Event()
        def spin():
            started.set()
            while True:
                torch.mm(square, square)
        threading.Thread(target=spin, daemon=True).start()
        started.wait()
        print("main done", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert "main done" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stderr[-2000:])
    assert "terminate called without an active exception" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("close", [True, False], ids=["closed", "left-to-exit"])
def test_commit_threads_are_joined_so_two_ranks_exit_cleanly(close: bool, tmp_path: Path) -> None:
    """Every rank's commit thread runs a metrics listener after its handle completed
    (listeners run on the emitting thread) and stays in torch calls for a while: the
    ranks must still exit 0, whether they close the checkpointer or leave it to the
    interpreter's exit, and no commit thread may be alive once ``close`` returned."""
    runs = launch(
        "slow_listener",
        {"root": str(tmp_path / "run"), "hold_s": 4.0, "close": close},
        world=2,
        node_prefix=f"exit-{uuid.uuid4().hex[:8]}",
        timeout_s=240,
    )
    assert [r.returncode for r in runs] == [0, 0], describe(runs)
    for r in runs:
        assert r.result is not None, describe(runs)
        assert r.result.get("commit_threads_after_close", []) == [], describe(runs)
    assert "terminate called" not in "".join(r.output for r in runs), describe(runs)
