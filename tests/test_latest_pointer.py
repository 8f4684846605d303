"""The ``latest`` pointer (``<folder>/ckptsvc-latest.json``): written after each commit,
read first by ``find_latest_checkpoint``, trusted only once verified against the manifest
and the folder's listing, and every way it can be wrong falls back to the listing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import StorageRoot, unfinished_save
from helpers_models import TinyMLP

from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.ops.retention import delete_checkpoint
from ckptsvc.read import latest as latest_mod
from ckptsvc.read.discovery import next_checkpoint_path, read_manifest
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.sharded_checkpoint import save_checkpoint
from ckptsvc.storage import Location
from ckptsvc.workers.latest_pointer import (
    MAX_POINTER_NBYTES,
    POINTER_NAME,
    LatestPointer,
    advance_pointer,
    read_pointer,
)

TESTS_DIR = Path(__file__).resolve().parent


def save(root: str, step: int, opts: dict | None = None) -> str:
    path = next_checkpoint_path(root, step)
    save_checkpoint(path, TinyMLP(seed=step), safetensors=True, step=step, storage_options=opts)
    return path


def pointer_of(root: str, opts: dict | None = None) -> LatestPointer | None:
    return read_pointer(Location.parse(root, opts).join("checkpoints"))


def put_pointer(root: str, raw: bytes, opts: dict | None = None) -> None:
    Location.parse(root, opts).join("checkpoints", POINTER_NAME).publish(raw)


def no_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the full listing fail: the answer must come from the pointer."""

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("find_latest_checkpoint listed every checkpoint")

    monkeypatch.setattr(latest_mod, "list_checkpoints", refuse)


