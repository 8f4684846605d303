"""``ckptsvc.ops.transfer`` and ``ckptsvc cp`` / ``ckptsvc prune``: verified copies between
backends with the commit protocol on the destination, and pruning.

Source checkpoints are written with the synchronous ``save_checkpoint`` (several small
shards each); copies go to and from every backend (local, memory, S3, GCS, SeaweedFS).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StorageRoot, unfinished_save

from ckptsvc.cli import main as cli_main
from ckptsvc.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CommitConflictError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.ops.prune import prune
from ckptsvc.ops.transfer import copy, copy_checkpoint, copy_files, copy_tree
from ckptsvc.read.discovery import (
    CheckpointStatus,
    checkpoint_info,
    list_checkpoints,
    read_manifest,
)
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.sharded_checkpoint import load_checkpoint, save_checkpoint
from ckptsvc.storage import Location

SHARD_NBYTES = 64 * 1024


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 96, generator=g),
        "layer.0.weight": torch.randn(96, 96, generator=g),
        "layer.0.bias": torch.randn(96, generator=g),
        "layer.1.weight": torch.randn(96, 96, generator=g).to(torch.bfloat16),
        "head.weight": torch.randn(10, 96, generator=g),
        "steps": torch.arange(7, dtype=torch.int64),
    }


def _save(url: str, seed: int, opts: dict | None = None, step: int | None = None) -> dict:
    state = _state(seed)
    save_checkpoint(
        url, state, safetensors=True, max_shard_size=SHARD_NBYTES, storage_options=opts, step=step
    )
    return state


def _assert_same(got: Any, want: dict) -> None:
    assert isinstance(got, dict)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def _run_root(tmp_path: Path, steps: Sequence[int]) -> tuple[str, dict[int, dict]]:
    root = str(tmp_path / "run")
    states = {s: _save(f"{root}/checkpoints/checkpoint-{s}", s, step=s) for s in steps}
    return root, states


# ---- one checkpoint, every backend -------------------------------------------------------------


def test_copy_local_to_backend_and_back(tmp_path: Path, storage_root: StorageRoot) -> None:
    src = str(tmp_path / "src" / "checkpoint-5")
    state = _save(src, seed=5, step=5)
    opts = storage_root.storage_options
    remote = storage_root.join("run", "checkpoints", "checkpoint-5")
    seen: list[tuple[int, int]] = []

    report = copy_checkpoint(
        src, remote, dst_storage_options=opts, jobs=3, progress=lambda d, t: seen.append((d, t))
    )

    [done] = report.checkpoints
    assert done.status == "copied" and done.files >= 3  # two shards + index
    original = read_manifest(Location.parse(src))
    assert original is not None
    total = original.total_nbytes
    assert done.nbytes == total == report.nbytes_copied
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # monotone
    assert verify_checkpoint(remote, deep=True, storage_options=opts).ok
    copied = read_manifest(Location.parse(remote, opts))
    assert copied is not None
    assert copied.timestamp == original.timestamp and copied.step == 5
    assert copied.files == original.files
    assert copied.checkpoint_path == Location.parse(remote, opts).url
    _assert_same(load_checkpoint(remote, storage_options=opts), state)

    back = str(tmp_path / "back" / "checkpoint-5")
    copy_checkpoint(remote, back, storage_options=opts, dst_storage_options={})
    assert verify_checkpoint(back, deep=True).ok
    _assert_same(load_checkpoint(back), state)


def test_copy_between_object_stores(tmp_path: Path, s3_root: StorageRoot) -> None:
    """S3 -> memory:// with separate storage options for each side."""
    src = s3_root.join("checkpoint-1")
    state = _save(src, seed=1, opts=s3_root.storage_options, step=1)
    dst = "memory://ckptsvc-test-transfer/s3copy/checkpoint-1"
    copy(src, dst, storage_options=s3_root.storage_options, dst_storage_options={})
    assert verify_checkpoint(dst, deep=True).ok
    _assert_same(load_checkpoint(dst), state)
    Location.parse("memory://ckptsvc-test-transfer").remove(recursive=True)


