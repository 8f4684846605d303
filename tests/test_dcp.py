"""``ckptsvc.dcp``: real ``torch.distributed.checkpoint`` saves and loads through ckptsvc.

Single-process tests call ``dcp.save`` / ``dcp.async_save`` / ``dcp.load`` here (DCP
runs without a process group); the multi-rank tests start gloo ranks with
``tests/dist_workers/dcp_worker.py`` (DTensors on a CPU mesh) and reshard on load.
"""

from __future__ import annotations

import io
import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import StorageRoot
from dist_workers.launch import DCP_WORKER, RankRun, describe, launch
from helpers_models import assert_bitwise_equal
from torch.distributed.checkpoint.api import CheckpointException

import ckptsvc.dcp
from ckptsvc.cli import main as cli_main
from ckptsvc.errors import (
    CheckpointError,
    CommitConflictError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME
from ckptsvc.ops.retention import maybe_delete_oldest_checkpoint
from ckptsvc.read.discovery import (
    CheckpointStatus,
    checkpoint_info,
    list_checkpoints,
    next_checkpoint_path,
)
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.workers import shard_writer
from ckptsvc.workers.latest_pointer import POINTER_NAME

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP: "assuming no_dist"


@pytest.fixture(autouse=True)
def _own_node(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CKPTSVC_NODE_ID", f"dcp{uuid.uuid4().hex[:10]}")
    yield


def make_state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(6, 10, generator=g)
    return {
        "model": {
            "w": torch.randn(33, 17, generator=g),
            "b": torch.randn(17, generator=g).to(torch.bfloat16),
            "t": wide.t(),  # a non-contiguous view: its projection is saved
            "s": torch.tensor(2.5),
            "i": torch.arange(9, dtype=torch.int64),
            "empty": torch.empty(0, 4),
        },
        "trainer": {"step": 7, "name": "run", "losses": [1.5, 2.5]},
    }


def zeros_like_state(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
        "trainer": {"step": 0, "name": "", "losses": []},
    }


def assert_same_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    for k, v in want["model"].items():
        assert_bitwise_equal(got["model"][k], v.contiguous(), name=k)
    assert got["trainer"] == want["trainer"]


def save(url: str, state: dict[str, Any], **kwargs: Any) -> None:
    storage_options = kwargs.pop("storage_options", None)
    dcp.save(
        state,
        storage_writer=ckptsvc.dcp.StorageWriter(url, storage_options=storage_options, **kwargs),
    )


def load(url: str, state: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    dcp.load(state, storage_reader=ckptsvc.dcp.StorageReader(url, storage_options=storage_options))


def failures(e: CheckpointException) -> list[BaseException]:
    return [exc for exc, _ in e.failures.values()]


# ---- one process -------------------------------------------------------------------------------


def test_roundtrip_is_a_ckptsvc_checkpoint(storage_root_fast: StorageRoot) -> None:
    opts = storage_root_fast.storage_options
    root = storage_root_fast.url
    state = make_state()
    url = next_checkpoint_path(root, 3)
    save(url, state, storage_options=opts)
    got = zeros_like_state(state)
    load(url, got, opts)
    assert_same_state(got, state)

    assert find_latest_checkpoint(root, storage_options=opts) == url
    info = checkpoint_info(url, storage_options=opts)
    assert info.status is CheckpointStatus.COMPLETE and info.manifest is not None
    manifest = info.manifest
    assert manifest.step == 3 and manifest.world_size == 1
    names = {f.path for f in manifest.files}
    assert names == {".metadata", "__0_0.distcp"}
    (component,) = manifest.components
    assert component.key == "dcp" and sorted(component.metadata["files"]) == sorted(names)
    report = verify_checkpoint(url, deep=True, storage_options=opts)
    assert report.ok, report.problems
    assert not storage_root_fast.location("checkpoints", "checkpoint-3", MARKER_NAME).exists()


def test_async_save_roundtrip(tmp_path: Path) -> None:
    state = make_state(1)
    url = next_checkpoint_path(str(tmp_path), 1)
    future = dcp.async_save(state, storage_writer=ckptsvc.dcp.StorageWriter(url))
    future.result(timeout=120)
    got = zeros_like_state(state)
    load(url, got)
    assert_same_state(got, state)
    assert verify_checkpoint(url, deep=True).ok


def test_async_save_stages_like_filesystemwriter(tmp_path: Path) -> None:
    """The writer is its own DCP stager (a ``BlockingAsyncStager``, as ``FileSystemWriter``
    is), so ``async_save`` stages the same way for both: a CPU copy taken before
    ``async_save`` returns, which later changes to the state do not reach."""
    from torch.distributed.checkpoint.staging import AsyncStager, BlockingAsyncStager

    url = next_checkpoint_path(str(tmp_path), 1)
    writer = ckptsvc.dcp.StorageWriter(url)
    assert isinstance(writer, BlockingAsyncStager)
    assert isinstance(dcp.FileSystemWriter(str(tmp_path / "fs")), AsyncStager)
    state = make_state(3)
    want = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    future = dcp.async_save(state, storage_writer=writer)
    for v in state.values():
        if torch.is_tensor(v):
            v.add_(1)  # after async_save returned: not in the checkpoint
    future.result(timeout=120)
    got = zeros_like_state(want)
    load(url, got)
    assert_same_state(got, want)


def test_threads_write_several_files_per_rank(tmp_path: Path) -> None:
    state = make_state(2)
    url = next_checkpoint_path(str(tmp_path), 1)
    save(url, state, thread_count=3)
    files = sorted(p.name for p in Path(url).iterdir())
    assert [f for f in files if f.endswith(".distcp")] == [f"__0_{i}.distcp" for i in range(3)]
    got = zeros_like_state(state)
    load(url, got)
    assert_same_state(got, state)


def test_committed_directory_is_never_rewritten(tmp_path: Path) -> None:
    url = next_checkpoint_path(str(tmp_path), 5)
    first, second = make_state(1), make_state(2)
    save(url, first)
    before = Path(url, MANIFEST_NAME).read_bytes()
    with pytest.raises(CommitConflictError, match="already committed"):
        save(url, second)
    # a writer made before the commit landed: the claim on rank 0 refuses it
    early = ckptsvc.dcp.StorageWriter(next_checkpoint_path(str(tmp_path), 6))
    save(next_checkpoint_path(str(tmp_path), 6), first)
    with pytest.raises(CheckpointException) as caught:
        dcp.save(second, storage_writer=early)
    assert any(isinstance(e, CommitConflictError) for e in failures(caught.value))
    assert Path(url, MANIFEST_NAME).read_bytes() == before
    got = zeros_like_state(first)
    load(url, got)
    assert_same_state(got, first)

    save(url, second, overwrite=True)  # the replacement commits, then is swapped in
    got = zeros_like_state(second)
    load(url, got)
    assert_same_state(got, second)
    assert sorted(p.name for p in tmp_path.joinpath("checkpoints").iterdir()) == [
        "checkpoint-5",
        "checkpoint-6",
        POINTER_NAME,
    ]
    assert verify_checkpoint(url, deep=True).ok


def test_verify_and_load_catch_damage(tmp_path: Path) -> None:
    state = make_state(3)
    url = next_checkpoint_path(str(tmp_path), 1)
    save(url, state)
    data = Path(url, "__0_0.distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    report = verify_checkpoint(url, deep=True)
    assert not report.ok
    assert [(p.path, p.kind) for p in report.problems] == [("__0_0.distcp", "checksum")]
    assert find_latest_checkpoint(str(tmp_path), verify="deep") is None

    data.write_bytes(bytes(raw[:-5]))  # truncated: its files no longer match the manifest
    with pytest.raises(CorruptCheckpointError, match="do not match its manifest"):
        load(url, zeros_like_state(state))

    data.write_bytes(bytes(raw))
    meta = Path(url, ".metadata")
    meta.write_bytes(b"\x80" + b"j" * (meta.stat().st_size - 1))  # same size, other bytes
    with pytest.raises(CheckpointException, match="manifest says"):
        load(url, zeros_like_state(state))


def test_failed_write_leaves_no_commit_and_the_retry_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path)
    good = next_checkpoint_path(root, 1)
    save(good, make_state(1))
    url = next_checkpoint_path(root, 2)
    real_write = shard_writer.ChecksummedWriter.write

    def failing_write(self: shard_writer.ChecksummedWriter, data: Any) -> int:
        if self.nbytes > 0:
            raise OSError(28, "No space left on device (injected)")
        return real_write(self, data)

    monkeypatch.setattr(shard_writer.ChecksummedWriter, "write", failing_write)
    with pytest.raises(CheckpointException) as caught:
        save(url, make_state(2))
    assert any(isinstance(e, OSError) for e in failures(caught.value))
    assert checkpoint_info(url).status is CheckpointStatus.INCOMPLETE
    assert find_latest_checkpoint(root) == good
    with pytest.raises(IncompleteCheckpointError):
        ckptsvc.dcp.StorageReader(url)

    monkeypatch.setattr(shard_writer.ChecksummedWriter, "write", real_write)
    state = make_state(2)
    save(url, state)  # this process's failed claim is given back and taken again
    got = zeros_like_state(state)
    load(url, got)
    assert_same_state(got, state)
    assert find_latest_checkpoint(root) == url


def test_ls_and_retention_see_dcp_checkpoints(tmp_path: Path) -> None:
    root = str(tmp_path)
    for step in (1, 2, 3):
        save(next_checkpoint_path(root, step), make_state(step))
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["ls", root]) == 0
    assert out.getvalue().count("complete") == 3, out.getvalue()
    maybe_delete_oldest_checkpoint(root, 1)
    assert [i.step for i in list_checkpoints(root)] == [3]


def test_not_a_ckptsvc_checkpoint(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(make_state(), checkpoint_id=str(tmp_path / "plain"))  # DCP's own writer
    with pytest.raises(CheckpointError, match="no checkpoint manifest"):
        ckptsvc.dcp.StorageReader(str(tmp_path / "plain"))


@pytest.mark.cloud
def test_s3_overwrite_and_async(s3_root: StorageRoot) -> None:
    opts = s3_root.storage_options
    url = next_checkpoint_path(s3_root.url, 4)
    first, second = make_state(4), make_state(5)
    dcp.async_save(
        first, storage_writer=ckptsvc.dcp.StorageWriter(url, storage_options=opts)
    ).result(timeout=120)
    with pytest.raises(CommitConflictError):
        save(url, second, storage_options=opts)
    save(url, second, storage_options=opts, overwrite=True)
    got = zeros_like_state(second)
    load(url, got, opts)
    assert_same_state(got, second)
    assert verify_checkpoint(url, deep=True, storage_options=opts).ok
    assert [i.checkpoint_id for i in list_checkpoints(s3_root.url, storage_options=opts)] == ["4"]


# ---- several ranks (gloo) -----------------------------------------------------------------------


def _ok(runs: list[RankRun]) -> list[dict[str, Any]]:
    assert all(r.returncode == 0 and r.result is not None for r in runs), describe(runs)
    return [r.result for r in runs if r.result is not None]


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_four_ranks_save_and_reshard_to_two_and_one(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    url = next_checkpoint_path(root, 1)
    prefix = f"dcp{uuid.uuid4().hex[:8]}"
    saved = _ok(launch("save", {"path": url}, world=4, node_prefix=prefix, worker=DCP_WORKER))
    assert all(r["error"] is None for r in saved), saved
    assert find_latest_checkpoint(root) == url
    report = verify_checkpoint(url, deep=True)
    assert report.ok, report.problems
    info = checkpoint_info(url)
    assert info.manifest is not None and info.manifest.world_size == 4
    written = {f.path for f in info.manifest.files}
    assert written == {".metadata"} | {f"__{r}_0.distcp" for r in range(4)}

    two = _ok(launch("load", {"path": url}, world=2, node_prefix=prefix, worker=DCP_WORKER))
    assert [r["mismatch"] for r in two] == [[], []]
    one = _ok(
        launch("load", {"path": url, "plain": True}, world=1, node_prefix=prefix, worker=DCP_WORKER)
    )
    assert one[0]["mismatch"] == []


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_rank_leaves_no_commit_and_next_job_saves(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    url = next_checkpoint_path(root, 2)
    prefix = f"dcp{uuid.uuid4().hex[:8]}"
    runs = launch(
        "save",
        {"path": url, "kill_rank": 1, "async": True, "pg_timeout_s": 30},
        world=2,
        node_prefix=prefix,
        worker=DCP_WORKER,
        timeout_s=120,
    )
    assert runs[1].returncode == -9, describe(runs)
    assert runs[0].result is not None and runs[0].result["error"], describe(runs)
    assert not os.path.exists(os.path.join(url, MANIFEST_NAME))
    assert checkpoint_info(url).status is CheckpointStatus.INCOMPLETE
    assert find_latest_checkpoint(root) is None

    # the next job (the claimer is dead) takes the directory over and commits
    saved = _ok(launch("save", {"path": url}, world=2, node_prefix=prefix, worker=DCP_WORKER))
    assert all(r["error"] is None for r in saved), saved
    assert find_latest_checkpoint(root) == url
    assert verify_checkpoint(url, deep=True).ok
    before = Path(url, MANIFEST_NAME).read_bytes()

    # every rank writes the successor beside it; rank 0 swaps it in after the commit
    args = {"path": url, "overwrite": True, "async": True}
    saved = _ok(launch("save", args, world=2, node_prefix=prefix, worker=DCP_WORKER))
    assert all(r["error"] is None for r in saved), saved
    assert Path(url, MANIFEST_NAME).read_bytes() != before
    assert sorted(os.listdir(Path(root, "checkpoints"))) == ["checkpoint-2", POINTER_NAME]
    assert verify_checkpoint(url, deep=True).ok
    loaded = _ok(launch("load", {"path": url}, world=2, node_prefix=prefix, worker=DCP_WORKER))
    assert [r["mismatch"] for r in loaded] == [[], []]


def test_cached_plans_write_each_save_into_its_own_directory(tmp_path: Path) -> None:
    """DCP's plan caching (torchtitan turns it on) replays the first save's final plans:
    nothing the writer needs may travel in them."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    root = str(tmp_path)
    planner = DefaultSavePlanner(enable_plan_caching=True)
    states = {step: make_state(step) for step in (1, 2, 3)}
    for step, state in states.items():
        dcp.save(
            state,
            storage_writer=ckptsvc.dcp.StorageWriter(next_checkpoint_path(root, step)),
            planner=planner,
        )
    for step, state in states.items():
        got = zeros_like_state(state)
        load(next_checkpoint_path(root, step), got)
        assert_same_state(got, state)
        assert verify_checkpoint(next_checkpoint_path(root, step), deep=True).ok
