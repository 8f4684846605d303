"""The node-local cache of replicated files (``ckptsvc.read.node_cache``), against a real
``moto_server``: several real processes of one "node" loading the same replicated
component fetch its shard once; a downloader killed with SIGKILL is taken over; a
checkpoint saved again at the same path is never served from the old entry; ``off`` and
an unusable directory read directly."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StorageRoot

from ckptsvc import AsyncCheckpointer
from ckptsvc.errors import CorruptCheckpointError, NodeCacheStalledError
from ckptsvc.format.manifest import MANIFEST_NAME, FileRecord
from ckptsvc.read.component_load import load_state
from ckptsvc.read.node_cache import entry_name
from ckptsvc.stage.components import SharingPattern, StateComponent
from ckptsvc.stage.state_components import HeldState
from ckptsvc.storage import Location

# A loading process: load_state with a counting S3 client; writes the model and the
# requests that named the model's shard to argv[3].
CHILD = r"""
import json, logging, sys, time
import torch
from ckptsvc.read.component_load import load_state
from ckptsvc.tools.simulate_probes import RequestLog
from ckptsvc.storage import Location

path, opts, out, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
log = RequestLog(path, opts)
handler = logging.FileHandler(out + ".log")
logging.getLogger("ckptsvc.read.node_cache").addHandler(handler)
logging.getLogger("ckptsvc.read.node_cache").setLevel(logging.DEBUG)
if mode == "hang":  # hold the entry's lock mid-download until killed
    real = Location.read_scattered
    def hang(self, extents, **kw):
        if ".safetensors" in self.url and "node cache copy" not in self.url:
            open(out + ".downloading", "w").close()
            time.sleep(600)
        return real(self, extents, **kw)
    Location.read_scattered = hang
state = load_state(path, storage_options=opts)
shard = [(r.method, r.range) for r in log.records() if r.path.endswith(".safetensors")]
torch.save({"model": state["model"], "shard_requests": shard}, out)
"""


def _model(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(64, 32, generator=gen) for i in range(3)}


def _save(root: StorageRoot, step: int, seed: int) -> str:
    with AsyncCheckpointer(root.url, storage_options=root.storage_options) as ckpt:
        handle = ckpt.save_components(
            step, [StateComponent("model", HeldState(_model(seed)), SharingPattern.REPLICATED)]
        )
        handle.wait(120)
    return str(handle.path)


def _child_env(cache: Path, rank: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WORLD_SIZE="4", LOCAL_WORLD_SIZE="4", RANK=str(rank), LOCAL_RANK=str(rank),
        CKPTSVC_NODE_CACHE_DIR=str(cache), CKPTSVC_NODE_CACHE="auto",
    )  # fmt: skip
    env.update(extra)
    return env


def _start(path: str, root: StorageRoot, out: Path, env: dict[str, str], mode: str = "load") -> Any:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, path, json.dumps(root.storage_options), str(out), mode],
        env=env,
    )


def _entries(cache: Path, suffix: str = ".data") -> list[Path]:
    return sorted(p for p in cache.glob(f"*{suffix}")) if cache.is_dir() else []


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """In-process loads use the cache (``on``: one process is one rank per node)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CKPTSVC_NODE_CACHE", "on")
    monkeypatch.setenv("CKPTSVC_NODE_CACHE_DIR", str(cache))
    return cache


def test_four_processes_of_a_node_fetch_the_replicated_shard_once(
    node: str, s3_root: StorageRoot, tmp_path: Path
) -> None:
    path = _save(s3_root, 1, seed=1)
    cache = tmp_path / "cache"
    outs = [tmp_path / f"rank{r}.pt" for r in range(4)]
    procs = [_start(path, s3_root, outs[r], _child_env(cache, r)) for r in range(4)]
    assert [p.wait(180) for p in procs] == [0] * 4
    got = [torch.load(o) for o in outs]
    for g in got:
        assert _equal(g["model"], _model(1))  # bitwise
    requests = [g["shard_requests"] for g in got]
    assert sorted(len(r) for r in requests) == [0, 0, 0, 1], requests  # one GET on the node
    assert [m for r in requests for m, _ in r] == ["GET"]
    assert len(_entries(cache)) == 1 and not _entries(cache, ".tmp-*")
    # the same job without the cache: every process reads the shard itself
    outs = [tmp_path / f"direct{r}.pt" for r in range(2)]
    procs = [
        _start(path, s3_root, outs[r], _child_env(cache, r, CKPTSVC_NODE_CACHE="off"))
        for r in range(2)
    ]
    assert [p.wait(180) for p in procs] == [0] * 2
    assert all(len(torch.load(o)["shard_requests"]) >= 1 for o in outs)


