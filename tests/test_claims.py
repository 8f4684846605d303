"""Exclusive checkpoint directories (issue 17): two savers of one step never both proceed,
a committed checkpoint is never rewritten in place, and a replacement keeps the old one
until the new one committed. Real threads, real processes, real kill -9, real S3 server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StorageRoot

import ckptsvc
from ckptsvc import AsyncCheckpointer, find_latest_checkpoint, load_state, verify_checkpoint
from ckptsvc.errors import CommitConflictError, ConfigError, StorageError
from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME, Manifest
from ckptsvc.storage import Location
from ckptsvc.workers.claim import check_claim, claim_checkpoint, read_marker
from ckptsvc.workers.commit import replacement_location
from ckptsvc.workers.latest_pointer import POINTER_NAME

pytestmark = pytest.mark.timeout(120)


def _state(seed: int, n: int = 4) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, 64, generator=g), "seed": seed}


def _seed_of(path: str, storage_options: dict[str, Any] | None = None) -> int:
    state = load_state(path, storage_options=storage_options)
    g = torch.Generator().manual_seed(state["seed"])
    assert torch.equal(state["w"], torch.randn(*state["w"].shape, generator=g)), "a mix"
    return int(state["seed"])


# ---- step names -------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["5/../../x", 1.5, True, "abc", -1, None, "7"])
def test_save_refuses_a_step_that_is_not_a_non_negative_int(
    node: str, tmp_path: Path, step: object
) -> None:
    with (
        AsyncCheckpointer(tmp_path / "run") as ckpt,
        pytest.raises(ConfigError, match="step must be a non-negative int"),
    ):
        ckpt.save(step, _state(1))  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.json"))
    assert not (tmp_path / "x").exists()


def test_sync_save_refuses_a_bad_step(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        ckptsvc.save_checkpoint(str(tmp_path / "c"), torch.nn.Linear(2, 2), step="../x")  # type: ignore[arg-type]
    assert not (tmp_path / "c").exists()


# ---- two savers of one step --------------------------------------------------------------------


def test_two_threads_saving_one_step_exactly_one_proceeds(node: str, tmp_path: Path) -> None:
    trials = 15
    with AsyncCheckpointer(tmp_path / "run", arenas_per_rank=2) as ckpt:
        for step in range(trials):
            barrier = threading.Barrier(2)
            outcomes: dict[int, Any] = {}

            def one(
                seed: int,
                step: int = step,
                barrier: threading.Barrier = barrier,
                outcomes: dict[int, Any] = outcomes,
            ) -> None:
                barrier.wait()
                try:
                    ckpt.save(step, _state(seed)).wait(60)
                    outcomes[seed] = "durable"
                except CommitConflictError as e:
                    outcomes[seed] = e

            threads = [threading.Thread(target=one, args=(s,)) for s in (1000 + step, 2000 + step)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(90)
            durable = [s for s, o in outcomes.items() if o == "durable"]
            assert len(durable) == 1, outcomes
            path = str(tmp_path / "run" / "checkpoints" / f"checkpoint-{step}")
            verify_checkpoint(path, deep=True)
            assert _seed_of(path) == durable[0]  # the skeleton and tensors of one save


_SAVER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from ckptsvc import AsyncCheckpointer
    from ckptsvc.errors import CommitConflictError
    root, seed, go, step = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    g = torch.Generator().manual_seed(seed)
    state = {"w": torch.randn(4, 64, generator=g), "seed": seed}
    with AsyncCheckpointer(root) as ckpt:
        while not os.path.exists(go):
            time.sleep(0.001)
        try:
            ckpt.save(step, state).wait(60)
            print(json.dumps({"seed": seed, "outcome": "durable"}))
        except CommitConflictError as e:
            print(json.dumps({"seed": seed, "outcome": "conflict", "error": str(e)}))
    """
)


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_with_their_own_writers_saving_one_step(tmp_path: Path) -> None:
    root = tmp_path / "run"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    for trial in range(3):
        go = tmp_path / f"go-{trial}"
        procs = []
        for seed in (10 + trial, 20 + trial):
            env = {**os.environ, "CKPTSVC_NODE_ID": f"claims-{os.getpid()}-{seed}"}
            env["CKPTSVC_WRITER_LINGER_S"] = "1"
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), str(root), str(seed), str(go), str(trial)],
                    stdout=subprocess.PIPE,
                    env=env,
                    text=True,
                )
            )
        time.sleep(2.0)  # both imported torch and wait for the signal
        go.touch()
        results = [json.loads(p.communicate(timeout=90)[0].strip().splitlines()[-1]) for p in procs]
        durable = [r["seed"] for r in results if r["outcome"] == "durable"]
        assert len(durable) == 1, results
        path = str(root / "checkpoints" / f"checkpoint-{trial}")
        verify_checkpoint(path, deep=True)
        assert _seed_of(path) == durable[0]


