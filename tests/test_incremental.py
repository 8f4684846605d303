"""Incremental saves: frozen shards are hard-linked / copied server-side, never rewritten,
and every checkpoint stays complete and loadable on its own. Real node writer processes,
real local disk, moto S3 and fake-gcs-server."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StorageRoot
from safetensors.torch import load_file

from ckptsvc.compat.training_state import SimpleStatefulProvider
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, SaveHandle, load_state
from ckptsvc.format.layout import SAFE_WEIGHTS_INDEX_NAME
from ckptsvc.manager import CheckpointConfig, CheckpointManager
from ckptsvc.ops.retention import delete_checkpoint
from ckptsvc.read.discovery import next_checkpoint_path, read_manifest
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.stage.flatten import flatten_state
from ckptsvc.storage import Location
from ckptsvc.storage.copies import CopyMethod, copy_file
from ckptsvc.tools.bench_incremental import LoraLike, measure_incremental
from ckptsvc.tools.bench_report import incremental_target

SHARD = 40_000  # bytes per shard: several frozen shards for the small model below


pytestmark = pytest.mark.usefixtures("node")  # a private node writer per test (conftest)


def lora(seed: int = 0) -> LoraLike:
    return LoraLike(layers=6, dim=64, rank=3, seed=seed)  # ~90% of the bytes frozen


def frozen_share(model: torch.nn.Module) -> float:
    sizes = [(p.numel() * p.element_size(), p.requires_grad) for p in model.parameters()]
    return sum(n for n, g in sizes if not g) / sum(n for n, _ in sizes)


def shard_files(ckpt: str) -> dict[str, str]:
    """{tensor: file} of a local checkpoint's index."""
    with open(os.path.join(ckpt, SAFE_WEIGHTS_INDEX_NAME)) as f:
        return dict(json.load(f)["weight_map"])


def assert_loads(handle: SaveHandle, model: torch.nn.Module, opts: dict[str, Any] | None = None):
    got = load_state(handle.path, storage_options=opts)["model"]
    want = model.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    report = verify_checkpoint(handle.path, storage_options=opts)
    assert report.ok, report.problems


def assert_hf_readable(ckpt: str, model: torch.nn.Module, *, prefix: str = "") -> None:
    """Every shard loads with safetensors alone; the index maps every tensor."""
    weight_map = shard_files(ckpt)
    want = {prefix + k: v for k, v in model.state_dict().items()}
    assert set(weight_map) == set(want)
    seen: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        seen.update(load_file(os.path.join(ckpt, name)))
    assert set(seen) == set(want)
    for k, v in want.items():
        assert torch.equal(seen[k], v), k


def test_frozen_parameters_are_found_and_get_shards_of_their_own() -> None:
    model = lora()
    flat = flatten_state({"model": model})
    assert flat.frozen == {
        n for n, p in model.named_parameters(prefix="model") if not p.requires_grad
    }
    kept = flatten_state({"model": model.state_dict(keep_vars=True)})
    assert kept.frozen == flat.frozen  # nn.Parameter values carry requires_grad too
    assert flatten_state({"model": model.state_dict()}).frozen == frozenset()  # detached


def test_second_save_writes_only_the_trainable_shards(tmp_path: Path) -> None:
    model = lora()
    assert frozen_share(model) >= 0.9
    with AsyncCheckpointer(tmp_path, max_shard_size=SHARD) as ckpt:
        first = ckpt.save(1, {"model": model})
        first.wait()
        model.trainable_step()
        second = ckpt.save(2, {"model": model})
        second.wait()
    full = first.timings
    inc = second.timings
    assert full.nbytes_reused == 0 and full.nbytes_written == sum(f.nbytes for f in first.files)
    assert inc.nbytes_written is not None and inc.nbytes_reused is not None
    assert inc.nbytes_written + inc.nbytes_reused == sum(f.nbytes for f in second.files)
    assert inc.nbytes_written <= 0.15 * full.nbytes_written

    weight_map = shard_files(second.path)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    frozen_shards = {weight_map[n] for n in frozen}
    trainable_shards = set(weight_map.values()) - frozen_shards
    assert frozen_shards and trainable_shards
    assert inc.nbytes_reused == sum(f.nbytes for f in second.files if f.path in frozen_shards)
    for name in frozen_shards:  # the same inode, linked
        a, b = os.stat(os.path.join(first.path, name)), os.stat(os.path.join(second.path, name))
        assert a.st_ino == b.st_ino and b.st_nlink == 2, name
    for name in trainable_shards:  # written anew
        a, b = os.stat(os.path.join(first.path, name)), os.stat(os.path.join(second.path, name))
        assert a.st_ino != b.st_ino and b.st_nlink == 1, name
    assert {f.path: f for f in second.files} == {
        f.path: f for f in read_manifest(Location.parse(second.path)).files
    }
    assert_loads(second, model)
    assert_hf_readable(second.path, model)