# ---- verification and the commit protocol ------------------------------------------------------


def _corrupt_one_shard(ckpt: str) -> str:
    """Flip one byte in the middle of the largest shard (same size); return its name."""
    manifest = read_manifest(Location.parse(ckpt))
    assert manifest is not None
    victim = max(
        (f for f in manifest.files if f.path.endswith(".safetensors")), key=lambda f: f.nbytes
    )
    path = os.path.join(ckpt, victim.path)
    with open(path, "r+b") as f:
        f.seek(victim.nbytes // 2)
        byte = f.read(1)
        f.seek(victim.nbytes // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    return victim.path


def test_corrupt_source_fails_and_leaves_no_commit_on_s3(
    tmp_path: Path, s3_root: StorageRoot
) -> None:
    src = str(tmp_path / "checkpoint-3")
    _save(src, seed=3, step=3)
    bad = _corrupt_one_shard(src)
    dst = s3_root.join("checkpoint-3")
    opts = s3_root.storage_options

    with pytest.raises(CorruptCheckpointError, match=bad) as err:
        copy_checkpoint(src, dst, dst_storage_options=opts, jobs=1)
    assert "CRC-32C" in str(err.value)

    info = checkpoint_info(dst, storage_options=opts)
    assert info.status is CheckpointStatus.INCOMPLETE  # marker, no manifest
    assert not Location.parse(dst, opts).join(MANIFEST_NAME).exists()
    assert not Location.parse(dst, opts).join(bad).exists()  # the bad file never completed
    assert find_latest_checkpoint(s3_root.url, storage_options=opts) is None
    client = s3_root.server.boto3_client()  # type: ignore[union-attr]
    assert client.list_multipart_uploads(Bucket=s3_root.bucket).get("Uploads", []) == []


def test_truncated_source_is_refused(tmp_path: Path) -> None:
    src = str(tmp_path / "checkpoint-1")
    _save(src, seed=1)
    manifest = read_manifest(Location.parse(src))
    assert manifest is not None
    rec = max(manifest.files, key=lambda f: f.nbytes)
    os.truncate(os.path.join(src, rec.path), rec.nbytes - 10)
    dst = str(tmp_path / "dst")
    with pytest.raises(CorruptCheckpointError, match="manifest says"):
        copy_checkpoint(src, dst)
    assert checkpoint_info(dst).status is CheckpointStatus.INCOMPLETE


def test_interrupted_copy_is_invisible_then_resumes(tmp_path: Path) -> None:
    src = str(tmp_path / "checkpoint-9")
    state = _save(src, seed=9, step=9)
    dst = str(tmp_path / "copy" / "checkpoint-9")

    class Interrupt(Exception):
        pass

    def stop_halfway(done: int, total: int) -> None:
        if done > total // 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        copy_checkpoint(src, dst, jobs=1, progress=stop_halfway)
    assert checkpoint_info(dst).status is CheckpointStatus.INCOMPLETE
    assert not (Path(dst) / MANIFEST_NAME).exists()

    report = copy_checkpoint(src, dst)
    assert report.checkpoints[0].status == "copied"
    assert verify_checkpoint(dst, deep=True).ok
    _assert_same(load_checkpoint(dst), state)


def test_up_to_date_conflict_and_overwrite(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _save(a, seed=1, step=1)
    state_b = _save(b, seed=2, step=2)
    dst = str(tmp_path / "dst")

    assert copy_checkpoint(a, dst).checkpoints[0].status == "copied"
    again = copy_checkpoint(a, dst)
    assert again.checkpoints[0].status == "up-to-date" and again.nbytes_copied == 0

    with pytest.raises(CommitConflictError, match="overwrite"):
        copy_checkpoint(b, dst)
    assert read_manifest(Location.parse(dst)).step == 1  # type: ignore[union-attr]

    copy_checkpoint(b, dst, overwrite=True)
    assert read_manifest(Location.parse(dst)).step == 2  # type: ignore[union-attr]
    _assert_same(load_checkpoint(dst), state_b)


def test_refuses_incomplete_legacy_missing_and_self(tmp_path: Path) -> None:
    incomplete = Location.parse(str(tmp_path / "incomplete"))
    unfinished_save(incomplete)
    with pytest.raises(IncompleteCheckpointError):
        copy_checkpoint(incomplete.url, str(tmp_path / "x"))

    legacy = tmp_path / "legacy"
    _save(str(legacy), seed=1)
    (legacy / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="no checkpoint manifest"):
        copy_checkpoint(str(legacy), str(tmp_path / "y"))

    with pytest.raises(CheckpointNotFoundError):
        copy(str(tmp_path / "nothing"), str(tmp_path / "z"))

    good = str(tmp_path / "good")
    _save(good, seed=1)
    with pytest.raises(CheckpointError, match="same location"):
        copy_checkpoint(good, good + "/")


# ---- whole model directories -------------------------------------------------------------------


def test_copy_tree_skips_incomplete_and_resumes(tmp_path: Path) -> None:
    root, states = _run_root(tmp_path, [10, 20, 30])
    unfinished_save(Location.parse(f"{root}/checkpoints/checkpoint-40"))  # a save in flight
    dst = str(tmp_path / "mirror")

    report = copy(root, dst)  # a model directory: copy_tree

    assert [c.status for c in report.checkpoints] == ["copied"] * 3
    assert [s for s, _ in report.skipped] == [f"{root}/checkpoints/checkpoint-40"]
    assert find_latest_checkpoint(dst) == f"{dst}/checkpoints/checkpoint-30"
    for step, state in states.items():
        ckpt = f"{dst}/checkpoints/checkpoint-{step}"
        assert verify_checkpoint(ckpt, deep=True).ok
        _assert_same(load_checkpoint(ckpt), state)
    assert not Path(dst, "checkpoints", "checkpoint-40").exists()

    states[50] = _save(f"{root}/checkpoints/checkpoint-50", 50, step=50)
    again = copy_tree(root, dst)
    assert [c.status for c in again.checkpoints] == ["up-to-date"] * 3 + ["copied"]
    assert find_latest_checkpoint(dst) == f"{dst}/checkpoints/checkpoint-50"


def test_copy_files_subset(tmp_path: Path) -> None:
    src = str(tmp_path / "checkpoint-1")
    _save(src, seed=1)
    out = tmp_path / "plain"
    records = copy_files(src, str(out), paths=["model.safetensors.index.json"])
    assert [r.path for r in records] == ["model.safetensors.index.json"]
    assert sorted(os.listdir(out)) == ["model.safetensors.index.json"]
    with pytest.raises(CheckpointNotFoundError, match="nope"):
        copy_files(src, str(out), paths=["nope.json"])


# ---- prune -------------------------------------------------------------------------------------


def test_prune_keeps_newest_and_never_incomplete(tmp_path: Path) -> None:
    root, _ = _run_root(tmp_path, [1, 2, 3, 4])
    unfinished_save(Location.parse(f"{root}/checkpoints/checkpoint-5"))

    dry = prune(root, keep=2, dry_run=True)
    assert [os.path.basename(u) for u in dry.deleted] == ["checkpoint-1", "checkpoint-2"]
    assert len(list_checkpoints(root)) == 5  # nothing deleted

    report = prune(root, keep=2)
    assert report.deleted == dry.deleted
    left = {i.location.name: i.status for i in list_checkpoints(root)}
    assert left == {
        "checkpoint-3": CheckpointStatus.COMPLETE,
        "checkpoint-4": CheckpointStatus.COMPLETE,
        "checkpoint-5": CheckpointStatus.INCOMPLETE,
    }
    with pytest.raises(ValueError, match="at least 1"):
        prune(root, keep=0)


def test_prune_spares_best_checkpoints_recorded_by_the_manager(tmp_path: Path) -> None:
    root, _ = _run_root(tmp_path, [1, 2, 3, 4])
    newest = Location.parse(f"{root}/checkpoints/checkpoint-4")
    manifest = read_manifest(newest)
    assert manifest is not None
    best = {
        "best_checkpoints": [["/elsewhere/checkpoints/checkpoint-1", 0.5]],
        "best_checkpoint": None,
    }
    newest.join(MANIFEST_NAME).publish(
        replace(manifest, user_metadata={"ckptsvc_manager": best}).to_json()
    )
    report = prune(root, keep=2)  # the best counts towards keep, as HF's save_total_limit
    assert [os.path.basename(u) for u in report.deleted] == ["checkpoint-2", "checkpoint-3"]
    assert [os.path.basename(u) for u in report.preserved] == ["checkpoint-1"]
    assert [i.location.name for i in list_checkpoints(root)] == ["checkpoint-1", "checkpoint-4"]


def test_prune_on_s3(s3_root: StorageRoot) -> None:
    opts = s3_root.storage_options
    for s in (1, 2, 3):
        _save(s3_root.join("checkpoints", f"checkpoint-{s}"), s, opts=opts, step=s)
    report = prune(s3_root.url, keep=1, storage_options=opts)
    assert len(report.deleted) == 2
    [left] = list_checkpoints(s3_root.url, storage_options=opts)
    assert left.location.name == "checkpoint-3"
    assert not Location.parse(s3_root.join("checkpoints", "checkpoint-1"), opts).exists()


# ---- the CLI -----------------------------------------------------------------------------------


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """Run ``ckptsvc`` (cli.main) in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(argv)
        except SystemExit as e:  # argparse: a usage error
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_cli_cp_json_and_progress(tmp_path: Path) -> None:
    root, _ = _run_root(tmp_path, [1, 2])
    dst = str(tmp_path / "cli-copy")
    code, out, err = _cli(["cp", root, dst, "--jobs", "2", "--json", "--progress"])
    assert code == 0, err
    doc = json.loads(out)
    assert [c["status"] for c in doc["checkpoints"]] == ["copied", "copied"]
    assert doc["files_copied"] == sum(c["files"] for c in doc["checkpoints"])
    assert "ckptsvc cp" in err and "100%" in err  # the tqdm bar went to stderr

    code, out, err = _cli(["cp", root, dst, "--no-progress"])
    assert code == 0 and err == ""
    assert out.count("up to date:") == 2 and "0 checkpoint(s) copied" in out


def test_cli_cp_errors_are_one_line(tmp_path: Path) -> None:
    code, _, err = _cli(["cp", str(tmp_path / "missing"), str(tmp_path / "d")])
    assert code == 1 and err.startswith("ckptsvc cp: error:") and err.count("\n") == 1
    code, _, err = _cli(["cp", "a", "b", "--jobs", "0"])
    assert code == 2 and "--jobs" in err
    code, _, err = _cli(["cp", "a", "b", "--storage-options", "{not json"])
    assert code == 2 and "--storage-options is not valid JSON" in err


def test_cli_prune_and_help(tmp_path: Path) -> None:
    root, _ = _run_root(tmp_path, [1, 2, 3])
    code, out, _ = _cli(["prune", root, "--keep", "1", "--dry-run", "--json"])
    assert code == 0
    doc = json.loads(out)
    assert doc["dry_run"] and len(doc["deleted"]) == 2 and len(list_checkpoints(root)) == 3
    code, out, _ = _cli(["prune", root, "--keep", "2"])
    assert code == 0 and out.startswith("deleted ") and "kept 2" in out
    assert len(list_checkpoints(root)) == 2

    for cmd in ("cp", "prune"):
        code, out, _ = _cli([cmd, "--help"])
        assert code == 0 and "examples:" in out and f"ckptsvc {cmd} " in out
    code, _, err = _cli(["prune", root])
    assert code == 2 and "--keep" in err
