"""Load: 200 consecutive async saves against a slow writer, with retention after each.

Checks what only shows up over many saves: resident memory of the trainer and of the node
writer stays flat, no shared-memory segment or file descriptor leaks, every handle
resolves (durable, no error), retention never touches a save in flight, and the run ends
with exactly the retained checkpoints, the newest of which verifies.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, SaveHandle
from ckptsvc.ops.retention import maybe_delete_oldest_checkpoint
from ckptsvc.read.discovery import CheckpointStatus, list_checkpoints
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.testing.faultinject import OsFault, faults_env

SAVES = 200
WARMUP = 20
KEEP = 3
MiB = 2**20


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def segments(node: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"ckptsvc-{node}-"))


@pytest.mark.slow
def test_200_async_saves_with_a_slow_writer_and_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = f"soak{uuid.uuid4().hex[:10]}"
    root = str(tmp_path / "run")
    monkeypatch.setenv("CKPTSVC_NODE_ID", node)
    monkeypatch.setenv("CKPTSVC_WRITER_LINGER_S", "1")
    slow = OsFault(root=root, op="write", delay_s=0.003)  # every write of the writer is slow
    for key, value in faults_env([slow]).items():
        monkeypatch.setenv(key, value)
    model = torch.nn.Linear(128, 128)
    extra = torch.zeros(16 * 1024)
    handles: list[SaveHandle] = []
    with AsyncCheckpointer(root, arenas_per_rank=2, max_shard_size=48 * 1024) as ckpt:
        writer = ckpt.writer_pid
        assert writer is not None
        for step in range(SAVES):
            with torch.no_grad():
                model.weight.fill_(step)
                extra.fill_(-step)
            handles.append(ckpt.save(step, {"model": model, "extra": extra, "step": step}))
            maybe_delete_oldest_checkpoint(root, KEEP)
            assert len(segments(node)) <= 2
            if step == WARMUP:
                ckpt.wait_all(120)
                base = {
                    "rss": rss_bytes(os.getpid()),
                    "writer_rss": rss_bytes(writer),
                    "fds": fd_count(os.getpid()),
                    "writer_fds": fd_count(writer),
                }
        ckpt.wait_all(300)
        assert ckpt.writer_pid == writer, "the writer was restarted: it died during the soak"
        assert rss_bytes(os.getpid()) - base["rss"] < 32 * MiB
        assert rss_bytes(writer) - base["writer_rss"] < 32 * MiB
        assert fd_count(os.getpid()) <= base["fds"] + 2
        assert fd_count(writer) <= base["writer_fds"] + 2
    assert all(h.done() and h.exception(0) is None for h in handles)
    assert [h.step for h in handles] == list(range(SAVES))
    assert segments(node) == []
    maybe_delete_oldest_checkpoint(root, KEEP)
    infos = list_checkpoints(root)
    assert [i.status for i in infos] == [CheckpointStatus.COMPLETE] * KEEP, infos
    assert [i.step for i in infos] == list(range(SAVES - KEEP, SAVES))
    latest = find_latest_checkpoint(root)
    assert latest == handles[-1].path
    assert verify_checkpoint(latest).ok