def test_a_changed_frozen_tensor_is_written_not_linked(tmp_path: Path) -> None:
    model = lora()
    with AsyncCheckpointer(tmp_path, max_shard_size=SHARD) as ckpt:
        first = ckpt.save(1, {"model": model})
        first.wait()
        with torch.no_grad():
            model.base[0].weight[0, 0] += 1.0  # the user edited a frozen weight in place
        second = ckpt.save(2, {"model": model})
        second.wait()
        assert_loads(second, model)
        model.base[1].requires_grad_(True)  # ... then unfroze a layer: the layout changes
        model.trainable_step()
        third = ckpt.save(3, {"model": model})
        third.wait()
    edited = shard_files(second.path)["base.0.weight"]
    a, b = os.stat(os.path.join(first.path, edited)), os.stat(os.path.join(second.path, edited))
    assert a.st_ino != b.st_ino and b.st_nlink == 1
    assert second.timings.nbytes_reused > 0  # the other frozen shards were linked
    assert_loads(third, model)
    assert_hf_readable(third.path, model)
    assert verify_checkpoint(first.path).ok


def test_base_deleted_before_the_next_save_means_bytes_are_written(tmp_path: Path) -> None:
    model = lora()
    with AsyncCheckpointer(tmp_path, max_shard_size=SHARD) as ckpt:
        first = ckpt.save(1, {"model": model})
        first.wait()
        second = ckpt.save(2, {"model": model})
        second.wait()
        assert second.timings.nbytes_reused
        delete_checkpoint(second.path)  # retention removed the base meanwhile
        model.trainable_step()
        third = ckpt.save(3, {"model": model})
        third.wait()
        assert third.timings.nbytes_reused == 0
        assert third.timings.nbytes_written == sum(f.nbytes for f in third.files)
        fourth = ckpt.save(4, {"model": model})  # and the next save links from the third
        fourth.wait()
        assert fourth.timings.nbytes_reused
    assert_loads(fourth, model)
    assert verify_checkpoint(first.path).ok  # deleting a linked copy left the first intact


def test_a_base_file_that_cannot_be_copied_is_written(tmp_path: Path) -> None:
    model = lora()
    with AsyncCheckpointer(tmp_path, max_shard_size=SHARD) as ckpt:
        first = ckpt.save(1, {"model": model})
        first.wait()
        frozen_file = shard_files(first.path)["base.0.weight"]
        os.unlink(os.path.join(first.path, frozen_file))  # damaged base: link fails
        second = ckpt.save(2, {"model": model})
        second.wait()
    record = next(f for f in second.files if f.path == frozen_file)
    assert second.timings.nbytes_written >= record.nbytes
    assert second.timings.nbytes_reused  # the other frozen shards still linked
    assert_loads(second, model)


def test_deleting_the_base_leaves_the_new_checkpoint_complete(tmp_path: Path) -> None:
    model = lora()
    with AsyncCheckpointer(tmp_path, max_shard_size=SHARD) as ckpt:
        first = ckpt.save(1, {"model": model})
        first.wait()
        model.trainable_step()
        second = ckpt.save(2, {"model": model})
        second.wait()
    delete_checkpoint(first.path)
    assert not os.path.exists(first.path)
    assert_loads(second, model)
    assert_hf_readable(second.path, model)


def test_overwriting_a_checkpoint_never_changes_one_that_shares_its_files(tmp_path: Path) -> None:
    model = lora()
    with AsyncCheckpointer(tmp_path, max_shard_size=SHARD) as ckpt:
        ckpt.save(1, {"model": model}).wait()
        second = ckpt.save(2, {"model": model})
        second.wait()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for lin in model.base:
                lin.weight.mul_(-1.0)  # every frozen shard changes
        again = ckpt.save(1, {"model": model}, overwrite=True)  # checkpoint-1 replaced
        again.wait()
    assert again.path == next_checkpoint_path(str(tmp_path), 1)
    assert verify_checkpoint(second.path).ok  # its linked files were not written through
    got = load_state(second.path)["model"]
    assert all(torch.equal(got[k], v) for k, v in saved.items())
    assert_loads(again, model)


def test_incremental_off_writes_everything(tmp_path: Path) -> None:
    model = lora()
    with AsyncCheckpointer(tmp_path, max_shard_size=SHARD, incremental=False) as ckpt:
        ckpt.save(1, {"model": model}).wait()
        second = ckpt.save(2, {"model": model})
        second.wait()
    assert second.timings.nbytes_reused == 0
    assert all(os.stat(os.path.join(second.path, f.path)).st_nlink == 1 for f in second.files)


