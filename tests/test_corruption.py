"""Damaged checkpoints: every kind of damage is detected by ``load_checkpoint`` and by
``verify_checkpoint``, both naming the damaged file, and ``find_latest_verified`` (behind
``find_latest_checkpoint(..., verify=...)``) skips the damaged checkpoint for the older,
intact one.

Each test saves two checkpoints (sync API or ``AsyncCheckpointer``, on local disk or the
S3 emulator), damages the second one in one way, and checks the three promises. The
``AsyncCheckpointer`` saves on local disk are made once per module (one writer process)
and each test damages its own copy of those bytes. Damage
that the manifest itself would reveal (a stale index, a wrong size) is made consistent in
the manifest too, so the test hits the check it is about and not an incidental CRC.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from conftest import LeakBaseline, StorageRoot, node_leaks

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.errors import CheckpointError
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.format.manifest import MANIFEST_NAME, FileRecord, Manifest
from ckptsvc.read.discovery import next_checkpoint_path
from ckptsvc.read.latest import find_latest_checkpoint, find_latest_verified
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.sharded_checkpoint import SAFE_WEIGHTS_INDEX_NAME, load_checkpoint, save_checkpoint
from ckptsvc.storage import Location

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
GHOST_SHARD = "model-00003-of-00003.safetensors"


def state(step: int) -> dict[str, torch.Tensor]:
    """Four 256-byte tensors: two shards of two tensors at max_shard_size=512."""
    return {f"w{i}": torch.full((64,), float(step * 10 + i)) for i in range(4)}


def save_two(root: StorageRoot, kind: str) -> tuple[str, str]:
    """checkpoint-1 and checkpoint-2 under the root, by the sync or the async API."""
    if kind == "async" and root.backend == "local" and _ASYNC_LOCAL:
        # the bytes AsyncCheckpointer wrote once for this module (a writer process per
        # test costs ~0.5 s): each test damages a fresh copy
        shutil.copytree(_ASYNC_LOCAL[0], root.url)
        return next_checkpoint_path(root.url, 1), next_checkpoint_path(root.url, 2)
    opts = root.storage_options
    if kind == "sync":
        for step in (1, 2):
            save_checkpoint(
                next_checkpoint_path(root.url, step), state(step), safetensors=True,
                max_shard_size=512, storage_options=opts, step=step,
            )  # fmt: skip
    else:
        with AsyncCheckpointer(root.url, storage_options=opts, max_shard_size=512) as ckpt:
            for step in (1, 2):
                ckpt.save(step, {"model": state(step)}).wait(120)
    return next_checkpoint_path(root.url, 1), next_checkpoint_path(root.url, 2)


_ASYNC_LOCAL: list[str] = []  # the root async_local_saved wrote, while the module runs


@pytest.fixture(scope="module", autouse=True)
def async_local_saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Two checkpoints saved once by ``AsyncCheckpointer`` on local disk, on a node of
    their own (checked for leaks like the ``node`` fixture's), copied by ``save_two``."""
    name = f"n{uuid.uuid4().hex[:10]}"
    root = StorageRoot("local", str(tmp_path_factory.mktemp("async-saved") / "root"), {})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKPTSVC_NODE_ID", name)
        mp.setenv("CKPTSVC_WRITER_LINGER_S", "1")
        before = LeakBaseline()
        save_two(root, "async")
        leaks = node_leaks(name, before)
    assert not leaks, leaks
    _ASYNC_LOCAL.append(root.url)
    yield
    _ASYNC_LOCAL.clear()
    shutil.rmtree(root.url, ignore_errors=True)


# ---- the damage ------------------------------------------------------------------------------


def _edit(ckpt: Location, name: str, fn: Callable[[bytes], bytes]) -> None:
    loc = ckpt.join(name)
    loc.publish(fn(loc.read_bytes()))


def _edit_manifest(ckpt: Location, fn: Callable[[FileRecord], FileRecord]) -> None:
    m = Manifest.from_json(ckpt.join(MANIFEST_NAME).read_bytes(), where="test")
    files = tuple(fn(f) for f in m.files)
    ckpt.join(MANIFEST_NAME).publish(dataclasses.replace(m, files=files).to_json())


def _edit_index(ckpt: Location, fn: Callable[[dict[str, str]], None]) -> None:
    """Change the index's weight_map and record the new index in the manifest."""
    doc = json.loads(ckpt.join(SAFE_WEIGHTS_INDEX_NAME).read_bytes())
    fn(doc["weight_map"])
    raw = json.dumps(doc, indent=4).encode()
    ckpt.join(SAFE_WEIGHTS_INDEX_NAME).publish(raw)
    _edit_manifest(
        ckpt,
        lambda f: (
            FileRecord(f.path, len(raw), crc32c_hex(raw))
            if f.path == SAFE_WEIGHTS_INDEX_NAME
            else f
        ),
    )


def _flip(
    offset_from_end: int | None = None, offset: int | None = None
) -> Callable[[bytes], bytes]:
    def fn(raw: bytes) -> bytes:
        data = bytearray(raw)
        pos = offset if offset is not None else len(data) - (offset_from_end or 1)
        data[pos] ^= 0x01
        return bytes(data)

    return fn


@dataclass(frozen=True)
class Damage:
    apply: Callable[[Location], None]
    file: str  # the file every report and error must name
    verify_kind: str  # the Problem.kind verify reports for it
    shallow_sees_it: bool  # sizes/presence reveal it without reading the data


#: damage that makes the files differ from the manifest's list (sizes, a file missing)
SIZE_OR_COUNT_DAMAGE = frozenset({"truncated_shard", "missing_shard", "manifest_lists_wrong_size"})

