"""kill -9 in the middle of ``save_checkpoint``: a real subprocess, a real SIGKILL.

The child process runs a sequence of saves (``targets``: checkpoint ids, possibly
repeating one to overwrite it). Hooks in the child (wrapping the storage layer's
``publish`` / shard sink / ``os.replace``) stop it at an exact point of one save - after
the marker, in the middle of a shard, after a shard, after the index, just before the
manifest's rename, after the manifest - announce it on stdout and wait; the parent then
sends SIGKILL. No sleeps, no timing: the kill lands where the test says.

After the kill the parent checks the commit protocol's promise: the interrupted directory
is never returned by ``find_latest_checkpoint`` (unless the manifest was already
published, in which case it is complete and loads), the previous checkpoint is still
found, verifies and loads bit for bit, and a torn first-ever save leaves ``None``.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import StorageRoot
from helpers_models import assert_state_dicts_bitwise_equal, crash_state

from ckptsvc.errors import IncompleteCheckpointError
from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME
from ckptsvc.read.discovery import (
    CheckpointStatus,
    checkpoint_info,
    next_checkpoint_path,
)
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.sharded_checkpoint import index_file_name, load_checkpoint, validate_checkpoint

pytestmark = pytest.mark.multiproc

TESTS_DIR = Path(__file__).resolve().parent
MiB = 2**20
SAVE_NBYTES = 4 * MiB  # crash_state(): 8 tensors of 512 KiB
MAX_SHARD_BYTES = 1 * MiB  # -> 4 shards per save
PAUSE_TIMEOUT_S = 180.0  # only a hang guard: the child normally pauses within seconds

CHILD = textwrap.dedent(
    r"""
    import json, os, sys, time
    sys.path.insert(0, sys.argv[2])
    from helpers_models import crash_state
    from ckptsvc.storage import Location
    from ckptsvc.sharded_checkpoint import next_checkpoint_path, save_checkpoint

    plan = json.loads(sys.argv[1])
    point = plan["point"]
    state = {"save": 0, "written": 0}

    def pause(why):
        sys.stdout.write("PAUSED " + why + "\n")
        sys.stdout.flush()
        while True:  # wait for SIGKILL
            time.sleep(3600)

    def armed(kind, name=None):
        return (
            point["kind"] == kind
            and state["save"] == point["save"]
            and (point.get("name") is None or point["name"] == name)
        )

    real_publish = Location.publish
    def publish(self, data):
        real_publish(self, data)
        if armed("after_publish", self.name):
            pause("after publish " + self.name)
    Location.publish = publish
    real_create = Location.create_exclusive
    def create_exclusive(self, data):  # the claim (in-progress marker)
        created = real_create(self, data)
        if armed("after_publish", self.name):
            pause("after publish " + self.name)
        return created
    Location.create_exclusive = create_exclusive

    real_remove = Location.remove
    def remove(self, **kw):
        real_remove(self, **kw)
        if armed("after_remove", self.name):
            pause("after remove " + self.name)
    Location.remove = remove

    real_replace = os.replace
    def replace(src, dst, *a, **kw):
        if armed("before_rename", os.path.basename(str(dst))):
            pause("before rename " + str(dst))
        return real_replace(src, dst, *a, **kw)
    os.replace = replace

    real_open_sink = Location.open_sink
    def open_sink(self, **kw):
        sink = real_open_sink(self, **kw)
        name = self.name
        real_write, real_close = sink.write, sink.close
        def write(data):
            view = memoryview(data).cast("B")
            if armed("mid_write") and state["written"] + view.nbytes > point["nbytes"]:
                keep = point["nbytes"] - state["written"]
                real_write(view[:keep])
                pause("mid write of " + name + " at byte " + str(point["nbytes"]))
            real_write(view)
            state["written"] += view.nbytes
        def close():
            real_close()
            if armed("after_close", name):
                pause("after close " + name)
        sink.write, sink.close = write, close
        return sink
    Location.open_sink = open_sink

    opts = plan["storage_options"]
    for number, target in enumerate(plan["targets"], start=1):
        state["save"], state["written"] = number, 0
        save_checkpoint(
            next_checkpoint_path(plan["root"], target),
            crash_state(number),
            safetensors=plan["safetensors"],
            max_shard_size=plan["max_shard_size"],
            storage_options=opts,
            step=number,
        )
        sys.stdout.write("COMMITTED %d\n" % number)
        sys.stdout.flush()
    sys.stdout.write("DONE\n")
    sys.stdout.flush()
    """
)


@dataclass(frozen=True)
class KillPoint:
    """Where to stop save number ``save`` (1-based) of the sequence ``targets``."""

    kind: str  # after_publish | after_remove | before_rename | mid_write | after_close
    save: int
    name: str | None = None
    nbytes: int = 0


@dataclass(frozen=True)
class Scenario:
    targets: tuple[int, ...]
    point: KillPoint
    safetensors: bool = True
    #: True when the kill lands after the manifest is published (the save is complete)
    committed: bool = False
    local_only: bool = False


def _shard(i: int, n: int = 4, *, safetensors: bool = True) -> str:
    if safetensors:
        return f"model-{i:05}-of-{n:05}.safetensors"
    return f"pytorch_model-{i:05}-of-{n:05}.bin"


SCENARIOS: dict[str, Scenario] = {
    "first-save-after-marker": Scenario((1,), KillPoint("after_publish", 1, MARKER_NAME)),
    "first-save-mid-shard": Scenario(
        (1,), KillPoint("mid_write", 1, nbytes=SAVE_NBYTES // 2 + 12345)
    ),
    "first-save-after-index": Scenario((1,), KillPoint("after_publish", 1, index_file_name(True))),
    "second-save-after-marker": Scenario((1, 2), KillPoint("after_publish", 2, MARKER_NAME)),
    "second-save-mid-first-shard": Scenario((1, 2), KillPoint("mid_write", 2, nbytes=1000)),
    "second-save-after-shard-2": Scenario((1, 2), KillPoint("after_close", 2, _shard(2))),
    "second-save-after-last-shard-torch": Scenario(
        (1, 2), KillPoint("after_close", 2, _shard(4, safetensors=False)), safetensors=False
    ),
    "second-save-after-index": Scenario(
        (1, 2), KillPoint("after_publish", 2, index_file_name(True))
    ),
    "second-save-before-manifest-rename": Scenario(
        (1, 2), KillPoint("before_rename", 2, MANIFEST_NAME), local_only=True
    ),
    "second-save-after-manifest": Scenario(
        (1, 2), KillPoint("after_publish", 2, MANIFEST_NAME), committed=True
    ),
    "overwrite-only-checkpoint-after-marker": Scenario(
        (1, 1), KillPoint("after_publish", 2, MARKER_NAME)
    ),
    "overwrite-only-checkpoint-mid-shard": Scenario((1, 1), KillPoint("mid_write", 2, nbytes=1000)),
    "overwrite-only-checkpoint-after-replacement-manifest": Scenario(
        (1, 1), KillPoint("after_publish", 2, MANIFEST_NAME)
    ),
    "overwrite-older-mid-shard": Scenario((1, 2, 1), KillPoint("mid_write", 3, nbytes=3 * MiB)),
}


def _random_scenarios(count: int, *, seed: int) -> dict[str, Scenario]:
    """Seeded random kill points: a random number of committed saves, then a kill at a
    random byte of the next one (possibly overwriting an earlier checkpoint)."""
    rng = random.Random(seed)
    out = {}
    for i in range(count):
        saves = rng.randint(1, 3)
        targets = tuple(rng.randint(1, 3) for _ in range(saves))
        nbytes = rng.randrange(0, SAVE_NBYTES)
        use_st = rng.random() < 0.5
        out[f"random-{seed}-{i}"] = Scenario(
            targets, KillPoint("mid_write", saves, nbytes=nbytes), safetensors=use_st
        )
    return out


SCENARIOS.update(_random_scenarios(4, seed=20240601))

S3_SCENARIOS = (
    "first-save-mid-shard",
    "overwrite-only-checkpoint-mid-shard",
    "second-save-after-index",
    "second-save-after-manifest",
    "overwrite-older-mid-shard",
)

# The fast lane's sample (a first save killed mid-shard, a second one killed before its
# manifest's rename); every other scenario is marked slow and runs in the full suite.
FAST_SCENARIOS = frozenset({"first-save-mid-shard", "second-save-before-manifest-rename"})


def _lane(names: Iterable[str], fast: Iterable[str] = FAST_SCENARIOS) -> list[Any]:
    keep = set(fast)
    return [pytest.param(n, marks=() if n in keep else pytest.mark.slow) for n in names]


# ---- running the child -----------------------------------------------------------------------


def _plan(root: str, sc: Scenario, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "root": root,
        "storage_options": opts or {},
        "targets": list(sc.targets),
        "safetensors": sc.safetensors,
        "max_shard_size": MAX_SHARD_BYTES,
        "point": asdict(sc.point),
    }


@dataclass
class Outcome:
    committed: list[int]  # save numbers that finished before the kill
    paused_at: str


def run_and_kill(root: str, opts: dict[str, Any], sc: Scenario) -> Outcome:
    plan = _plan(root, sc, opts)
    env = dict(os.environ)
    env.update(
        {
            "CKPTSVC_IO_THREADS": "1",  # shards in order, so "after shard 2" is well defined
            "CKPTSVC_WRITE_CHUNK_BYTES": str(256 * 1024),  # mid-file kill points land mid-file
            "PYTHONUNBUFFERED": "1",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(plan), str(TESTS_DIR)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    committed: list[int] = []
    try:
        assert proc.stdout is not None
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], PAUSE_TIMEOUT_S)
            if not ready:
                raise AssertionError(f"child neither paused nor exited in {PAUSE_TIMEOUT_S} s")
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(
                    f"child exited before the kill point {sc.point}:\n{err[-4000:]}"
                )
            if line.startswith("COMMITTED"):
                committed.append(int(line.split()[1]))
            elif line.startswith("PAUSED"):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                assert proc.returncode == -signal.SIGKILL
                return Outcome(committed, line.strip())
            elif line.startswith("DONE"):
                raise AssertionError(f"kill point {sc.point} was never reached")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def check_after_kill(root: str, opts: dict[str, Any], sc: Scenario, outcome: Outcome) -> None:
    killed_save = sc.point.save
    assert outcome.committed == list(range(1, killed_save)), outcome
    killed_target = sc.targets[killed_save - 1]
    killed_path = next_checkpoint_path(root, killed_target)

    # which save, if any, holds the newest complete checkpoint now
    newest_save: dict[int, int] = {}  # checkpoint id -> save number that last completed it
    for number, target in enumerate(sc.targets[: killed_save - 1], start=1):
        newest_save[target] = number
    old_survives = killed_target in newest_save  # an interrupted overwrite keeps the old one
    if sc.committed:
        newest_save[killed_target] = killed_save
    expected_save = max(newest_save.values(), default=None)
    expected = None
    if expected_save is not None:
        expected = next_checkpoint_path(root, sc.targets[expected_save - 1])

    latest = find_latest_checkpoint(root, storage_options=opts)
    assert latest == expected, (
        f"after kill ({outcome.paused_at}): latest {latest}, expected {expected}"
    )

    info = checkpoint_info(killed_path, storage_options=opts)
    if sc.committed or old_survives:
        assert info.status is CheckpointStatus.COMPLETE
    else:
        assert info.status in (CheckpointStatus.INCOMPLETE, CheckpointStatus.ABSENT), info
        assert not validate_checkpoint(killed_path, storage_options=opts)
        assert not verify_checkpoint(killed_path, storage_options=opts).ok
        if info.status is CheckpointStatus.INCOMPLETE:
            with pytest.raises(IncompleteCheckpointError):
                load_checkpoint(killed_path, storage_options=opts)

    # every checkpoint that is still complete is intact and holds what its save wrote
    for ckpt_id, number in newest_save.items():
        path = next_checkpoint_path(root, ckpt_id)
        report = verify_checkpoint(path, deep=True, storage_options=opts)
        assert report.ok, report.problems
        got = load_checkpoint(path, storage_options=opts)
        assert isinstance(got, dict)
        assert_state_dicts_bitwise_equal(got, crash_state(number))


# ---- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _lane(sorted(SCENARIOS)))
def test_kill_during_save_local(tmp_path: Path, name: str) -> None:
    sc = SCENARIOS[name]
    root = str(tmp_path / "run")
    outcome = run_and_kill(root, {}, sc)
    check_after_kill(root, {}, sc, outcome)
    if name == "second-save-before-manifest-rename":
        ckpt = Path(next_checkpoint_path(root, 2))
        leftovers = [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]
        assert leftovers, "the kill landed with the manifest written to its temp name only"


@pytest.mark.parametrize("name", _lane(S3_SCENARIOS, {"second-save-after-index"}))
def test_kill_during_save_s3(s3_root: StorageRoot, name: str) -> None:
    sc = SCENARIOS[name]
    outcome = run_and_kill(s3_root.url, s3_root.storage_options, sc)
    s3_root.fs().invalidate_cache()
    check_after_kill(s3_root.url, s3_root.storage_options, sc, outcome)


@pytest.mark.slow  # the fast lane keeps test_kill_during_save_local[first-save-mid-shard]
def test_torn_first_save_returns_none_then_recovers(tmp_path: Path) -> None:
    """After a torn first save, the next save to the same id completes normally."""
    root = str(tmp_path / "run")
    sc = SCENARIOS["first-save-after-index"]
    outcome = run_and_kill(root, {}, sc)
    assert outcome.committed == []
    assert find_latest_checkpoint(root) is None
    retry = Scenario((1,), KillPoint("after_publish", 99, "never"))  # runs to the end
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(_plan(root, retry)), str(TESTS_DIR)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr[-4000:]
    path = next_checkpoint_path(root, 1)
    assert find_latest_checkpoint(root) == path
    assert not os.path.exists(os.path.join(path, MARKER_NAME))
    got = load_checkpoint(path)
    assert isinstance(got, dict)
    assert_state_dicts_bitwise_equal(got, crash_state(1))