def test_a_claim_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    ckpt = Location.parse(str(tmp_path / "checkpoint-3"))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ckpt.makedirs()
    marker = {"pid": proc.pid, "host": socket.gethostname(), "started": "x", "claim": "dead"}
    from ckptsvc.liveness import pid_namespace

    marker["pidns"] = pid_namespace()
    (tmp_path / "checkpoint-3" / MARKER_NAME).write_text(json.dumps(marker))
    with pytest.raises(CommitConflictError, match=f"pid {proc.pid}"):
        claim_checkpoint(ckpt)  # alive: a live save
    proc.kill()
    proc.wait()
    claim = claim_checkpoint(ckpt)
    try:
        assert read_marker(ckpt)["claim"] == claim.claim_id  # type: ignore[index]
    finally:
        claim.release()


def test_a_claim_from_another_host_is_live_until_its_lease_runs_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = Location.parse(str(tmp_path / "checkpoint-4"))
    ckpt.makedirs()
    marker_path = tmp_path / "checkpoint-4" / MARKER_NAME
    marker_path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "claim": "far"}))
    with pytest.raises(CommitConflictError, match="elsewhere"):
        claim_checkpoint(ckpt)
    monkeypatch.setenv("CKPTSVC_CLAIM_LEASE_S", "30")
    old = time.time() - 60
    os.utime(marker_path, (old, old))  # not refreshed for longer than the lease
    claim = claim_checkpoint(ckpt)
    claim.release()


def test_held_claims_are_refreshed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTSVC_CLAIM_LEASE_S", "0.4")
    ckpt = Location.parse(str(tmp_path / "checkpoint-6"))
    claim = claim_checkpoint(ckpt)
    marker_path = tmp_path / "checkpoint-6" / MARKER_NAME
    old = time.time() - 3600
    os.utime(marker_path, (old, old))
    deadline = time.time() + 10
    while marker_path.stat().st_mtime < old + 10 and time.time() < deadline:
        time.sleep(0.05)
    assert marker_path.stat().st_mtime > old + 10, "the keeper never refreshed the marker"
    claim.release()


def test_a_save_whose_claim_was_taken_over_is_not_committed(tmp_path: Path) -> None:
    ckpt = Location.parse(str(tmp_path / "checkpoint-8"))
    claim = claim_checkpoint(ckpt)
    (tmp_path / "checkpoint-8" / MARKER_NAME).write_text(json.dumps({"claim": "someone-else"}))
    with pytest.raises(CommitConflictError, match="taken over"):
        check_claim(ckpt, claim.claim_id)
    claim.release()


# ---- re-saving a committed step ----------------------------------------------------------------


def test_resave_of_a_committed_step_is_refused_unless_overwrite(node: str, tmp_path: Path) -> None:
    root = tmp_path / "run"
    with AsyncCheckpointer(root) as ckpt:
        ckpt.save(5, _state(1)).wait(60)
        with pytest.raises(CommitConflictError, match="overwrite=True"):
            ckpt.save(5, _state(2))
        ckpt.save(5, _state(3), overwrite=True).wait(60)
    path = str(root / "checkpoints" / "checkpoint-5")
    assert _seed_of(path) == 3
    verify_checkpoint(path, deep=True)
    assert sorted(os.listdir(root / "checkpoints")) == [
        "checkpoint-5",
        POINTER_NAME,
    ]  # no successor
    manifest = json.loads((root / "checkpoints" / "checkpoint-5" / MANIFEST_NAME).read_text())
    assert manifest["checkpoint_path"] == path


_OVERWRITER = textwrap.dedent(
    """
    import sys, time, torch
    from ckptsvc import AsyncCheckpointer
    root = sys.argv[1]
    with AsyncCheckpointer(root) as ckpt:
        big = {"w": torch.ones(64, 2**20), "seed": 99}  # 256 MiB: the write takes a while
        h = ckpt.save(5, big, overwrite=True)
        print("saving", flush=True)
        h.wait(120)
    """
)