DAMAGE: dict[str, Damage] = {
    "flipped_bit_in_data": Damage(
        lambda c: _edit(c, SHARD2, _flip(offset_from_end=3)),
        SHARD2,
        "checksum",
        shallow_sees_it=False,
    ),
    "flipped_bit_in_header": Damage(
        lambda c: _edit(c, SHARD2, _flip(offset=8)),  # '{' -> 'z': the JSON header breaks
        SHARD2,
        "checksum",
        shallow_sees_it=False,
    ),
    "truncated_shard": Damage(
        lambda c: _edit(c, SHARD1, lambda raw: raw[:-5]), SHARD1, "size", shallow_sees_it=True
    ),
    "missing_shard": Damage(
        lambda c: c.join(SHARD1).remove(), SHARD1, "missing", shallow_sees_it=True
    ),
    "stale_index_names_absent_file": Damage(
        lambda c: _edit_index(c, lambda wm: wm.update(w3=GHOST_SHARD)),
        GHOST_SHARD,
        "index",
        shallow_sees_it=True,
    ),
    "stale_index_names_absent_key": Damage(
        lambda c: _edit_index(c, lambda wm: wm.update(ghost=SHARD1)),
        SHARD1,
        "index",
        shallow_sees_it=False,
    ),
    "manifest_lists_wrong_size": Damage(
        lambda c: _edit_manifest(
            c, lambda f: FileRecord(f.path, f.nbytes + 1, f.crc32c) if f.path == SHARD1 else f
        ),
        SHARD1,
        "size",
        shallow_sees_it=True,
    ),
}


def _damaged(root: StorageRoot, kind: str, damage: str) -> tuple[str, str]:
    good, bad = save_two(root, kind)
    DAMAGE[damage].apply(Location.parse(bad, root.storage_options))
    root.fs().invalidate_cache()
    return good, bad


# ---- the promises ----------------------------------------------------------------------------

# (root, how it was saved): async saves on S3 are slow (sync on S3 and async on local
# disk stay in the fast lane)
WAYS = [
    pytest.param("local", "sync", id="sync-local"),
    pytest.param("local", "async", id="async-local"),
    pytest.param("s3", "sync", id="sync-s3", marks=pytest.mark.cloud),
    pytest.param("s3", "async", id="async-s3", marks=[pytest.mark.cloud, pytest.mark.slow]),
]


@pytest.mark.parametrize(("storage_root", "kind"), WAYS, indirect=["storage_root"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_verify_names_the_damaged_file(
    storage_root: StorageRoot, kind: str, damage: str, node: str
) -> None:
    spec = DAMAGE[damage]
    good, bad = _damaged(storage_root, kind, damage)
    report = verify_checkpoint(bad, deep=True, storage_options=storage_root.storage_options)
    assert not report.ok
    assert (spec.file, spec.verify_kind) in [(p.path, p.kind) for p in report.problems], report
    assert any(spec.file in p.detail for p in report.problems if p.path == spec.file)
    shallow = verify_checkpoint(bad, deep=False, storage_options=storage_root.storage_options)
    assert shallow.ok is not spec.shallow_sees_it, shallow.problems
    assert verify_checkpoint(good, storage_options=storage_root.storage_options).ok


@pytest.mark.parametrize(("storage_root", "kind"), WAYS, indirect=["storage_root"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_load_checkpoint_detects_and_names_the_file(
    storage_root: StorageRoot, kind: str, damage: str, node: str
) -> None:
    spec = DAMAGE[damage]
    good, bad = _damaged(storage_root, kind, damage)
    opts = storage_root.storage_options
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad, storage_options=opts)
    assert spec.file in str(info.value), f"the error must name {spec.file}: {info.value}"
    assert load_checkpoint(good, storage_options=opts) is not None  # the older one still loads


@pytest.mark.parametrize(("storage_root", "kind"), WAYS, indirect=["storage_root"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_latest_verified_skips_the_damaged_checkpoint(
    storage_root: StorageRoot, kind: str, damage: str, node: str
) -> None:
    spec = DAMAGE[damage]
    good, bad = _damaged(storage_root, kind, damage)
    opts = storage_root.storage_options
    # unverified: a checkpoint whose files do not match its manifest (size, count) is not
    # complete, so discovery skips it even without verify=; other damage needs verify=
    unverified = good if damage in SIZE_OR_COUNT_DAMAGE else bad
    assert find_latest_checkpoint(storage_root.url, storage_options=opts) == unverified
    assert find_latest_verified(storage_root.url, verify="deep", storage_options=opts) == good
    shallow = find_latest_verified(storage_root.url, verify="shallow", storage_options=opts)
    assert shallow == (good if spec.shallow_sees_it else bad)


def test_find_latest_checkpoint_verify_option(tmp_path: os.PathLike[str]) -> None:
    root = StorageRoot("local", str(tmp_path), {})
    good, bad = _damaged(root, "sync", "flipped_bit_in_data")
    assert find_latest_checkpoint(root.url, verify="deep") == good
    assert find_latest_checkpoint(root.url, verify=False) == bad


def test_every_damaged_checkpoint_is_skipped_down_to_none(tmp_path: os.PathLike[str]) -> None:
    """When every checkpoint is damaged there is nothing to resume from: ``None``."""
    root = StorageRoot("local", str(tmp_path), {})
    first, second = save_two(root, "sync")
    for path in (first, second):
        _edit(Location.parse(path), SHARD2, _flip(offset_from_end=1))
    assert find_latest_verified(root.url) is None
