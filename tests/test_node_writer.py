"""The node writer process and its client: real subprocesses, sockets, shared memory."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faulty_fs  # noqa: F401  (registers faulty:// in this process)
import pytest
import torch
from helpers_models import assert_bitwise_equal, mixed_state_dict
from safetensors.torch import load_file

from ckptsvc.errors import InvalidStateError, StorageError, WriterDiedError
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.format.layout import TensorSpec, plan_files
from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME, ComponentRecord, Manifest
from ckptsvc.liveness import pid_alive
from ckptsvc.stage.arena import plan_arena
from ckptsvc.stage.tensors import dtype_from_torch, tensor_bytes
from ckptsvc.workers.client import WriterClient
from ckptsvc.workers.launch import writer_socket_path
from ckptsvc.workers.protocol import (
    CommitInfo,
    FileJob,
    JobDone,
    JobFailed,
    ProtocolError,
    SaveJob,
    SmallFile,
    WriterOptions,
    check_wire_safe,
    recv_message,
    send_message,
)
from ckptsvc.workers.shm import ShmSegment, segment_prefix

TESTS_DIR = str(Path(__file__).parent)


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private node (own writer, own arenas) whose writer exits soon after the test."""
    name = f"t{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("CKPTSVC_NODE_ID", name)
    monkeypatch.setenv("CKPTSVC_WRITER_LINGER_S", "1")
    monkeypatch.setenv("CKPTSVC_WRITER_PRELOAD", "faulty_fs")
    yield name
    for left in os.listdir("/dev/shm"):
        if left.startswith(f"ckptsvc-{name}-"):
            os.unlink(os.path.join("/dev/shm", left))
    remove_stale_socket(name)


def remove_stale_socket(node: str) -> None:
    """A writer killed with SIGKILL leaves its socket file; the next start would remove it."""
    path = writer_socket_path(node)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        probe.close()


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Staged:
    segment: ShmSegment
    files: tuple[FileJob, ...]
    tensors: dict[str, torch.Tensor]

    def job(
        self,
        job_id: int,
        url: str,
        *,
        commit: bool = True,
        options: dict | None = None,
        writer_options: WriterOptions | None = None,
    ) -> SaveJob:
        info = CommitInfo(
            step=job_id,
            world_size=1,
            components=(ComponentRecord("state", "global", (0,)),),
            pytorch_version=str(torch.__version__),
            library_version="test",
        )
        return SaveJob(
            job_id=job_id,
            ckpt_url=url,
            storage_options=options or {},
            arena_name=self.segment.name,
            files=self.files,
            small_files=(SmallFile("extra.json", b'{"a": 1}'),),
            commit=info if commit else None,
            options=writer_options or WriterOptions.resolve(),
        )


def stage(node: str, tensors: dict[str, torch.Tensor], *, max_shard_size: int = 1024) -> Staged:
    """Lay tensors out as the trainer would and copy their bytes into a new segment."""
    specs = [TensorSpec(k, dtype_from_torch(t.dtype), tuple(t.shape)) for k, t in tensors.items()]
    plans = plan_files(specs, max_shard_size=max_shard_size)
    arena = plan_arena(plans)
    seg = ShmSegment.create(
        f"{segment_prefix(node)}{os.getpid()}-{uuid.uuid4().int % 10**6}", arena.nbytes
    )
    buf = memoryview(seg.buffer)
    for name, t in tensors.items():
        raw = tensor_bytes(t)
        off = arena.tensor_offsets[name]
        buf[off : off + raw.nbytes] = raw
    del buf
    jobs = tuple(
        FileJob(p.file_name, p.layout, off)
        for p, off in zip(plans, arena.file_offsets, strict=True)
    )
    return Staged(seg, jobs, tensors)


def run_job(client: WriterClient, job: SaveJob, timeout_s: float = 60.0) -> object:
    box: queue.Queue[object] = queue.Queue()
    client.submit(job, box.put)
    return box.get(timeout=timeout_s)