def test_each_save_moves_the_pointer_and_discovery_needs_no_listing(
    storage_root_fast: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, opts = storage_root_fast.url, storage_root_fast.storage_options
    for step in (1, 2, 3):
        last = save(root, step, opts)
        pointer = pointer_of(root, opts)
        assert pointer is not None and (pointer.name, pointer.step) == (f"checkpoint-{step}", step)
    no_listing(monkeypatch)
    assert find_latest_checkpoint(root, storage_options=opts) == last


def test_pointer_follows_commits_and_never_moves_back_to_an_earlier_one(tmp_path: Path) -> None:
    root = str(tmp_path)
    save(root, 5)
    three = save(root, 3)  # a job that rolled back: a later commit, a lower step
    pointer = pointer_of(root)
    assert pointer is not None and pointer.name == "checkpoint-3"
    assert find_latest_checkpoint(root) == three  # what the listing says too
    # a slow saver of step 5 whose commit came first must not move it back
    manifest = read_manifest(Location.parse(next_checkpoint_path(root, 5)))
    assert manifest is not None
    assert not advance_pointer(Location.parse(next_checkpoint_path(root, 5)), manifest)
    pointer = pointer_of(root)
    assert pointer is not None and pointer.name == "checkpoint-3"


def test_a_pointer_gone_back_in_a_race_still_finds_the_newest(tmp_path: Path) -> None:
    """Two savers read the pointer at 1; the one at 3 writes, then the one at 2 (which
    committed first): the pointer names 2, but 3 is complete, has a higher step, and is
    found by the staleness check."""
    root = str(tmp_path)
    save(root, 1)
    two = save(root, 2)
    newest = save(root, 3)
    manifest = read_manifest(Location.parse(two))
    assert manifest is not None
    put_pointer(root, LatestPointer.of("checkpoint-2", manifest).to_json())
    assert find_latest_checkpoint(root) == newest


def test_kill_9_between_manifest_and_pointer(tmp_path: Path) -> None:
    """The writer dies after the manifest of step 2, before its pointer: the pointer still
    names step 1, and discovery returns step 2 (complete, a higher step)."""
    root = str(tmp_path)
    child = textwrap.dedent(
        """
        import sys, time
        sys.path.insert(0, sys.argv[2])
        from helpers_models import TinyMLP
        from ckptsvc import hooks
        from ckptsvc.read.discovery import next_checkpoint_path
        from ckptsvc.sharded_checkpoint import save_checkpoint
        root = sys.argv[1]
        save_checkpoint(next_checkpoint_path(root, 1), TinyMLP(seed=1), safetensors=True, step=1)
        def stop(name, url):
            if name == "ckptsvc-latest.json":
                print("PAUSED", flush=True)
                time.sleep(3600)
        hooks.install("publish.before", stop)
        save_checkpoint(next_checkpoint_path(root, 2), TinyMLP(seed=2), safetensors=True, step=2)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, root, str(TESTS_DIR)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "PAUSED"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    pointer = pointer_of(root)
    assert pointer is not None and pointer.name == "checkpoint-1"
    assert find_latest_checkpoint(root) == next_checkpoint_path(root, 2)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\xffgarbage",
        b"[]",
        b'{"format": "ckptsvc-latest", "version": 99, "name": "checkpoint-1", "step": 1}',
        b" " * (MAX_POINTER_NBYTES + 10),
    ],
    ids=["garbage", "not-an-object", "unknown-version", "huge"],
)
def test_damaged_pointer_falls_back_to_the_listing(tmp_path: Path, raw: bytes) -> None:
    root = str(tmp_path)
    save(root, 1)
    newest = save(root, 2)
    put_pointer(root, raw)
    assert find_latest_checkpoint(root) == newest


@pytest.mark.parametrize(
    "name", ["../../etc", "/etc/passwd", "checkpoint-1/../../x", "..", "a\\b", "checkpoint-9"]
)
def test_a_pointer_names_a_directory_beside_it_never_a_path(tmp_path: Path, name: str) -> None:
    root = str(tmp_path)
    newest = save(root, 2)
    outside = tmp_path / "etc"
    outside.mkdir()
    doc = {
        "format": "ckptsvc-latest",
        "version": 1,
        "name": name,
        "step": 2,
        "manifest_timestamp": "2026-01-01T00:00:00+00:00",
    }
    put_pointer(root, json.dumps(doc).encode())
    assert find_latest_checkpoint(root) == newest


def test_a_pointer_that_is_a_fifo_is_not_opened(tmp_path: Path) -> None:
    root = str(tmp_path)
    newest = save(root, 1)
    pointer = tmp_path / "checkpoints" / POINTER_NAME
    pointer.unlink()
    os.mkfifo(pointer)  # opening it for reading would block forever
    assert find_latest_checkpoint(root) == newest


def test_pointer_to_a_deleted_checkpoint(tmp_path: Path) -> None:
    root = str(tmp_path)
    older = save(root, 1)
    newest = save(root, 2)
    delete_checkpoint(newest)  # retention / prune / gc: the pointer named it, so it goes
    assert pointer_of(root) is None
    assert find_latest_checkpoint(root) == older
    save(root, 3)
    delete_checkpoint(older)  # not the pointed one: the pointer stays
    pointer = pointer_of(root)
    assert pointer is not None and pointer.name == "checkpoint-3"


def test_pointer_to_a_checkpoint_removed_behind_its_back(tmp_path: Path) -> None:
    import shutil

    root = str(tmp_path)
    older = save(root, 1)
    newest = save(root, 2)
    shutil.rmtree(newest)  # rm -rf: the pointer dangles
    assert find_latest_checkpoint(root) == older


def test_pointer_to_an_incomplete_or_replaced_checkpoint(tmp_path: Path) -> None:
    root = str(tmp_path)
    older = save(root, 1)
    newest = save(root, 2)
    loc = Location.parse(newest)
    manifest = read_manifest(loc)
    assert manifest is not None
    # replaced: same name, another manifest (another timestamp)
    put_pointer(
        root,
        LatestPointer("checkpoint-2", 2, "2020-01-01T00:00:00+00:00").to_json(),
    )
    assert find_latest_checkpoint(root) == newest  # the listing still finds it
    # incomplete: the manifest gone, a save's marker there
    put_pointer(root, LatestPointer.of("checkpoint-2", manifest).to_json())
    loc.join(MANIFEST_NAME).remove()
    unfinished_save(loc)
    assert find_latest_checkpoint(root) == older


def test_advance_pointer_skips_hidden_replacements(tmp_path: Path) -> None:
    root = str(tmp_path)
    path = save(root, 1)
    manifest = read_manifest(Location.parse(path))
    assert manifest is not None
    hidden = Location.parse(str(tmp_path / "checkpoints" / ".checkpoint-2.ckptsvc-replace"))
    assert not advance_pointer(hidden, manifest)
    pointer = pointer_of(root)
    assert pointer is not None and pointer.name == "checkpoint-1"


def test_pointer_in_the_hf_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``<root>/checkpoint-N`` (the HF Trainer's layout): the pointer lies in ``<root>``."""
    root = str(tmp_path)
    for step in (1, 2):
        path = str(tmp_path / f"checkpoint-{step}")
        save_checkpoint(path, TinyMLP(seed=step), safetensors=True, step=step)
    assert (tmp_path / POINTER_NAME).is_file()
    no_listing(monkeypatch)
    assert find_latest_checkpoint(root) == path


@pytest.mark.cloud
def test_discovery_requests_on_s3_do_not_grow_with_the_checkpoints(s3_root: StorageRoot) -> None:
    """With the pointer: 2 LIST + pointer GET + its manifest GET + 1 LIST of its files,
    whatever the number of checkpoints; without it (the fallback) one GET more per
    checkpoint."""
    from ckptsvc.tools.simulate_probes import RequestLog

    root, opts = s3_root.url, s3_root.storage_options
    log = RequestLog(root, opts)
    counts = {}
    step = 0
    for total in (2, 8):
        while step < total:
            step += 1
            save(root, step, opts)
        log.reset_records()
        assert find_latest_checkpoint(root, storage_options=opts) == next_checkpoint_path(
            root, total
        )
        counts[total] = len(log.records())
    assert counts[2] == counts[8] == 5, counts
    Location.parse(root, opts).join("checkpoints", POINTER_NAME).remove()
    log.reset_records()
    assert find_latest_checkpoint(root, storage_options=opts) == next_checkpoint_path(root, 8)
    assert len(log.records()) >= 8 + 3  # the listing: a manifest GET per checkpoint
