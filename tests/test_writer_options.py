"""Issue 13: writer options travel with each job, and unrelated jobs get their own writer.

Real node writer processes throughout (spawned by ``AsyncCheckpointer``), real S3 (moto).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StorageRoot

from ckptsvc import WriterOptions
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, load_state
from ckptsvc.errors import ConfigError
from ckptsvc.liveness import pid_alive
from ckptsvc.stage.arena import ArenaPool
from ckptsvc.storage import Location
from ckptsvc.workers.identity import node_id
from ckptsvc.workers.launch import writer_log_path
from ckptsvc.workers.shm import ShmSegment, segment_prefix

MiB = 2**20
PART = 5 * MiB  # S3's smallest part but the last


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# Settings the node writer must take from each job, never from its environment: set to
# values a read would refuse (ConfigError), so a writer that read one fails the save.
_BOGUS_PER_JOB_ENV = {
    "CKPTSVC_FSYNC": "perhaps",
    "CKPTSVC_IO_THREADS": "many",
    "CKPTSVC_WRITE_CHUNK_BYTES": "0",
    "CKPTSVC_PART_SIZE_BYTES": "big",
    "CKPTSVC_UPLOAD_PARTS_IN_FLIGHT": "0",
    "CKPTSVC_DIRECT_IO": "sometimes",
    "CKPTSVC_DIRECT_IO_MIN_BYTES": "-1",
    "CKPTSVC_DIRECT_IO_BUFFER_BYTES": "0",
}


def test_resolve_takes_argument_then_environment_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CKPTSVC_FSYNC", "1")
    monkeypatch.setenv("CKPTSVC_PART_SIZE_BYTES", str(8 * MiB))
    monkeypatch.delenv("CKPTSVC_IO_THREADS", raising=False)
    opts = WriterOptions.resolve(fsync=False, direct_io=True)
    assert opts.fsync is False  # the argument wins over CKPTSVC_FSYNC=1
    assert opts.part_size_bytes == 8 * MiB  # the environment over the default
    assert opts.io_threads == WriterOptions().io_threads  # the default
    assert opts.direct_io == "on"
    monkeypatch.setenv("CKPTSVC_RETRY_MAX_S", "soon")
    with pytest.raises(ConfigError, match="CKPTSVC_RETRY_MAX_S='soon'"):
        WriterOptions.resolve()
    with pytest.raises(ConfigError, match="io_threads=0"):
        WriterOptions(io_threads=0)


def _part_count(root: StorageRoot, ckpt_url: str) -> dict[str, int]:
    """Each shard of the checkpoint at ``ckpt_url``: how many parts its upload had
    (``1`` for a single PUT: its ETag has no ``-N`` suffix)."""
    assert root.server is not None and root.bucket is not None
    s3 = root.server.boto3_client()
    prefix = ckpt_url.removeprefix(f"s3://{root.bucket}/")
    counts = {}
    for obj in s3.list_objects_v2(Bucket=root.bucket, Prefix=prefix)["Contents"]:
        if obj["Key"].endswith(".safetensors"):
            etag = s3.head_object(Bucket=root.bucket, Key=obj["Key"])["ETag"].strip('"')
            counts[obj["Key"].rsplit("/", 1)[1]] = int(etag.split("-")[1]) if "-" in etag else 1
    return counts


@pytest.mark.timeout(120)
def test_two_checkpointers_share_one_writer_each_with_its_own_options(
    s3_root: StorageRoot, node: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two checkpointers of one node id (they asked to share) use one writer; each save is
    uploaded with its own checkpointer's part size, and the writer - started from an
    environment whose per-job settings are all invalid - reads none of them."""
    for name, value in _BOGUS_PER_JOB_ENV.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="CKPTSVC_"):  # without options: env, checked
        AsyncCheckpointer(s3_root.join("x"), storage_options=s3_root.storage_options)
    state = {"w": torch.arange(3 * MiB, dtype=torch.float32)}  # one 12 MiB shard
    small = WriterOptions(part_size_bytes=PART, upload_parts_in_flight=2)
    # one part in flight: a 12 MiB file fits one (else its parts shrink to keep 4 uploading)
    large = WriterOptions(part_size_bytes=64 * MiB, upload_parts_in_flight=1)
    opts = s3_root.storage_options
    a = AsyncCheckpointer(s3_root.join("a"), storage_options=opts, writer_options=small)
    b = AsyncCheckpointer(s3_root.join("b"), storage_options=opts, writer_options=large)
    try:
        handle_a = a.save(1, state)
        handle_b = b.save(1, state)
        handle_a.wait()
        handle_b.wait()
        assert a.writer_pid is not None and a.writer_pid == b.writer_pid
    finally:
        a.close()
        b.close()
    assert set(_part_count(s3_root, handle_a.path).values()) == {3}  # 5 + 5 + 2 MiB
    assert set(_part_count(s3_root, handle_b.path).values()) == {1}  # one PUT
    for name in _BOGUS_PER_JOB_ENV:
        monkeypatch.delenv(name)
    for handle in (handle_a, handle_b):
        loaded = load_state(handle.path, storage_options=opts)
        assert torch.equal(loaded["w"], state["w"])