@pytest.mark.slow
def test_kill_9_during_an_overwrite_keeps_the_committed_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "run"
    ckptsvc.save_checkpoint(
        str(root / "checkpoints" / "checkpoint-5"), {"w": _state(1)["w"]}, safetensors=True
    )
    script = tmp_path / "overwriter.py"
    script.write_text(_OVERWRITER)
    env = {**os.environ, "CKPTSVC_NODE_ID": f"claims-kill-{os.getpid()}"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root)], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "saving"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = find_latest_checkpoint(str(root))
    assert latest == str(root / "checkpoints" / "checkpoint-5")
    verify_checkpoint(latest, deep=True)
    # the kill lands while the successor is written (the usual case) or, on a fast disk,
    # after its swap: either way checkpoint-5 is one whole checkpoint, never a mix
    manifest = Manifest.from_json(Path(latest, MANIFEST_NAME).read_bytes(), where=latest)
    if {c.key for c in manifest.components} == {"seed", "w"}:
        state = load_state(latest)
        assert state["seed"] == 99 and torch.equal(state["w"], torch.ones(64, 2**20))
    else:
        assert torch.equal(ckptsvc.load_checkpoint(latest)["w"], _state(1)["w"])


def test_sync_overwrite_that_fails_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = str(tmp_path / "c")
    ckptsvc.save_checkpoint(out, {"w": torch.zeros(8)}, safetensors=True)
    from ckptsvc.engine import sync_save

    real = sync_save._write_files

    def fail_midway(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise StorageError("simulated: no space left on device", url=out)

    monkeypatch.setattr(sync_save, "_write_files", fail_midway)
    with pytest.raises(StorageError):
        ckptsvc.save_checkpoint(out, {"w": torch.ones(8)}, safetensors=True)
    assert torch.equal(ckptsvc.load_checkpoint(out)["w"], torch.zeros(8))
    verify_checkpoint(out, deep=True)
    assert sorted(os.listdir(tmp_path)) == ["c"]  # the failed successor was removed


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
        ).returncode
        == 0
    )


