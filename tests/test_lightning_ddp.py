"""Lightning DDP at 2 ranks (CPU, gloo, Lightning's own launcher) through
``CkptsvcCheckpointIO``: a run resumed from a ckptsvc checkpoint has the same losses,
bitwise on every rank, as an unbroken run; only rank 0 writes; the CLI lists, verifies,
collects and prunes the checkpoints under the ``ModelCheckpoint`` dirpath."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_verify_gc import ckptsvc_main

from ckptsvc.read.discovery import CheckpointStatus, list_checkpoints
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.workers.latest_pointer import POINTER_NAME

pytest.importorskip("lightning.pytorch", reason="needs lightning (ckptsvc[lightning])")

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "dist_workers" / "lightning_worker.py"


def _fit(out: Path, *, ckpt_path: Path | None = None) -> dict[int, dict[str, str]]:
    """Train to step 6 on 2 ranks (resuming from ``ckpt_path``); each rank's losses by step
    (``float.hex()``)."""
    cmd = [sys.executable, str(WORKER), str(out), "6"] + ([str(ckpt_path)] if ckpt_path else [])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r: json.loads((out / f"losses-rank{r}.json").read_text()) for r in (0, 1)}


@pytest.mark.slow  # two 2-rank Lightning runs, ~15-25 s each on 2 cores
def test_ddp_two_ranks_resume_with_identical_losses_and_the_cli_sees_them(
    tmp_path: Path, node: str, capsys: pytest.CaptureFixture[str]
) -> None:
    unbroken = _fit(tmp_path)
    ckpts = tmp_path / "ckpts"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        POINTER_NAME,
        "step=2.ckpt",
        "step=4.ckpt",
        "step=6.ckpt",
    ]
    assert set(unbroken[0]) == set(unbroken[1]) == {str(s) for s in range(1, 7)}
    assert unbroken[0] != unbroken[1]  # each rank trained on its own half of the data

    resumed = _fit(tmp_path, ckpt_path=ckpts / "step=4.ckpt")  # seed 123: only a restore helps
    for rank in (0, 1):
        assert resumed[rank] == {s: unbroken[rank][s] for s in ("5", "6")}, rank

    infos = list_checkpoints(str(ckpts))
    assert [(i.location.name, i.step, i.status) for i in infos] == [
        (f"step={s}.ckpt", s, CheckpointStatus.COMPLETE) for s in (2, 4, 6)
    ]
    for info in infos:  # rank 0 alone wrote each: one process, no per-rank files
        assert info.manifest is not None and info.manifest.world_size == 1
        assert not any("rank" in f.path for f in info.manifest.files), info.url

    code, out = ckptsvc_main(capsys, "ls", str(ckpts))
    assert code == 0 and all(f"step={s}.ckpt" in out for s in (2, 4, 6)), out
    code, out = ckptsvc_main(capsys, "verify", str(ckpts))
    assert code == 0 and "3 passed, 0 failed" in out, out
    (ckpts / "step=8.ckpt").mkdir()  # a save cut short: a marker and a stray shard
    (ckpts / "step=8.ckpt" / ".ckptsvc-in-progress").write_text("{}")
    code, out = ckptsvc_main(capsys, "gc", str(ckpts), "--dry-run")
    assert code == 0 and "step=8.ckpt" in out, out
    code, out = ckptsvc_main(capsys, "prune", str(ckpts), "--keep", "1")
    assert code == 0 and "deleted 2" in out, out
    assert sorted(p.name for p in ckpts.iterdir()) == [POINTER_NAME, "step=6.ckpt", "step=8.ckpt"]
    assert verify_checkpoint(str(ckpts / "step=6.ckpt"), deep=True).ok