@pytest.mark.timeout(120)
def test_explicit_options_win_for_local_saves(
    node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync, threads, chunk and direct I/O settings: the writer uses the job's, never the
    invalid ones in the environment it was started with."""
    for name, value in _BOGUS_PER_JOB_ENV.items():
        monkeypatch.setenv(name, value)
    state = {f"t{i}": torch.full((1024,), float(i)) for i in range(4)}
    options = WriterOptions(fsync=False, io_threads=2, write_chunk_bytes=1000, direct_io="on")
    with AsyncCheckpointer(tmp_path / "run", max_shard_size=8192, writer_options=options) as c:
        handle = c.save(5, state)
        handle.wait()
    for name in _BOGUS_PER_JOB_ENV:
        monkeypatch.delenv(name)
    loaded = load_state(handle.path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# ---- whose writer ------------------------------------------------------------------------

_TRAINER = """
import json, sys, torch
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.workers.identity import node_id
from ckptsvc.workers.launch import writer_socket_path
with AsyncCheckpointer(sys.argv[1]) as c:
    c.save(1, {"w": torch.ones(8)}).wait()
    report = {"writer": c.writer_pid, "node": node_id(), "socket": writer_socket_path(node_id())}
    print(json.dumps(report), flush=True)
    sys.stdin.read()  # stay (and keep the writer) until the test has heard from both
"""

_LAUNCH_VARS = (
    "CKPTSVC_NODE_ID",
    "CKPTSVC_WRITER_SOCKET",
    "TORCHELASTIC_RUN_ID",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
)


def _writers_of_two_processes(tmp_path: Path, extra_env: dict[str, str]) -> list[dict[str, Any]]:
    """Start two trainer processes at once; each saves once and reports its writer pid
    and node id while both are still alive."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(extra_env, CKPTSVC_WRITER_LINGER_S="0.2")  # both stay connected till told
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TRAINER, str(tmp_path / f"run{i}")],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        reports = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, f"trainer exited with {proc.wait()}"
            reports.append(json.loads(line))
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    return reports


# slow (two trainer processes, ~5 s): the fast lane runs the same harness in the torchrun
# test below, a plain process's own node id in test_default_node_id_names_the_launched_job
# and an idle writer's exit in test_node_writer's test_idle_writer_exits_and_removes_its_socket
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_plain_processes_get_their_own_writers(tmp_path: Path) -> None:
    first, second = _writers_of_two_processes(tmp_path, {})
    assert first["node"] != second["node"]
    assert first["writer"] != second["writer"]
    for report in (first, second):  # a writer per process leaves no files behind
        wait_until(lambda r=report: not pid_alive(int(r["writer"])), "the writer to exit")
        assert not os.path.exists(report["socket"])
        assert not os.path.exists(writer_log_path(report["socket"]))


@pytest.mark.timeout(120)
def test_two_ranks_of_one_torchrun_job_share_its_writer(tmp_path: Path) -> None:
    run_id = uuid.uuid4().hex
    first, second = _writers_of_two_processes(tmp_path, {"TORCHELASTIC_RUN_ID": run_id})
    assert first["node"] == second["node"]
    assert first["writer"] == second["writer"]


def test_default_node_id_names_the_launched_job(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    alone = node_id()
    assert alone.endswith(f"_p{os.getpid()}")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    by_master = node_id()
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert node_id() != by_master != alone
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --rdzv-id
    assert node_id() not in (by_master, alone) and "none" not in node_id()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    assert node_id().endswith("_tejob_7")
    for name in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert node_id() == alone  # a plain process inside an allocation: its own
    monkeypatch.setenv("SLURM_STEP_ID", "4")
    assert node_id().endswith("_slurm123.4")
    monkeypatch.setenv("CKPTSVC_NODE_ID", "shared-by-choice")
    assert node_id() == "shared_by_choice"


def test_new_pool_reclaims_arenas_of_dead_processes_of_any_node_id(tmp_path: Path) -> None:
    """A plain process's node id is its own (``u<uid>_p<pid>``): once it and its writer
    died, no later process shares that id, so a new pool sweeps every node id's dead
    owners (a live process's arena stays)."""
    shm = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = f"{segment_prefix(f'u{os.getuid()}_p{proc.pid}')}{proc.pid}-0"
    live = f"{segment_prefix('someone_else')}{os.getpid()}-0"
    for name in (dead, live):
        ShmSegment.create(name, 4096, shm_dir=shm).close()
    pool = ArenaPool(max_arenas=1, node=f"u{os.getuid()}_p{os.getpid()}", shm_dir=shm)
    arena, _ = pool.acquire(4096)
    try:
        assert sorted(os.listdir(shm)) == sorted([live, arena.name])
    finally:
        pool.release(arena)
        pool.close()
        os.unlink(os.path.join(shm, live))


def test_a_location_keeps_its_settings_through_join_and_parent(tmp_path: Path) -> None:
    settings = WriterOptions(retry_attempts=3, part_size_bytes=PART).io_settings()
    root = Location.parse(str(tmp_path), settings=settings)
    child = root.join("a", "b.bin").parent.join("c.bin")
    assert child.settings is settings and child.retry_policy().attempts == 3
    assert Location.parse(str(tmp_path)).settings is None  # knobs, read at use
