"""Tiered checkpoints: committed on local disk first, replicated to S3 / GCS afterwards;
resume prefers an intact local copy; local copies are pruned only once committed remotely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StorageRoot, unfinished_save

import ckptsvc.ops.tiering as tiering
from ckptsvc.errors import CorruptCheckpointError, IncompleteCheckpointError
from ckptsvc.ops.retention import delete_checkpoint
from ckptsvc.ops.tiering import TieredStore
from ckptsvc.read.discovery import read_manifest
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.sharded_checkpoint import load_checkpoint, save_checkpoint
from ckptsvc.storage import Location
from ckptsvc.workers.latest_pointer import POINTER_NAME

MiB = 2**20
REMOTES = pytest.mark.parametrize("storage_root", ["s3", "gcs"], indirect=True)


@pytest.fixture(autouse=True)
def _small_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies stream in several chunks and, on S3, several parts."""
    monkeypatch.setenv("CKPTSVC_WRITE_CHUNK_BYTES", str(MiB))
    monkeypatch.setenv("CKPTSVC_PART_SIZE_BYTES", str(5 * MiB))


def _state(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"big": torch.randn(3 * MiB // 2, generator=g), "step": torch.full((4,), float(i))}


def _store(tmp_path: Path, root: StorageRoot, **kw: Any) -> TieredStore:
    return TieredStore(
        str(tmp_path / "local"), root.join("run"), storage_options=root.storage_options, **kw
    )


def _corrupt_shard(ckpt: str) -> None:
    """Flip one byte in the middle of the checkpoint's shard (same size, wrong CRC)."""
    shard = next(Path(ckpt).glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def _equal(got: dict[str, torch.Tensor] | None, want: dict[str, torch.Tensor]) -> bool:
    return (
        got is not None
        and set(got) == set(want)
        and all(torch.equal(got[k], want[k]) for k in want)
    )


@REMOTES
def test_save_lands_locally_then_replicates(tmp_path: Path, storage_root: StorageRoot) -> None:
    with _store(tmp_path, storage_root) as store:
        sd = _state(1)
        result = store.save(1, sd, safetensors=True).result(timeout=120)
        assert verify_checkpoint(store.local_path(1)).ok  # complete locally regardless
        assert result.remote_url == store.remote_path(1)
        assert result.nbytes > 6 * MiB and result.files == 2
        opts = storage_root.storage_options
        report = verify_checkpoint(store.remote_path(1), deep=True, storage_options=opts)
        assert report.ok, report.problems
        remote = read_manifest(Location.parse(store.remote_path(1), opts))
        local = read_manifest(Location.parse(store.local_path(1)))
        assert remote is not None and local is not None
        assert remote.checkpoint_path == store.remote_path(1)
        assert sorted(remote.files, key=lambda f: f.path) == sorted(
            local.files, key=lambda f: f.path
        )
        assert _equal(load_checkpoint(store.remote_path(1), storage_options=opts), sd)
        assert find_latest_checkpoint(
            storage_root.join("run"), storage_options=opts
        ) == store.remote_path(1)


@REMOTES
def test_resume_prefers_intact_local_copy_then_remote(
    tmp_path: Path, storage_root: StorageRoot
) -> None:
    opts = storage_root.storage_options
    with _store(tmp_path, storage_root) as store:
        for i in (1, 2):
            store.save(i, _state(i), safetensors=True).result(timeout=120)
        assert store.find_latest() == store.local_path(2)
        _corrupt_shard(store.local_path(2))
        assert store.find_latest() == store.remote_path(2)  # the local copy fails its CRC
        assert _equal(load_checkpoint(store.find_latest(), storage_options=opts), _state(2))  # type: ignore[arg-type]
        delete_checkpoint(store.remote_path(2), storage_options=opts)
        assert store.find_latest() == store.local_path(1)  # neither copy of 2 is usable


@REMOTES
def test_newest_checkpoint_not_yet_replicated_resumes_locally(
    tmp_path: Path, storage_root: StorageRoot
) -> None:
    with _store(tmp_path, storage_root) as store:
        store.save(1, _state(1), safetensors=True).result(timeout=120)
        save_checkpoint(store.local_path(2), _state(2), safetensors=True)  # no replicate yet
        assert store.find_latest() == store.local_path(2)
        [future] = store.replicate_pending()  # e.g. after a restart
        assert future.result(timeout=120).checkpoint_id == "2"
        assert store.replicate_pending() == []


@REMOTES
def test_local_copies_pruned_only_after_remote_commit(
    tmp_path: Path, storage_root: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = tiering.copy_records

    def copy_fails_for_2(src: Location, dst: Location, *args: Any, **kwargs: Any) -> None:
        if "checkpoint-2" in src.url:
            raise OSError("remote went away")
        real_copy(src, dst, *args, **kwargs)

    with _store(tmp_path, storage_root, keep_local=1) as store:
        store.save(1, _state(1), safetensors=True).result(timeout=120)
        monkeypatch.setattr(tiering, "copy_records", copy_fails_for_2)
        with pytest.raises(OSError, match="remote went away"):
            store.save(2, _state(2), safetensors=True).result(timeout=120)
        store.save(3, _state(3), safetensors=True).result(timeout=120)
        local = sorted(p.name for p in (tmp_path / "local" / "checkpoints").iterdir())
        assert local == [
            "checkpoint-2",
            "checkpoint-3",
            POINTER_NAME,
        ]  # 1 pruned, 2 kept: not remote yet
        monkeypatch.setattr(tiering, "copy_records", real_copy)
        store.replicate(2).result(timeout=120)
        local = sorted(p.name for p in (tmp_path / "local" / "checkpoints").iterdir())
        assert local == ["checkpoint-3", POINTER_NAME]
        assert store.find_latest() == store.local_path(3)


@REMOTES
def test_rotted_local_copy_is_never_replicated(tmp_path: Path, storage_root: StorageRoot) -> None:
    opts = storage_root.storage_options
    with _store(tmp_path, storage_root) as store:
        save_checkpoint(store.local_path(1), _state(1), safetensors=True)
        _corrupt_shard(store.local_path(1))
        with pytest.raises(CorruptCheckpointError, match="the source checkpoint is damaged"):
            store.replicate(1).result(timeout=120)
        assert find_latest_checkpoint(storage_root.join("run"), storage_options=opts) is None
        if storage_root.server is not None and storage_root.server.kind == "s3":
            client = storage_root.server.boto3_client()
            assert (
                client.list_multipart_uploads(Bucket=storage_root.bucket).get("Uploads", []) == []
            )
        assert store.find_latest() is None  # the local copy fails its CRC, no remote one


def test_replicate_needs_a_committed_checkpoint(tmp_path: Path) -> None:
    with TieredStore(str(tmp_path / "local"), str(tmp_path / "remote")) as store:
        unfinished_save(Location.parse(store.local_path(7)))
        with pytest.raises(IncompleteCheckpointError, match="only committed checkpoints"):
            store.replicate(7).result(timeout=60)
        with pytest.raises(ValueError, match="checkpoint-<id>"):
            store.on_local_commit(str(tmp_path / "elsewhere" / "checkpoint-1"))
        with pytest.raises(ValueError, match="keep_local"):
            TieredStore(str(tmp_path), str(tmp_path / "r"), keep_local=0)


def test_on_local_commit_replicates_local_to_local(tmp_path: Path) -> None:
    """Any two roots work (here two local directories), e.g. node-local NVMe to NFS."""
    with TieredStore(str(tmp_path / "fast"), str(tmp_path / "slow")) as store:
        save_checkpoint(store.local_path(5), _state(5), safetensors=True)
        result = store.on_local_commit(store.local_path(5)).result(timeout=60)
        assert result.checkpoint_id == "5"
        assert verify_checkpoint(store.remote_path(5)).ok
