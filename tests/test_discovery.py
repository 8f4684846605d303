"""Discovery: which checkpoint is the latest, which are complete, and the naming helpers.

Complete = manifest exists and parses; ordered by the manifest's timestamp, step as the
tie-break. Incomplete (our marker, or an unparseable manifest) is never returned, not even
when it is the only one. Legacy (no manifest, no marker, weights present) falls back to
modification time, as Forgather does.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import StorageRoot, unfinished_save
from helpers_models import TinyMLP

from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME
from ckptsvc.read.discovery import (
    CheckpointStatus,
    checkpoint_info,
    list_checkpoints,
    next_checkpoint_path,
    read_manifest,
    validate_checkpoint,
)
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.sharded_checkpoint import load_checkpoint, save_checkpoint
from ckptsvc.storage import Location

# ---- helpers ---------------------------------------------------------------------------------


def save(
    root: str,
    ckpt_id: int | str,
    *,
    seed: int = 0,
    opts: dict | None = None,
    step: int | None = None,
) -> str:
    path = next_checkpoint_path(root, ckpt_id)
    save_checkpoint(path, TinyMLP(seed=seed), safetensors=True, storage_options=opts, step=step)
    return path


def set_manifest(path: str, opts: dict | None = None, **changes: Any) -> None:
    """Rewrite a committed manifest with some fields changed (e.g. its timestamp)."""
    loc = Location.parse(path, opts)
    m = read_manifest(loc)
    assert m is not None
    loc.join(MANIFEST_NAME).publish(dataclasses.replace(m, **changes).to_json())


def torn(
    root: str, ckpt_id: int | str, *, opts: dict | None = None, with_weights: bool = True
) -> str:
    """A save that started (marker), maybe wrote its weights and index, and never committed."""
    path = next_checkpoint_path(root, ckpt_id)
    if with_weights:
        save_checkpoint(path, TinyMLP(seed=99), safetensors=True, storage_options=opts)
    loc = Location.parse(path, opts)
    unfinished_save(loc)  # a save to it started, never committed
    assert not loc.join(MANIFEST_NAME).exists()
    return path


def legacy(root: Path, ckpt_id: int | str, *, mtime_s: float) -> str:
    """A checkpoint written without a manifest (Forgather / HF style)."""
    path = Path(next_checkpoint_path(str(root), ckpt_id))
    path.mkdir(parents=True)
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path / "model.safetensors"))
    os.utime(path / "model.safetensors", (mtime_s, mtime_s))
    os.utime(path, (mtime_s, mtime_s))
    return str(path)


def iso(epoch_s: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat()


# ---- naming ----------------------------------------------------------------------------------


def test_next_checkpoint_path_format(tmp_path: Path) -> None:
    assert next_checkpoint_path(str(tmp_path), 500) == os.path.join(
        str(tmp_path), "checkpoints", "checkpoint-500"
    )
    assert next_checkpoint_path("out/model", "final") == os.path.join(
        "out/model", "checkpoints", "checkpoint-final"
    )
    assert next_checkpoint_path("s3://bucket/run", 7) == "s3://bucket/run/checkpoints/checkpoint-7"
    assert next_checkpoint_path("gs://bucket/run/", 7) == "gs://bucket/run/checkpoints/checkpoint-7"


# ---- ordering --------------------------------------------------------------------------------


def test_latest_is_newest_manifest_timestamp_not_name_or_mtime(tmp_path: Path) -> None:
    root = str(tmp_path)
    now = time.time()
    paths = {i: save(root, i, seed=i) for i in (100, 200, 300)}
    # manifest timestamps say 100 is newest; directory mtimes and names say 300
    set_manifest(paths[100], timestamp=iso(now - 10))
    set_manifest(paths[200], timestamp=iso(now - 30))
    set_manifest(paths[300], timestamp=iso(now - 20))
    for i, p in paths.items():
        os.utime(p, (now + i, now + i))
    assert find_latest_checkpoint(root) == paths[100]
    order = [os.path.basename(i.url) for i in list_checkpoints(root)]
    assert order == ["checkpoint-200", "checkpoint-300", "checkpoint-100"], "oldest first"


def test_step_breaks_timestamp_ties_numerically(tmp_path: Path) -> None:
    root = str(tmp_path)
    ts = iso(time.time())
    for i in (9, 10, 2):
        set_manifest(save(root, i), timestamp=ts)
    assert find_latest_checkpoint(root) == next_checkpoint_path(root, 10), "10 > 9 numerically"


def test_manifest_step_is_the_tie_break(tmp_path: Path) -> None:
    root = str(tmp_path)
    ts = iso(time.time())
    a = save(root, "alpha", step=5)
    b = save(root, "beta", step=3)
    for p in (a, b):
        set_manifest(p, timestamp=ts)
    assert find_latest_checkpoint(root) == a


def test_consecutive_saves_order_by_commit(tmp_path: Path) -> None:
    root = str(tmp_path)
    for i in (3, 1, 2):  # committed in this order
        save(root, i)
    assert find_latest_checkpoint(root) == next_checkpoint_path(root, 2)


# ---- incomplete ------------------------------------------------------------------------------


def test_incomplete_newest_is_skipped(tmp_path: Path) -> None:
    root = str(tmp_path)
    good = save(root, 1)
    bad = torn(root, 2)  # newer, has weights and index, but a marker and no manifest
    assert checkpoint_info(bad).status is CheckpointStatus.INCOMPLETE
    assert not validate_checkpoint(bad)
    assert find_latest_checkpoint(root) == good


@pytest.mark.parametrize("with_weights", [True, False])
def test_only_incomplete_means_none(tmp_path: Path, with_weights: bool) -> None:
    root = str(tmp_path)
    only = torn(root, 1, with_weights=with_weights)
    assert find_latest_checkpoint(root) is None
    assert not validate_checkpoint(only)


def test_marker_makes_weights_incomplete_not_legacy(tmp_path: Path) -> None:
    """Weights plus our marker and no manifest: a torn save, never a legacy checkpoint."""
    root = tmp_path
    path = Path(legacy(root, 1, mtime_s=time.time()))
    assert validate_checkpoint(str(path))
    (path / MARKER_NAME).write_text("{}")
    assert checkpoint_info(str(path)).status is CheckpointStatus.INCOMPLETE
    assert find_latest_checkpoint(str(root)) is None


@pytest.mark.parametrize(
    "garbage",
    [b"", b"{", b"[]", b'{"timestamp": 5}', b"\xff\xfe"],
    ids=["empty", "torn", "array", "bad-ts", "binary"],
)
def test_corrupt_manifest_is_not_complete(tmp_path: Path, garbage: bytes) -> None:
    root = str(tmp_path)
    good = save(root, 1)
    bad = save(root, 2)
    Path(bad, MANIFEST_NAME).write_bytes(garbage)
    info = checkpoint_info(bad)
    assert info.status is CheckpointStatus.INCOMPLETE
    assert MANIFEST_NAME in info.reason
    assert not validate_checkpoint(bad)
    assert find_latest_checkpoint(root) == good


def test_directory_without_anything_is_absent(tmp_path: Path) -> None:
    root = tmp_path
    empty = Path(next_checkpoint_path(str(root), 1))
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("hello")
    assert checkpoint_info(str(empty)).status is CheckpointStatus.ABSENT
    assert checkpoint_info(str(root / "nope")).status is CheckpointStatus.ABSENT
    assert not validate_checkpoint(str(empty))
    assert not validate_checkpoint(str(root / "nope"))
    assert find_latest_checkpoint(str(root)) is None


# ---- legacy ----------------------------------------------------------------------------------


def test_legacy_checkpoints_by_mtime(tmp_path: Path) -> None:
    now = time.time()
    old = legacy(tmp_path, 5, mtime_s=now - 100)
    new = legacy(tmp_path, 3, mtime_s=now - 50)
    assert checkpoint_info(old).status is CheckpointStatus.LEGACY
    assert validate_checkpoint(old)
    assert find_latest_checkpoint(str(tmp_path)) == new


def test_complete_and_legacy_mixed(tmp_path: Path) -> None:
    now = time.time()
    legacy(tmp_path, 1, mtime_s=now - 1000)
    complete = save(str(tmp_path), 2)
    set_manifest(complete, timestamp=iso(now - 500))
    assert find_latest_checkpoint(str(tmp_path)) == complete
    newer_legacy = legacy(tmp_path, 3, mtime_s=now - 10)
    assert find_latest_checkpoint(str(tmp_path)) == newer_legacy


# ---- layout of the model directory -----------------------------------------------------------


def test_model_dir_without_checkpoints_dir(tmp_path: Path) -> None:
    assert find_latest_checkpoint(str(tmp_path)) is None
    save_checkpoint(str(tmp_path), TinyMLP(), safetensors=True)
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path)


def test_empty_checkpoints_dir(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    assert find_latest_checkpoint(str(tmp_path)) is None


def test_unrelated_entries_are_ignored(tmp_path: Path) -> None:
    root = str(tmp_path)
    good = save(root, 1)
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(str(ckpts / "not-a-checkpoint"), TinyMLP(), safetensors=True)
    save_checkpoint(str(ckpts / "checkpoint"), TinyMLP(), safetensors=True)
    (ckpts / "checkpoint-99").write_text("a file, not a directory")
    assert find_latest_checkpoint(root) == good
    assert [os.path.basename(i.url) for i in list_checkpoints(root)] == ["checkpoint-1"]


# ---- every backend ---------------------------------------------------------------------------


def test_discovery_on_backend(storage_root_fast: StorageRoot) -> None:
    root, opts = storage_root_fast.url, storage_root_fast.storage_options
    assert find_latest_checkpoint(root, storage_options=opts) is None
    first = save(root, 1, opts=opts, seed=1)
    assert find_latest_checkpoint(root, storage_options=opts) == first
    second = save(root, 2, opts=opts, seed=2)
    torn(root, 3, opts=opts)
    latest = find_latest_checkpoint(root, storage_options=opts)
    assert latest == second
    assert validate_checkpoint(second, storage_options=opts)
    assert not validate_checkpoint(next_checkpoint_path(root, 3), storage_options=opts)
    statuses = {
        os.path.basename(i.url): i.status for i in list_checkpoints(root, storage_options=opts)
    }
    assert statuses == {
        "checkpoint-1": CheckpointStatus.COMPLETE,
        "checkpoint-2": CheckpointStatus.COMPLETE,
        "checkpoint-3": CheckpointStatus.INCOMPLETE,
    }
    got = load_checkpoint(latest, storage_options=opts)
    assert isinstance(got, dict)
    assert torch.equal(got["fc1.weight"], TinyMLP(seed=2).fc1.weight.detach())


def test_relative_model_dir_gives_forgather_style_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forgather returns ``<model_dir>/checkpoints/checkpoint-N`` as given (relative stays
    relative), so ``find_latest_checkpoint(d) == next_checkpoint_path(d, n)`` holds."""
    monkeypatch.chdir(tmp_path)
    save("run", 1)
    latest = find_latest_checkpoint("run")
    assert latest is not None
    assert os.path.samefile(latest, next_checkpoint_path("run", 1))
    assert latest == next_checkpoint_path("run", 1)