def test_copy_file_local_link_and_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    src = Location.parse(str(tmp_path / "a" / "x.bin"))
    os.makedirs(os.path.dirname(src.path))
    src.publish(b"hello" * 100)
    dst = Location.parse(str(tmp_path / "b" / "x.bin"))
    dst.publish(b"old")  # an existing target is replaced, not written through
    old_ino = os.stat(dst.path).st_ino
    assert copy_file(src, dst) is CopyMethod.LINK
    assert os.stat(dst.path).st_ino == os.stat(src.path).st_ino != old_ino

    def refuse(*a: Any, **k: Any) -> None:
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    other = Location.parse(str(tmp_path / "c" / "x.bin"))
    assert copy_file(src, other, allow_plain_copy=False) is None
    assert not os.path.exists(other.path) and os.listdir(os.path.dirname(other.path)) == []
    assert copy_file(src, other) is CopyMethod.PLAIN
    assert other.read_bytes() == src.read_bytes()
    assert os.stat(other.path).st_ino != os.stat(src.path).st_ino


def test_copy_file_s3_multipart_copy(s3_root: StorageRoot) -> None:
    data = os.urandom(11 << 20)
    src = s3_root.location("a", "x.bin")
    src.publish(data)
    dst = s3_root.location("b", "x.bin")
    method = copy_file(src, dst, multipart_threshold_bytes=1, part_bytes=5 << 20)
    assert method is CopyMethod.SERVER
    assert dst.read_bytes() == data
    small = s3_root.location("c", "y.bin")
    assert copy_file(src, small) is CopyMethod.SERVER  # one CopyObject
    assert small.size() == len(data)


@pytest.mark.parametrize("storage_root", ["s3", "gcs"], indirect=True)
def test_incremental_saves_on_object_stores(storage_root: StorageRoot) -> None:
    opts = storage_root.storage_options
    model = lora()
    with AsyncCheckpointer(storage_root.url, max_shard_size=SHARD, storage_options=opts) as ckpt:
        first = ckpt.save(1, {"model": model})
        first.wait()
        model.trainable_step()
        second = ckpt.save(2, {"model": model})
        second.wait()
    assert second.timings.nbytes_reused
    assert second.timings.nbytes_written <= 0.15 * first.timings.nbytes_written
    assert_loads(second, model, opts)
    delete_checkpoint(first.path, storage_options=opts)
    assert_loads(second, model, opts)  # the copies are objects of their own


def trainer_manager(root: str, model: LoraLike) -> CheckpointManager:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    cfg = CheckpointConfig(output_dir=root, save_total_limit=None, max_shard_size=SHARD)
    return CheckpointManager(
        config=cfg, stateful_provider=SimpleStatefulProvider({"optimizer": opt}), model=model
    )


def test_manager_links_frozen_shards_after_a_resume(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    model = lora()
    with trainer_manager(root, model) as mgr:
        first = mgr.save_checkpoint(checkpoint_id=1)
        handle = mgr.last_handle
        mgr.wait()
        assert handle.timings.nbytes_reused == 0
    resumed = lora(seed=1)  # a new process: other initial values, restored from the checkpoint
    with trainer_manager(root, resumed) as mgr:
        assert mgr.load_checkpoint() == first
        resumed.trainable_step()
        second = mgr.save_checkpoint(checkpoint_id=2)
        handle = mgr.last_handle
        mgr.wait()
        timings = handle.timings
        third = mgr.save_checkpoint(checkpoint_id=3)  # base: the manager's own last save
        handle = mgr.last_handle
        mgr.wait()
        assert handle.timings.nbytes_reused == timings.nbytes_reused
    assert timings.nbytes_reused and timings.nbytes_written < timings.nbytes_reused
    weight_map = shard_files(second)
    name = weight_map["base.0.weight"]
    assert os.stat(os.path.join(first, name)).st_ino == os.stat(os.path.join(third, name)).st_ino
    for path in (first, second, third):
        assert verify_checkpoint(path).ok
    assert_hf_readable(third, resumed)


def test_bench_probe_meets_the_target(tmp_path: Path) -> None:
    row = measure_incremental(str(tmp_path), nbytes=4 << 20, layers=4)
    assert row.status == "ok", row.reason
    assert 0.85 <= row.extras["frozen_fraction"] <= 0.95
    target = incremental_target(row)
    assert target.verdict == "PASS", target
    assert row.extras["incremental_reused_nbytes"] > 0


def test_bench_incremental_cli_writes_json(tmp_path: Path) -> None:
    from ckptsvc.tools import bench

    out = tmp_path / "inc.json"
    argv = ["--incremental", "--size", "2MiB", "--dir", str(tmp_path), "--json", str(out)]
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    (target,) = doc["targets"]
    assert row["method"] == "ckptsvc_incremental" and target["verdict"] == "PASS"
    assert row["extras"]["written_ratio"] <= 0.15
    assert [p.name for p in tmp_path.iterdir()] == ["inc.json"]  # scratch removed