def test_job_streams_loadable_shards_then_commits(node: str, tmp_path: Path) -> None:
    staged = stage(node, mixed_state_dict())
    client = WriterClient.connect_or_start(node=node)
    try:
        ckpt = tmp_path / "checkpoint-1"
        done = run_job(client, staged.job(1, str(ckpt)))
        assert isinstance(done, JobDone) and done.committed, done
        manifest = Manifest.from_json((ckpt / MANIFEST_NAME).read_bytes(), where="test")
        assert not (ckpt / MARKER_NAME).exists()
        assert manifest.step == 1 and {f.path for f in manifest.files} == {
            f.path for f in done.files
        }
        loaded: dict[str, torch.Tensor] = {}
        for fj in staged.files:
            path = ckpt / fj.rel_path
            assert manifest.file(fj.rel_path).crc32c == crc32c_hex(path.read_bytes())  # type: ignore[union-attr]
            loaded.update(load_file(str(path)))
        assert sorted(loaded) == sorted(staged.tensors)
        for k, t in staged.tensors.items():
            assert_bitwise_equal(loaded[k], t, name=k)
        assert (ckpt / "extra.json").read_bytes() == b'{"a": 1}'
    finally:
        client.close()
        staged.segment.close()
        staged.segment.unlink()


def test_job_without_commit_reports_files_only(node: str, tmp_path: Path) -> None:
    staged = stage(node, mixed_state_dict())
    client = WriterClient.connect_or_start(node=node)
    try:
        done = run_job(client, staged.job(1, str(tmp_path / "c"), commit=False))
        assert isinstance(done, JobDone) and not done.committed
        assert len(done.files) == len(staged.files) + 1
        assert not (tmp_path / "c" / MANIFEST_NAME).exists()
        assert (tmp_path / "c").is_dir()  # the claim (marker) is the saving process's job
    finally:
        client.close()
        staged.segment.unlink()


