"""``ckptsvc demo`` end to end, as a user runs it: a subprocess in a fresh directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from ckptsvc.read.discovery import CheckpointStatus, list_checkpoints


def _demo(cwd: Path, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CKPTSVC_NODE_ID": f"d{uuid.uuid4().hex[:10]}",
        "CKPTSVC_WRITER_LINGER_S": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "ckptsvc.cli", "demo", "--no-progress", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_demo_trains_saves_and_verifies(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--steps", "40", "--save-every", "10")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "save blocked training" in out and "torch.save+fsync" in out
    assert out.count("save blocked training") == 4
    assert "resume check" in out and "bitwise identical" in out and "tied embedding restored" in out
    assert "verify --deep" in out and ": OK" in out
    complete = [
        i.step for i in list_checkpoints(str(tmp_path)) if i.status is CheckpointStatus.COMPLETE
    ]
    assert complete == [20, 30, 40]  # keeps 3 (retention)


@pytest.mark.slow
def test_demo_kill_and_resume(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--output", str(tmp_path / "run"), "--steps", "40",
                 "--save-every", "10", "--kill-at", "25")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "killed by SIGKILL" in out
    assert "resumed from" in out and "checkpoint-20" in out
    assert "steps 21-25 ran twice" in out
    assert "bitwise identical to the uninterrupted run" in out


@pytest.mark.slow
def test_demo_refuses_a_directory_with_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-1" / "model.safetensors").write_bytes(b"x")
    proc = _demo(tmp_path, "--steps", "10")
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stdout
    assert (tmp_path / "checkpoints" / "checkpoint-1" / "model.safetensors").read_bytes() == b"x"


@pytest.mark.slow
def test_running_the_demo_again_replaces_its_own_checkpoints(tmp_path: Path) -> None:
    first = _demo(tmp_path, "--steps", "12", "--save-every", "4")
    assert first.returncode == 0, first.stdout + first.stderr
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert before  # the README's command, run twice in the same folder
    again = _demo(tmp_path, "--steps", "8", "--save-every", "4")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "previous `ckptsvc demo` run" in again.stdout
    after = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert after == ["checkpoint-4", "checkpoint-8"]


@pytest.mark.slow
def test_demo_rejects_a_kill_step_outside_the_run(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--steps", "10", "--kill-at", "10")
    assert proc.returncode == 2 and "--kill-at" in proc.stderr


@pytest.mark.slow
def test_demo_writes_to_s3(tmp_path: Path, s3_root: Any) -> None:
    proc = _demo(tmp_path, "--output", s3_root.url, "--storage-options",
                 json.dumps(s3_root.storage_options), "--steps", "20", "--save-every", "10")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [
        i.step
        for i in list_checkpoints(s3_root.url, storage_options=s3_root.storage_options)
        if i.status is CheckpointStatus.COMPLETE
    ]
    assert steps == [10, 20]
    assert not list(tmp_path.iterdir())  # nothing written locally


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