def test_sync_overwrite_on_a_full_disk_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "6m"):
        pytest.skip("needs root and mount to make a small tmpfs")
    try:
        out = str(disk / "c")
        ckptsvc.save_checkpoint(out, {"w": torch.zeros(2**20)}, safetensors=True)  # 4 MiB
        with pytest.raises(StorageError, match=r"No space|ENOSPC|space"):
            ckptsvc.save_checkpoint(out, {"w": torch.ones(2**20)}, safetensors=True)
        assert torch.equal(ckptsvc.load_checkpoint(out)["w"], torch.zeros(2**20))
        verify_checkpoint(out, deep=True)
        assert sorted(os.listdir(disk)) == ["c"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_replacement_committed_but_not_swapped_in_is_found_and_finished(
    node: str, tmp_path: Path
) -> None:
    root = tmp_path / "run"
    final = root / "checkpoints" / "checkpoint-2"
    ckptsvc.save_checkpoint(str(final), {"w": torch.zeros(4)}, safetensors=True, step=2)
    stage = Path(replacement_location(Location.parse(str(final))).path)
    ckptsvc.save_checkpoint(str(stage), {"w": torch.ones(4)}, safetensors=True, step=2)
    shutil.rmtree(final)  # a crash between the two renames of a swap without RENAME_EXCHANGE
    with AsyncCheckpointer(root) as ckpt:  # the next replacement finishes the swap first
        ckpt.save(2, {"w": torch.full((4,), 2.0)}, overwrite=True).wait(60)
    assert torch.equal(load_state(str(final))["w"], torch.full((4,), 2.0))
    assert not stage.exists()


@pytest.mark.cloud
def test_claims_and_replacement_on_s3(node: str, s3_root: StorageRoot) -> None:
    opts = s3_root.storage_options
    ckpt = s3_root.location("checkpoints", "checkpoint-1")
    first = claim_checkpoint(ckpt)
    with pytest.raises(CommitConflictError):
        claim_checkpoint(ckpt)  # the conditional PUT refuses the second claim
    first.abandon()
    with AsyncCheckpointer(s3_root.url, storage_options=opts) as saver:
        saver.save(1, _state(1)).wait(60)
        with pytest.raises(CommitConflictError):
            saver.save(1, _state(2))
        saver.save(1, _state(3), overwrite=True).wait(60)
    path = s3_root.join("checkpoints", "checkpoint-1")
    assert _seed_of(path, opts) == 3
    verify_checkpoint(path, deep=True, storage_options=opts)
    names = [c.name for c in s3_root.location("checkpoints").list_children()]
    assert sorted(names) == ["checkpoint-1", POINTER_NAME]


# ---- a concurrent-save campaign ------------------------------------------------------------------

_RACER = textwrap.dedent(
    """
    import json, os, random, sys, time
    import torch
    from ckptsvc import AsyncCheckpointer
    from ckptsvc.errors import CheckpointError
    root, who, steps, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    rng = random.Random(who)
    with AsyncCheckpointer(root) as ckpt, open(log, "a") as out:
        for step in range(steps):
            seed = who * 1000 + step
            g = torch.Generator().manual_seed(seed)
            state = {"w": torch.randn(64, 1024, generator=g), "seed": seed}
            overwrite = rng.random() < 0.5
            out.write(json.dumps({"step": step, "seed": seed, "outcome": "started"}) + "\\n")
            out.flush()
            try:
                ckpt.save(step, state, overwrite=overwrite).wait(120)
                outcome = "durable"
            except CheckpointError as e:
                outcome = type(e).__name__
            out.write(json.dumps({"step": step, "seed": seed, "outcome": outcome}) + "\\n")
            out.flush()
            time.sleep(rng.random() * 0.05)
    """
)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_concurrent_savers_with_kill_9_never_lose_a_committed_checkpoint(tmp_path: Path) -> None:
    """Three processes (own writers) save the same steps of one root, half of them with
    overwrite=True, while one of them is killed with SIGKILL at a random moment per round.
    Every step any process saw durable must end complete, verify, and hold one save's
    tensors and skeleton (never a mix)."""
    import random

    rng = random.Random(17)
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    rounds, steps, savers = 4, 5, 3
    trials = kills = 0
    lost: list[str] = []
    outcomes: dict[str, int] = {}
    for rnd in range(rounds):
        root = tmp_path / f"run{rnd}"
        logs = [tmp_path / f"log-{rnd}-{who}" for who in range(savers)]
        procs = []
        for who in range(savers):
            env = {**os.environ, "CKPTSVC_NODE_ID": f"race-{os.getpid()}-{rnd}-{who}"}
            env["CKPTSVC_WRITER_LINGER_S"] = "1"
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(script),
                        str(root),
                        str(who + 1),
                        str(steps),
                        str(logs[who]),
                    ],
                    env=env,
                )
            )
        time.sleep(2.0 + rng.random() * 2.0)
        victim = procs[rng.randrange(savers)]
        if victim.poll() is None:
            victim.send_signal(signal.SIGKILL)
            kills += 1
        for p in procs:
            p.wait(timeout=300)
        reports = [
            json.loads(line)
            for log in logs
            if log.exists()
            for line in log.read_text().splitlines()
        ]
        for r in reports:
            if r["outcome"] != "started":
                trials += 1
                outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        for step in range(steps):
            durable = {
                r["seed"] for r in reports if r["step"] == step and r["outcome"] == "durable"
            }
            if not durable:
                continue
            path = str(root / "checkpoints" / f"checkpoint-{step}")
            try:
                verify_checkpoint(path, deep=True)
                seed = _seed_of(path)
            except Exception as e:  # counted, then asserted below
                lost.append(f"{path}: {type(e).__name__}: {e}")
                continue
            attempted = {r["seed"] for r in reports if r["step"] == step}
            if seed not in attempted:
                lost.append(f"{path}: holds seed {seed}, never saved at step {step}")
    print(f"concurrent-save campaign: {trials} saves {outcomes}, {kills} kill -9, {len(lost)} lost")
    assert trials >= rounds * steps
    assert outcomes.get("CommitConflictError", 0) > 0, "the savers never raced"
    assert not lost, lost


def test_a_committed_replacement_stands_in_when_the_swap_was_cut_short(tmp_path: Path) -> None:
    """An object-store swap killed after the target lost its manifest (or a swap without
    RENAME_EXCHANGE killed between its renames): discovery returns the replacement."""
    root = tmp_path / "run"
    final = root / "checkpoints" / "checkpoint-2"
    ckptsvc.save_checkpoint(str(final), {"w": torch.zeros(4)}, safetensors=True, step=2)
    stage = Path(replacement_location(Location.parse(str(final))).path)
    ckptsvc.save_checkpoint(str(stage), {"w": torch.ones(4)}, safetensors=True, step=2)
    assert find_latest_checkpoint(str(root)) == str(final)  # the target is complete: it wins
    (final / MANIFEST_NAME).unlink()
    (final / MARKER_NAME).write_text('{"replacing": true}')
    latest = find_latest_checkpoint(str(root))
    assert latest == str(stage)
    assert torch.equal(ckptsvc.load_checkpoint(latest)["w"], torch.ones(4))


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".", "..", -1, 1.5, True, None])
def test_next_checkpoint_path_refuses_unsafe_ids(bad: object) -> None:
    from ckptsvc import next_checkpoint_path

    with pytest.raises(ConfigError):
        next_checkpoint_path("/run", bad)  # type: ignore[arg-type]
    assert next_checkpoint_path("/run", "best-1.0_x") == "/run/checkpoints/checkpoint-best-1.0_x"