def test_local_ranks_share_one_private_writer(node: str) -> None:
    clients: list[WriterClient] = []
    lock = threading.Lock()

    def connect() -> None:
        c = WriterClient.connect_or_start(node=node)
        with lock:
            clients.append(c)

    threads = [threading.Thread(target=connect) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert len(clients) == 4
        assert len({c.writer_pid for c in clients}) == 1  # started once, under the lock
        path = writer_socket_path(node)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    finally:
        for c in clients:
            c.close()


def test_storage_error_mid_stream_fails_job_and_writes_no_manifest(
    node: str, tmp_path: Path
) -> None:
    fail = tmp_path / "fail-now"
    fail.touch()
    options = {"fail_path": str(fail), "fail_after_bytes": 100}
    staged = stage(node, mixed_state_dict())
    client = WriterClient.connect_or_start(node=node)
    url = f"faulty://{tmp_path}/ckpt"
    try:
        failed = run_job(client, staged.job(1, url, options=options))
        assert isinstance(failed, JobFailed), failed
        error = failed.error.to_exception()
        assert isinstance(error, StorageError) and "injected I/O error" in str(error)
        assert not (tmp_path / "ckpt" / MANIFEST_NAME).exists()
        assert not list((tmp_path / "ckpt").glob("*.safetensors"))  # aborted, not left torn
        fail.unlink()
        done = run_job(client, staged.job(2, url, options=options))  # the same writer recovers
        assert isinstance(done, JobDone)
        assert (tmp_path / "ckpt" / MANIFEST_NAME).exists()
    finally:
        client.close()
        staged.segment.unlink()


def test_writer_runs_at_lower_cpu_priority(node: str) -> None:
    client = WriterClient.connect_or_start(node=node)
    try:
        with open(f"/proc/{client.writer_pid}/stat") as f:
            writer_nice = int(f.read().rsplit(")", 1)[1].split()[16])
        assert writer_nice == min(19, os.nice(0) + 10)
    finally:
        client.close()


def test_idle_writer_exits_and_removes_its_socket(
    node: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPTSVC_WRITER_LINGER_S", "0.2")  # the node fixture's 1 s, shorter
    client = WriterClient.connect_or_start(node=node)
    pid, path = client.writer_pid, writer_socket_path(node)
    assert os.path.exists(path)
    client.close()
    wait_until(lambda: not pid_alive(pid), "the idle writer to exit")
    assert not os.path.exists(path)
    again = WriterClient.connect_or_start(node=node)  # and a new one starts on demand
    assert again.writer_pid != pid
    again.close()


def test_garbage_from_one_client_does_not_disturb_another(node: str, tmp_path: Path) -> None:
    good = WriterClient.connect_or_start(node=node)
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.connect(writer_socket_path(node))
    bad.sendall(b"\x05\x00\x00\x00\x00\x00\x00\x00junk!")
    bad.settimeout(30)
    assert bad.recv(1) == b""  # the writer dropped the bad connection
    bad.close()
    staged = stage(node, {"w": torch.ones(4)})
    try:
        assert isinstance(run_job(good, staged.job(1, str(tmp_path / "c"))), JobDone)
    finally:
        good.close()
        staged.segment.unlink()


def test_killed_writer_fails_pending_jobs(node: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    staged = stage(node, mixed_state_dict())
    client = WriterClient.connect_or_start(node=node)
    try:
        box: queue.Queue[object] = queue.Queue()
        client.submit(
            staged.job(1, f"faulty://{tmp_path}/c", options={"gate_path": str(gate)}), box.put
        )
        os.kill(client.writer_pid, signal.SIGKILL)
        outcome = box.get(timeout=30)
        assert isinstance(outcome, WriterDiedError) and str(client.writer_pid) in str(outcome)
        assert not client.alive
        with pytest.raises(WriterDiedError):
            client.submit(staged.job(2, str(tmp_path / "d")), box.put)
    finally:
        client.close()
        staged.segment.unlink()


def test_commits_happen_in_submission_order(node: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    options = {"gate_path": str(gate), "match": "checkpoint-1/"}  # only the first save is slow
    first, second = stage(node, mixed_state_dict(seed=1)), stage(node, mixed_state_dict(seed=2))
    client = WriterClient.connect_or_start(node=node)
    try:
        box: queue.Queue[object] = queue.Queue()
        client.submit(first.job(1, f"faulty://{tmp_path}/checkpoint-1", options=options), box.put)
        client.submit(second.job(2, f"faulty://{tmp_path}/checkpoint-2", options=options), box.put)
        with pytest.raises(queue.Empty):
            box.get(timeout=1.0)  # the second job's shards are durable, but it may not commit
        assert not (tmp_path / "checkpoint-2" / MANIFEST_NAME).exists()
        gate.unlink()
        outcomes = [box.get(timeout=60), box.get(timeout=60)]
        assert [o.job_id for o in outcomes] == [1, 2]  # type: ignore[attr-defined]
        stamps = [
            Manifest.from_json(
                (tmp_path / f"checkpoint-{i}" / MANIFEST_NAME).read_bytes(), where="t"
            ).timestamp
            for i in (1, 2)
        ]
        assert stamps[0] < stamps[1]
    finally:
        client.close()
        first.segment.unlink()
        second.segment.unlink()


_CHILD = """
import json, os, sys, time, uuid
import torch
from ckptsvc.format.layout import TensorSpec, plan_files
from ckptsvc.stage.arena import plan_arena
from ckptsvc.workers.shm import ShmSegment, segment_prefix
from ckptsvc.workers.client import WriterClient
from ckptsvc.workers.protocol import FileJob, SaveJob, WriterOptions
node, url, gate = sys.argv[1:4]
specs = [TensorSpec("w", "F32", (4096,))]
plans = plan_files(specs, max_shard_size=1 << 20)
arena = plan_arena(plans)
seg = ShmSegment.create(f"{segment_prefix(node)}{os.getpid()}-0", arena.nbytes)
client = WriterClient.connect_or_start(node=node)
job = SaveJob(1, url, {"gate_path": gate}, seg.name,
              tuple(FileJob(p.file_name, p.layout, o) for p, o in zip(plans, arena.file_offsets)), (), None,
              options=WriterOptions.resolve())
client.submit(job, print)
print(json.dumps({"segment": seg.name, "writer": client.writer_pid}), flush=True)
time.sleep(600)
"""


def test_dead_trainer_job_is_cancelled_and_its_arena_reclaimed(
    node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPTSVC_WRITER_LINGER_S", "60")  # only the EOF path may reclaim in time
    gate = tmp_path / "gate"
    gate.touch()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
    }
    url = f"faulty://{tmp_path}/ckpt"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, node, url, str(gate)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        info = json.loads(child.stdout.readline())  # type: ignore[union-attr]
        segment = Path("/dev/shm") / info["segment"]
        assert segment.exists()
        wait_until(lambda: (tmp_path / "ckpt").is_dir(), "the writer to begin the save")
        child.kill()
        child.wait()
        gate.unlink()  # let the blocked write return so the writer sees the cancellation
        wait_until(
            lambda: not segment.exists(), "the writer to reclaim the dead trainer's arena", 20
        )
        assert not (tmp_path / "ckpt" / MANIFEST_NAME).exists()
        assert not list((tmp_path / "ckpt").glob("*.safetensors"))
        assert pid_alive(info["writer"])  # the writer itself lives on for other trainers
        os.kill(info["writer"], signal.SIGTERM)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if gate.exists():
            gate.unlink()


# ---- the wire format -------------------------------------------------------------------------


def test_frames_roundtrip_and_foreign_classes_are_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        job = stage_free_job()
        send_message(a, job)
        assert recv_message(b) == job
        send_message(a, Evil())
        with pytest.raises(ProtocolError, match="refusing"):
            recv_message(b)
        a.sendall(b"\xff" * 8)  # an absurd length
        with pytest.raises(ProtocolError, match="exceeds"):
            recv_message(b)
    with pytest.raises(InvalidStateError, match="opts"):
        check_wire_safe({"x": Evil()}, what="opts")
    check_wire_safe({"key": "k", "client_kwargs": {"endpoint_url": "http://x"}}, what="opts")


class Evil:
    def __reduce__(self) -> tuple[object, ...]:
        return (print, ("pwned",))


def stage_free_job() -> SaveJob:
    (plan,) = plan_files([TensorSpec("w", "BF16", (3, 2))], max_shard_size=1 << 20)
    return SaveJob(
        7,
        "s3://b/c",
        {"key": "k"},
        "seg",
        (FileJob(plan.file_name, plan.layout, 0),),
        (),
        None,
        options=WriterOptions(),
    )


def test_errors_cross_the_wire_as_ckptsvc_errors() -> None:
    from ckptsvc.errors import SaveFailedError, StorageNotFoundError
    from ckptsvc.workers.protocol import ErrorInfo

    err = ErrorInfo.from_exception(StorageNotFoundError("gone", url="s3://b/k")).to_exception()
    assert isinstance(err, StorageNotFoundError) and err.url == "s3://b/k" and str(err) == "gone"
    other = ErrorInfo.from_exception(KeyError("x")).to_exception()
    assert isinstance(other, SaveFailedError) and "KeyError" in str(other)


def test_writer_log_keeps_one_previous_file_once_it_grows(tmp_path: Path) -> None:
    from ckptsvc.workers import launch

    log = tmp_path / "writer.sock.log"
    log.write_bytes(b"small")
    launch._rotate_log(str(log))
    assert log.read_bytes() == b"small" and not (tmp_path / "writer.sock.log.1").exists()
    log.write_bytes(b"x" * (launch._LOG_ROTATE_BYTES + 1))
    launch._rotate_log(str(log))
    assert not log.exists()
    assert (tmp_path / "writer.sock.log.1").stat().st_size == launch._LOG_ROTATE_BYTES + 1


def test_commit_reported_when_durable_then_writer_killed_before_marker_delete(
    node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A distributed commit job (``report_when_durable``) reports ``JobDone`` once its
    manifest is published, before the marker's delete; a writer killed (SIGKILL) right
    there leaves a complete checkpoint: discovery returns it, it verifies, ``gc`` keeps it
    and removes the leftover marker, and a later save to it is refused as committed."""
    from ckptsvc.errors import CommitConflictError
    from ckptsvc.ops.gc import collect_garbage
    from ckptsvc.read.discovery import CheckpointStatus, checkpoint_info
    from ckptsvc.read.latest import find_latest_checkpoint
    from ckptsvc.read.verify import verify_checkpoint
    from ckptsvc.storage import Location
    from ckptsvc.testing.faultinject import PLAN_ENV, PRELOAD_MODULE
    from ckptsvc.workers.claim import claim_checkpoint

    ctl = tmp_path / "ctl"
    ctl.mkdir()
    plan = {
        "hook_in": "writer",
        "api": "async",
        "phase": "commit",
        "event": "before_remove",
        "name": MARKER_NAME,
        "step": 1,
        "ctl": str(ctl),
    }
    monkeypatch.setenv(PLAN_ENV, json.dumps(plan))
    monkeypatch.setenv("CKPTSVC_WRITER_PRELOAD", f"faulty_fs,{PRELOAD_MODULE}")
    root = tmp_path / "run"
    ckpt = root / "checkpoints" / "checkpoint-1"
    loc = Location.parse(str(ckpt))
    claim = claim_checkpoint(loc)
    staged = stage(node, mixed_state_dict())
    client = WriterClient.connect_or_start(node=node)
    try:
        data = run_job(client, staged.job(1, str(ckpt), commit=False))
        assert isinstance(data, JobDone) and not data.committed, data
        info = CommitInfo(
            step=1,
            world_size=2,
            components=(ComponentRecord("state", "global", (0,)),),
            pytorch_version=str(torch.__version__),
            library_version="test",
            extra_files=data.files,
            claim_id=claim.claim_id,
            report_when_durable=True,
        )
        job = SaveJob(
            job_id=2,
            ckpt_url=str(ckpt),
            storage_options={},
            arena_name="",
            files=(),
            small_files=(),
            commit=info,
            options=WriterOptions.resolve(),
        )
        done = run_job(client, job)
        assert isinstance(done, JobDone) and done.committed, done
        wait_until(lambda: (ctl / "paused.json").exists(), "the writer paused at the marker")
        paused = json.loads((ctl / "paused.json").read_text())
        assert paused["pid"] == client.writer_pid and MARKER_NAME in paused["why"]
        # reported committed while the marker is still there: the manifest is the record
        assert (ckpt / MANIFEST_NAME).is_file() and (ckpt / MARKER_NAME).is_file()
        os.kill(client.writer_pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(paused["pid"]), "the writer's death")
    finally:
        client.close()
        staged.segment.unlink()
    claim.release()
    assert (ckpt / MARKER_NAME).is_file()  # the kill left it
    assert checkpoint_info(loc).status is CheckpointStatus.COMPLETE
    assert find_latest_checkpoint(str(root)) == str(ckpt)
    report = verify_checkpoint(str(ckpt))
    assert report.ok, report
    gc = collect_garbage(str(root))
    assert str(ckpt) not in [u.rstrip("/") for u in gc.removed]
    assert (ckpt / MANIFEST_NAME).is_file() and not (ckpt / MARKER_NAME).exists()
    assert find_latest_checkpoint(str(root)) == str(ckpt)
    with pytest.raises(CommitConflictError, match="already committed"):
        claim_checkpoint(loc)