def test_a_killed_downloader_is_taken_over(node: str, s3_root: StorageRoot, tmp_path: Path) -> None:
    path = _save(s3_root, 1, seed=2)
    cache = tmp_path / "cache"
    first = _start(path, s3_root, tmp_path / "first.pt", _child_env(cache, 0), mode="hang")
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "first.pt.downloading").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert len(_entries(cache, ".tmp-*")) == 1 and not _entries(cache)  # a half download
        second = _start(path, s3_root, tmp_path / "second.pt", _child_env(cache, 1))
        waiting = tmp_path / "second.pt.log"
        while "waiting for another process" not in (
            waiting.read_text() if waiting.exists() else ""
        ):
            assert second.poll() is None and time.monotonic() < deadline  # it waits on the lock
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert second.wait(180) == 0
    got = torch.load(tmp_path / "second.pt")
    assert _equal(got["model"], _model(2))
    assert [m for m, _ in got["shard_requests"]] == ["GET"]  # it downloaded the file itself
    assert len(_entries(cache)) == 1 and not _entries(cache, ".tmp-*")  # the half file is gone


def test_a_checkpoint_saved_again_at_the_same_path_is_not_served_stale(
    node: str, s3_root: StorageRoot, on: Path
) -> None:
    path = _save(s3_root, 3, seed=3)
    assert _equal(load_state(path, storage_options=s3_root.storage_options)["model"], _model(3))
    assert len(_entries(on)) == 1
    Location.parse(path, s3_root.storage_options).remove(recursive=True)
    assert _save(s3_root, 3, seed=4) == path  # new bytes at the same URL
    assert _equal(load_state(path, storage_options=s3_root.storage_options)["model"], _model(4))
    assert len(_entries(on)) == 2  # a new entry (the old one ages out)


def test_off_and_an_unusable_directory_read_directly(
    node: str,
    s3_root: StorageRoot,
    on: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = _save(s3_root, 1, seed=5)
    opts = s3_root.storage_options
    for off in ({"CKPTSVC_NODE_CACHE": "off"}, {"CKPTSVC_NODE_CACHE_DIR": "off"}):
        with monkeypatch.context() as m:
            for k, v in off.items():
                m.setenv(k, v)
            assert _equal(load_state(path, storage_options=opts)["model"], _model(5))
        assert not on.exists()
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CKPTSVC_NODE_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    with caplog.at_level(logging.WARNING, logger="ckptsvc.read.node_cache"):
        for _ in range(2):
            assert _equal(load_state(path, storage_options=opts)["model"], _model(5))
    warned = [r for r in caplog.records if "node cache" in r.getMessage()]
    assert len(warned) == 1 and "a-file" in warned[0].getMessage()  # once


def test_auto_leaves_a_single_rank_per_node_alone(
    node: str, s3_root: StorageRoot, on: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(s3_root, 1, seed=7)
    monkeypatch.setenv("CKPTSVC_NODE_CACHE", "auto")
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert _equal(load_state(path, storage_options=s3_root.storage_options)["model"], _model(7))
    assert not _entries(on)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _equal(load_state(path, storage_options=s3_root.storage_options)["model"], _model(7))
    assert len(_entries(on)) == 1


def _shard(ckpt: Location) -> FileRecord:
    manifest = json.loads(ckpt.join(MANIFEST_NAME).read_bytes())
    (rel, info), = [
        (k, v) for k, v in manifest["metadata"]["ckptsvc"]["files"].items()
        if k.endswith(".safetensors")
    ]  # fmt: skip
    return FileRecord(rel, int(info["nbytes"]), str(info["crc32c"]))


def test_a_damaged_object_is_an_error_and_is_not_cached(
    node: str, s3_root: StorageRoot, on: Path
) -> None:
    path = _save(s3_root, 1, seed=8)
    ckpt = Location.parse(path, s3_root.storage_options)
    shard = ckpt.join(_shard(ckpt).path)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    shard.publish(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC-32C"):
        load_state(path, storage_options=s3_root.storage_options)
    assert not _entries(on) and not _entries(on, ".tmp-*")


def test_a_waiter_gives_up_on_a_live_holder_without_progress(
    node: str, s3_root: StorageRoot, on: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(s3_root, 1, seed=6)
    ckpt = Location.parse(path, s3_root.storage_options)
    record = _shard(ckpt)
    on.mkdir()
    fd = os.open(on / (entry_name(ckpt.url, record) + ".lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a "downloader" that never progresses
        monkeypatch.setenv("CKPTSVC_NODE_CACHE_STALL_S", "0.5")
        with pytest.raises(NodeCacheStalledError, match="CKPTSVC_NODE_CACHE_STALL_S"):
            load_state(path, storage_options=s3_root.storage_options)
    finally:
        os.close(fd)
    assert _equal(load_state(path, storage_options=s3_root.storage_options)["model"], _model(6))


def test_eviction_spares_an_entry_in_use(
    node: str, s3_root: StorageRoot, on: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPTSVC_NODE_CACHE_MAX_AGE_S", "0")
    opts = s3_root.storage_options
    paths = [_save(s3_root, step, seed=step) for step in (1, 2, 3)]
    load_state(paths[0], storage_options=opts)
    (held,) = _entries(on)
    fd = os.open(str(held)[: -len(".data")] + ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # another process reading it
        time.sleep(0.05)
        load_state(paths[1], storage_options=opts)
        assert held in _entries(on) and len(_entries(on)) == 2  # in use: kept
    finally:
        os.close(fd)
    time.sleep(0.05)
    assert _equal(load_state(paths[2], storage_options=opts)["model"], _model(3))
    assert len(_entries(on)) == 1  # the unused entries of other checkpoints are gone
    assert len(_entries(on, ".lock")) == 1
