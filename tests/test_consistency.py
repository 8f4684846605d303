"""A reader polling ``find_latest_checkpoint`` on a bucket while saves and retention run
never sees an incomplete or torn checkpoint.

The writer (this process) saves checkpoint after checkpoint, each with several shards
whose every value is the checkpoint's id, and deletes the oldest beyond two. The reader (a
separate, spawned process) loops: find the latest, load it, check every tensor holds that
checkpoint's id. A load may only fail for a checkpoint that retention deleted under it.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any

import pytest
import torch
from conftest import StorageRoot

from ckptsvc.errors import CheckpointError
from ckptsvc.ops.retention import maybe_delete_oldest_checkpoint
from ckptsvc.read.discovery import next_checkpoint_path
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.sharded_checkpoint import load_checkpoint, save_checkpoint

SAVES = 12
KEEP = 2


def _state(ckpt_id: int) -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": torch.full((40_000,), float(ckpt_id)) for i in range(4)}


def _reader(root: str, opts: dict[str, Any], stop: Any, progress: Any, out: Any) -> None:
    """Runs in the spawned reader process; puts one ('ok'|'torn'|'error', path, detail)
    per attempt and counts attempts in ``progress``, then puts ('done', '', '')."""
    while not stop.is_set():
        path = find_latest_checkpoint(root, storage_options=opts)
        if path is None:
            out.put(("none", "", ""))
        else:
            out.put(_check(path, opts))
        with progress.get_lock():
            progress.value += 1
    out.put(("done", "", ""))


def _check(path: str, opts: dict[str, Any]) -> tuple[str, str, str]:
    ckpt_id = int(path.rsplit("-", 1)[1])
    try:
        sd = load_checkpoint(path, storage_options=opts)
    except CheckpointError as e:
        return ("error", path, f"{type(e).__name__}: {e}")
    if sd is None or len(sd) != 4:
        return ("torn", path, f"{0 if sd is None else len(sd)} tensors")
    torn = sorted(k for k, v in sd.items() if not torch.all(v == float(ckpt_id)))
    return ("torn", path, f"wrong values in {torn}") if torn else ("ok", path, "")


def _wait_for(progress: Any, target: int, reader: Any) -> None:
    """Block until the reader has finished ``target`` attempts (or died)."""
    while progress.value < target:
        if not reader.is_alive():
            pytest.fail(f"the reader process died (exit code {reader.exitcode})")
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("storage_root", ["s3", "gcs"], indirect=True)
def test_reader_never_sees_an_incomplete_checkpoint(storage_root: StorageRoot) -> None:
    root = storage_root.join("run")
    opts = storage_root.storage_options
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    progress = ctx.Value("i", 0)
    results: Any = ctx.Queue()
    save_checkpoint(next_checkpoint_path(root, 0), _state(0), safetensors=True,
                    max_shard_size=200_000, storage_options=opts, step=0)  # fmt: skip
    reader = ctx.Process(target=_reader, args=(root, opts, stop, progress, results), daemon=True)
    reader.start()
    deleted: set[str] = set()
    try:
        _wait_for(progress, 1, reader)
        for i in range(1, SAVES):
            before = {next_checkpoint_path(root, j) for j in range(i)}
            save_checkpoint(next_checkpoint_path(root, i), _state(i), safetensors=True,
                            max_shard_size=200_000, storage_options=opts, step=i)  # fmt: skip
            maybe_delete_oldest_checkpoint(root, KEEP, storage_options=opts)
            still = {next_checkpoint_path(root, j) for j in range(max(0, i + 1 - KEEP), i + 1)}
            deleted |= before - still
            # the reader keeps polling freely; two more attempts end after this save, so
            # the second one started after it committed and must see it
            _wait_for(progress, progress.value + 2, reader)
    finally:
        stop.set()
    outcomes: list[tuple[str, str, str]] = []
    while True:
        try:
            item = results.get(timeout=120)
        except queue.Empty:
            pytest.fail("the reader process stopped answering")
        if item[0] == "done":
            break
        outcomes.append(item)
    reader.join(timeout=30)
    assert reader.exitcode == 0

    torn = [o for o in outcomes if o[0] == "torn"]
    assert not torn, torn
    errors = [o for o in outcomes if o[0] == "error"]
    unexplained = [o for o in errors if o[1] not in deleted]
    assert not unexplained, f"loads failed for checkpoints nobody deleted: {unexplained}"
    ok = [o for o in outcomes if o[0] == "ok"]
    assert {o[1] for o in ok} >= {next_checkpoint_path(root, i) for i in range(1, SAVES)}
    assert not [o for o in outcomes if o[0] == "none"]  # checkpoint-0 was there from the start
    assert find_latest_checkpoint(root, storage_options=opts) == next_checkpoint_path(
        root, SAVES - 1
    )
