"""The Forgather-compatible sync API (``ckptsvc.sharded_checkpoint``): round trips on every
storage backend, both formats, sharding, ``keys=``, strict/non-strict, ``assign``, tied
weights, the commit order (marker, shards, index, manifest last), clear errors, legacy
layouts, and the Forgather helper functions with their exact signatures."""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import StorageRoot, unfinished_save
from helpers_models import (
    TiedLM,
    TinyMLP,
    assert_bitwise_equal,
    assert_state_dicts_bitwise_equal,
    mixed_state_dict,
    random_tensor,
)
from torch import nn

import ckptsvc.sharded_checkpoint as sc
from ckptsvc.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidStateError,
)
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME
from ckptsvc.read.discovery import read_manifest
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.storage import Location
from ckptsvc.workers.latest_pointer import POINTER_NAME

SHARD_RE = re.compile(r"^(model|pytorch_model)-(\d{5})-of-(\d{5})\.(safetensors|bin)$")
FORMATS = [pytest.param(True, id="safetensors"), pytest.param(False, id="torch")]


# ---- helpers ---------------------------------------------------------------------------------


def files_of(loc: Location) -> dict[str, int]:
    """{relative path: size} of every file under a checkpoint, on any backend."""
    if not loc.is_local:
        loc.fs.invalidate_cache()
    return dict(loc.walk_files())


def shard_names(files: dict[str, int]) -> list[str]:
    return sorted(f for f in files if SHARD_RE.match(f))


def fresh_mlp(seed: int = 123) -> TinyMLP:
    """Same architecture, different values: a load that does nothing cannot pass."""
    return TinyMLP(seed=seed)


def module_sd(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_manifest_matches_files(loc: Location) -> None:
    """The manifest lists every data file with its true size and CRC-32C; nothing else
    lies in the directory except the manifest itself; the marker is gone."""
    manifest = read_manifest(loc)
    assert manifest is not None, f"{loc.url}: no manifest after save"
    on_disk = files_of(loc)
    assert MARKER_NAME not in on_disk, "the in-progress marker must be removed after commit"
    listed = {f.path: f for f in manifest.files}
    assert set(listed) == set(on_disk) - {MANIFEST_NAME}, "manifest lists exactly the files"
    for path, rec in listed.items():
        data = loc.join(path).read_bytes()
        assert rec.nbytes == len(data) == on_disk[path], path
        assert rec.crc32c == crc32c_hex(data), path


# ---- round trips on every backend ------------------------------------------------------------


@pytest.mark.parametrize("safetensors", FORMATS)
def test_module_round_trip_sharded(storage_root: StorageRoot, safetensors: bool) -> None:
    url, opts = storage_root.join("ckpt"), storage_root.storage_options
    src = TinyMLP(seed=0)
    sc.save_checkpoint(url, src, safetensors=safetensors, max_shard_size=1200, storage_options=opts)

    loc = Location.parse(url, opts)
    files = files_of(loc)
    shards = shard_names(files)
    assert len(shards) >= 3, f"expected several shards at max_shard_size=1200, got {shards}"
    assert all(s.endswith(".safetensors" if safetensors else ".bin") for s in shards)
    assert sc.index_file_name(safetensors) in files
    meta = sc.get_checkpoint_metadata(url, storage_options=opts)
    assert meta == sc.CheckpointMeta(sc.index_file_name(safetensors), True, safetensors)
    assert sc.validate_checkpoint(url, storage_options=opts)
    assert_manifest_matches_files(loc)

    dst = fresh_mlp()
    assert sc.load_checkpoint(url, dst, storage_options=opts) is None
    assert_state_dicts_bitwise_equal(module_sd(dst), module_sd(src))
    raw = sc.load_checkpoint(url, storage_options=opts)
    assert isinstance(raw, dict)
    assert_state_dicts_bitwise_equal(raw, module_sd(src))
    assert verify_checkpoint(url, storage_options=opts).ok


@pytest.mark.parametrize("safetensors", FORMATS)
def test_raw_state_dict_round_trip(storage_root: StorageRoot, safetensors: bool) -> None:
    url, opts = storage_root.join("raw"), storage_root.storage_options
    sd = mixed_state_dict(seed=3)
    sc.save_checkpoint(url, sd, safetensors=safetensors, max_shard_size=256, storage_options=opts)
    got = sc.load_checkpoint(url, storage_options=opts)
    assert isinstance(got, dict)
    assert_state_dicts_bitwise_equal(got, sd)
    index = sc.load_shard_index(url, sc.index_file_name(safetensors), storage_options=opts)
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert len(set(index["weight_map"].values())) >= 2


def test_tied_weights_on_every_backend(storage_root: StorageRoot) -> None:
    url, opts = storage_root.join("tied"), storage_root.storage_options
    src = TiedLM(seed=0)
    sc.save_checkpoint(url, src, safetensors=True, storage_options=opts)
    dst = TiedLM(seed=9)
    dst.head.weight = nn.Parameter(dst.head.weight.detach().clone())  # untie: load must re-tie
    sc.load_checkpoint(url, dst, storage_options=opts)
    assert dst.head.weight is dst.embed.weight
    assert_bitwise_equal(dst.embed.weight, src.embed.weight)
    assert_bitwise_equal(dst.body.weight, src.body.weight)


# ---- tied weights ----------------------------------------------------------------------------


def test_tied_weights_stored_once_and_recorded(tmp_path: Path) -> None:
    d = str(tmp_path / "ckpt")
    src = TiedLM(seed=0)
    sc.save_checkpoint(d, src, safetensors=True)
    index = sc.load_shard_index(d, sc.SAFE_WEIGHTS_INDEX_NAME)
    assert index["metadata"]["param_sharing"] == [["embed.weight", "head.weight"]]
    stored = [k for k in index["weight_map"] if k in ("embed.weight", "head.weight")]
    assert len(stored) == 1, f"tied weight stored {len(stored)} times"
    on_disk: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        on_disk.update(safetensors.torch.load_file(os.path.join(d, shard)))
    assert sorted(on_disk) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in on_disk.values()
    )
    # raw load returns both names, the same values
    raw = sc.load_checkpoint(d)
    assert isinstance(raw, dict)
    assert set(raw) == set(src.state_dict())
    assert_bitwise_equal(raw["head.weight"], src.embed.weight)


@pytest.mark.parametrize("safetensors", FORMATS)
@pytest.mark.parametrize("assign", [False, True])
def test_tied_weights_retied_after_load(tmp_path: Path, safetensors: bool, assign: bool) -> None:
    d = str(tmp_path / "ckpt")
    src = TiedLM(seed=0)
    sc.save_checkpoint(d, src, safetensors=safetensors)
    dst = TiedLM(seed=5)
    sc.load_checkpoint(d, dst, assign=assign)
    assert dst.head.weight is dst.embed.weight, "tied parameters must be one tensor after load"
    assert_bitwise_equal(dst.head.weight, src.embed.weight)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(dst(ids), src(ids))


def test_tied_saves_are_deterministic(tmp_path: Path) -> None:
    """Same module, two saves: identical index and shard bytes (Forgather's tied-name order
    came from a set and changed between runs)."""
    outs = []
    for i in range(2):
        d = tmp_path / f"c{i}"
        sc.save_checkpoint(str(d), TiedLM(seed=0), safetensors=True, max_shard_size=600)
        outs.append({p.name: p.read_bytes() for p in d.iterdir() if p.name not in (MANIFEST_NAME,)})
    assert outs[0] == outs[1]
    assert sc.create_sharing_metadata(TiedLM()) == [["embed.weight", "head.weight"]]


def test_hf_style_tied_checkpoint_without_sharing_metadata(tmp_path: Path) -> None:
    """A single-file checkpoint that omits the alias (as HF save_pretrained does) loads
    strictly into a tied module."""
    src = TiedLM(seed=0)
    sd = {k: v for k, v in src.state_dict().items() if k != "head.weight"}
    tmp_path.mkdir(exist_ok=True)
    safetensors.torch.save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    dst = TiedLM(seed=4)
    sc.load_checkpoint(str(tmp_path), dst)
    assert dst.head.weight is dst.embed.weight
    assert_bitwise_equal(dst.head.weight, src.embed.weight)


def test_raw_dict_with_aliases_is_saved_once(tmp_path: Path) -> None:
    t = random_tensor(torch.float32, (4, 4), seed=1)
    sd = {"a.weight": t, "b.weight": t, "c": random_tensor(torch.float32, (2,), seed=2)}
    d = str(tmp_path / "ckpt")
    sc.save_checkpoint(d, sd, safetensors=True)  # the reference writer would refuse shared storage
    index = sc.load_shard_index(d, sc.SAFE_WEIGHTS_INDEX_NAME)
    assert index["metadata"]["param_sharing"] == [["a.weight", "b.weight"]]
    got = sc.load_checkpoint(d)
    assert isinstance(got, dict)
    assert_state_dicts_bitwise_equal(got, {k: v.clone() for k, v in sd.items()})


def test_partial_views_of_one_storage_are_separate_tensors(tmp_path: Path) -> None:
    base = random_tensor(torch.float32, (32,), seed=7)
    sd = {"first": base[:16], "second": base[8:24], "strided": base[::4]}
    d = str(tmp_path / "ckpt")
    sc.save_checkpoint(d, sd, safetensors=True)
    index = sc.load_shard_index(d, sc.SAFE_WEIGHTS_INDEX_NAME)
    assert "param_sharing" not in index["metadata"]
    assert index["metadata"]["total_size"] == 4 * (16 + 16 + 8)
    got = sc.load_checkpoint(d)
    assert isinstance(got, dict)
    assert_state_dicts_bitwise_equal(got, {k: v.contiguous() for k, v in sd.items()})


def test_retie_parameters_and_name_helpers() -> None:
    m = TiedLM(seed=0)
    assert sc.id_to_fqn(m)[id(m.embed.weight)] == {"embed.weight", "head.weight"}
    assert {"embed.weight", "head.weight", "body.weight", "body.bias"} <= sc.get_all_fqns(m)
    mlp = TinyMLP()
    assert "scratch" in sc.get_all_fqns(mlp) and "scratch" not in mlp.state_dict()
    groups = [["head.weight", "embed.weight"], ["not.there", "also.not"]]
    cnames = sc.make_cannonical_names(sc.get_all_fqns(m), groups)
    assert cnames == {"head.weight": ["embed.weight"]}, (
        "canonical = first present name, in group order"
    )
    assert sc.map_cannonical_names(cnames) == {"embed.weight": "head.weight"}
    m.head.weight = nn.Parameter(m.head.weight.detach().clone())
    assert m.head.weight is not m.embed.weight
    sc.retie_parameters(m, [["embed.weight", "head.weight"]])
    assert m.head.weight is m.embed.weight


# ---- keys, strict, assign --------------------------------------------------------------------


@pytest.mark.parametrize("safetensors", FORMATS)
def test_keys_filter(tmp_path: Path, safetensors: bool) -> None:
    d = str(tmp_path / "ckpt")
    src = TinyMLP(seed=0)
    sc.save_checkpoint(d, src, safetensors=safetensors, max_shard_size=1000)
    got = sc.load_checkpoint(d, keys={"fc1.weight", "running", "not.in.checkpoint"})
    assert isinstance(got, dict)
    assert sorted(got) == ["fc1.weight", "running"]
    assert_bitwise_equal(got["fc1.weight"], src.fc1.weight.detach())
    assert sc.load_checkpoint(d, keys=set()) == {}


class MLPWithExtra(TinyMLP):
    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.extra = nn.Linear(2, 2)


@pytest.mark.parametrize("safetensors", FORMATS)
def test_strict_load_reports_missing_keys(tmp_path: Path, safetensors: bool) -> None:
    d = str(tmp_path / "ckpt")
    sc.save_checkpoint(d, TinyMLP(seed=0), safetensors=safetensors)
    with pytest.raises(CheckpointError, match=r"extra\.(weight|bias)") as info:
        sc.load_checkpoint(d, MLPWithExtra(seed=1), strict=True)
    assert d in str(info.value) or os.path.abspath(d) in str(info.value)


@pytest.mark.parametrize("safetensors", FORMATS)
def test_non_strict_load_loads_what_is_there(tmp_path: Path, safetensors: bool) -> None:
    d = str(tmp_path / "ckpt")
    src = TinyMLP(seed=0)
    sc.save_checkpoint(d, src, safetensors=safetensors, max_shard_size=1000)
    dst = MLPWithExtra(seed=1)
    extra_before = module_sd(dst.extra)
    assert sc.load_checkpoint(d, dst, strict=False) is None
    sd = module_sd(dst)
    assert_state_dicts_bitwise_equal(
        {k: v for k, v in sd.items() if not k.startswith("extra.")}, module_sd(src)
    )
    assert_state_dicts_bitwise_equal(module_sd(dst.extra), extra_before)
    index = sc.load_shard_index(d, sc.index_file_name(safetensors))
    unloaded = sc.load_sharded_checkpoint(
        d, index, MLPWithExtra(seed=2), safetensors=safetensors, strict=False
    )
    assert unloaded == {"extra.weight", "extra.bias"}


def test_checkpoint_with_more_keys_than_module_loads_strictly(tmp_path: Path) -> None:
    d = str(tmp_path / "ckpt")
    src = MLPWithExtra(seed=0)
    sc.save_checkpoint(d, src, safetensors=True)
    dst = fresh_mlp()
    sc.load_checkpoint(d, dst, strict=True)  # the index may be a superset (Forgather semantics)
    assert_bitwise_equal(dst.fc2.weight, src.fc2.weight)


@pytest.mark.parametrize("safetensors", FORMATS)
def test_assign_loads_into_meta_module(tmp_path: Path, safetensors: bool) -> None:
    d = str(tmp_path / "ckpt")
    src = TinyMLP(seed=0)
    sc.save_checkpoint(d, src, safetensors=safetensors)
    with torch.device("meta"):
        dst = TinyMLP(seed=0)
    sc.load_checkpoint(d, dst, assign=True)
    for k, v in dst.state_dict().items():
        assert v.device.type == "cpu", k
    assert_state_dicts_bitwise_equal(module_sd(dst), module_sd(src))
    assert isinstance(dst.fc1.weight, nn.Parameter)


def test_assign_false_copies_into_existing_storage(tmp_path: Path) -> None:
    d = str(tmp_path / "ckpt")
    sc.save_checkpoint(d, TinyMLP(seed=0), safetensors=True)
    dst = fresh_mlp()
    ptr = dst.fc1.weight.data_ptr()
    sc.load_checkpoint(d, dst, assign=False)
    assert dst.fc1.weight.data_ptr() == ptr


# ---- metadata, commit order, determinism -----------------------------------------------------


def test_caller_metadata_is_not_mutated(tmp_path: Path) -> None:
    meta = {"dtype": "float32", "nested": {"a": [1, 2]}}
    before = copy.deepcopy(meta)
    d = str(tmp_path / "ckpt")
    sc.save_checkpoint(d, TiedLM(), metadata=meta, safetensors=True)
    assert meta == before
    index = sc.load_shard_index(d, sc.SAFE_WEIGHTS_INDEX_NAME)
    assert index["metadata"]["dtype"] == "float32" and index["metadata"]["nested"] == {"a": [1, 2]}
    assert "total_size" in index["metadata"] and "param_sharing" in index["metadata"]
    sc.save_checkpoint(str(tmp_path / "again"), TiedLM(), metadata=meta, safetensors=True)
    assert meta == before


def test_param_sharing_can_be_disabled_or_given(tmp_path: Path) -> None:
    d1 = str(tmp_path / "off")
    sc.save_checkpoint(d1, TinyMLP(), safetensors=True, include_param_sharing=False)
    assert "param_sharing" not in sc.load_shard_index(d1, sc.SAFE_WEIGHTS_INDEX_NAME)["metadata"]
    d2 = str(tmp_path / "given")
    sc.save_checkpoint(
        d2, TiedLM(), safetensors=True, param_sharing_metadata=[["embed.weight", "head.weight"]]
    )
    assert sc.load_shard_index(d2, sc.SAFE_WEIGHTS_INDEX_NAME)["metadata"]["param_sharing"] == [
        ["embed.weight", "head.weight"]
    ]


class _Recorder:
    """Wraps Location's write entry points to log the order of durable writes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str]] = []
        publish, open_sink, remove = Location.publish, Location.open_sink, Location.remove
        create = Location.create_exclusive
        rec = self

        def _publish(loc: Location, data: bytes) -> None:
            publish(loc, data)
            rec.events.append(("publish", loc.name))

        def _create(loc: Location, data: bytes) -> bool:
            created = create(loc, data)
            rec.events.append(("create", loc.name))
            return created

        def _remove(loc: Location, **kw: Any) -> None:
            remove(loc, **kw)
            rec.events.append(("remove", loc.name))

        def _open_sink(loc: Location, **kw: Any) -> Any:
            sink = open_sink(loc, **kw)
            close = sink.close

            def _close() -> None:
                close()
                rec.events.append(("durable", loc.name))

            sink.close = _close
            rec.events.append(("open", loc.name))
            return sink

        monkeypatch.setattr(Location, "publish", _publish)
        monkeypatch.setattr(Location, "create_exclusive", _create)
        monkeypatch.setattr(Location, "remove", _remove)
        monkeypatch.setattr(Location, "open_sink", _open_sink)

    def first(self, kind: str, name: str) -> int:
        return self.events.index((kind, name))


@pytest.mark.parametrize("safetensors", FORMATS)
def test_commit_order_marker_shards_index_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, safetensors: bool
) -> None:
    rec = _Recorder(monkeypatch)
    d = str(tmp_path / "ckpt")
    sc.save_checkpoint(d, TinyMLP(), safetensors=safetensors, max_shard_size=1000)
    index = sc.index_file_name(safetensors)
    names = [n for _, n in rec.events]
    shards = sorted({n for n in names if SHARD_RE.match(n)})
    assert len(shards) >= 2
    marker = rec.first("create", MARKER_NAME)
    assert marker == 0, f"the marker (the save's claim) must be written first: {rec.events}"
    manifest = rec.first("publish", MANIFEST_NAME)
    # the index depends on no shard byte: it is published while the shards stream (as the
    # node writer does), but after the claim and before the manifest
    for s in shards:
        assert marker < rec.first("open", s) < rec.first("durable", s) < manifest, s
    assert marker < rec.first("publish", index) < manifest, "index after the claim, before manifest"
    assert manifest < rec.first("remove", MARKER_NAME), "marker removed only after the manifest"
    assert manifest == max(
        i for i, e in enumerate(rec.events) if e[0] in ("publish", "create", "durable", "open")
    )


def test_failed_overwrite_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save into a path that already holds a checkpoint and dies midway leaves the old,
    complete checkpoint as it was (the new one was written beside it), and no debris."""
    d = str(tmp_path / "ckpt")
    old = TinyMLP(seed=0)
    sc.save_checkpoint(d, old, safetensors=True, max_shard_size=1000)
    assert sc.validate_checkpoint(d)

    import ckptsvc.workers.shard_writer as sw

    real = sw.write_stream
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("injected: disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(sw, "write_stream", flaky)
    with pytest.raises(OSError, match="injected"):
        sc.save_checkpoint(d, TinyMLP(seed=1), safetensors=True, max_shard_size=1000)
    monkeypatch.undo()
    assert sc.validate_checkpoint(d)
    assert verify_checkpoint(d, deep=True).ok
    dst = fresh_mlp()
    sc.load_checkpoint(d, dst)
    assert all(
        torch.equal(a, b)
        for a, b in zip(dst.state_dict().values(), old.state_dict().values(), strict=True)
    )
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_overwrite_with_fewer_shards(tmp_path: Path) -> None:
    d = str(tmp_path / "ckpt")
    sc.save_checkpoint(d, TinyMLP(seed=0), safetensors=True, max_shard_size=500)
    src = TinyMLP(seed=1)
    sc.save_checkpoint(d, src, safetensors=True)
    dst = fresh_mlp()
    sc.load_checkpoint(d, dst)
    assert_state_dicts_bitwise_equal(module_sd(dst), module_sd(src))
    manifest = read_manifest(Location.parse(d))
    assert manifest is not None
    assert {f.path for f in manifest.files} == {
        "model-00001-of-00001.safetensors",
        sc.SAFE_WEIGHTS_INDEX_NAME,
    }


def test_manifest_records_step_and_versions(tmp_path: Path) -> None:
    d = str(tmp_path / "ckpt")
    sc.save_checkpoint(d, TinyMLP(), safetensors=True)
    doc = json.loads((tmp_path / "ckpt" / MANIFEST_NAME).read_text())
    assert doc["pytorch_version"] == torch.__version__
    assert doc["world_size"] == 1
    assert os.path.abspath(doc["checkpoint_path"]) == os.path.abspath(d)
    from datetime import datetime

    datetime.fromisoformat(doc["timestamp"])  # Forgather parses it this way


# ---- errors ----------------------------------------------------------------------------------


def test_missing_checkpoint_is_file_not_found_with_path(tmp_path: Path) -> None:
    for path in (tmp_path / "does-not-exist", tmp_path):
        with pytest.raises(FileNotFoundError) as info:
            sc.load_checkpoint(str(path), fresh_mlp())
        assert isinstance(info.value, CheckpointError)
        assert str(path) in str(info.value)
    with pytest.raises(CheckpointNotFoundError):
        sc.load_checkpoint(str(tmp_path))


def test_missing_checkpoint_on_object_store(storage_root_fast: StorageRoot) -> None:
    url = storage_root_fast.join("nothing-here")
    with pytest.raises(FileNotFoundError, match=re.escape(url.rstrip("/"))):
        sc.load_checkpoint(url, storage_options=storage_root_fast.storage_options)


def test_incomplete_checkpoint_error(storage_root_fast: StorageRoot) -> None:
    url, opts = storage_root_fast.join("torn"), storage_root_fast.storage_options
    sc.save_checkpoint(url, TinyMLP(), safetensors=True, storage_options=opts)
    unfinished_save(Location.parse(url, opts))  # a new save started and never finished
    with pytest.raises(IncompleteCheckpointError) as info:
        sc.load_checkpoint(url, fresh_mlp(), storage_options=opts)
    assert isinstance(info.value, FileNotFoundError)
    assert "incomplete" in str(info.value)
    assert not sc.validate_checkpoint(url, storage_options=opts)


def test_truncated_shard_is_corrupt_and_named(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    sc.save_checkpoint(str(d), TinyMLP(), safetensors=True, max_shard_size=1000)
    shard = sorted(p for p in d.iterdir() if SHARD_RE.match(p.name))[-1]
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(CorruptCheckpointError, match=re.escape(shard.name)):
        sc.load_checkpoint(str(d), fresh_mlp())
    report = verify_checkpoint(str(d), deep=False)
    assert not report.ok
    assert [(p.path, p.kind) for p in report.problems] == [(shard.name, "size")]


def test_flipped_byte_is_caught_by_verify(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    sc.save_checkpoint(str(d), TinyMLP(), safetensors=True, max_shard_size=1000)
    shard = sorted(p for p in d.iterdir() if SHARD_RE.match(p.name))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(str(d), deep=False).ok, "a shallow check sees sizes only"
    deep = verify_checkpoint(str(d), deep=True)
    assert not deep.ok
    assert [(p.path, p.kind) for p in deep.problems] == [(shard.name, "checksum")]


def test_missing_shard(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    sc.save_checkpoint(str(d), TinyMLP(), safetensors=False, max_shard_size=1000)
    shard = sorted(p for p in d.iterdir() if SHARD_RE.match(p.name))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        sc.load_checkpoint(str(d), fresh_mlp())
    report = verify_checkpoint(str(d))
    assert (shard.name, "missing") in [(p.path, p.kind) for p in report.problems]


@pytest.mark.parametrize(
    "evil", ["../outside.safetensors", "/etc/passwd", "s3://elsewhere/x.safetensors", "a\\b"]
)
def test_index_pointing_outside_is_refused(tmp_path: Path, evil: str) -> None:
    d = tmp_path / "ckpt"
    sc.save_checkpoint(str(d), TinyMLP(), safetensors=True)
    index_path = d / sc.SAFE_WEIGHTS_INDEX_NAME
    index = json.loads(index_path.read_text())
    index["weight_map"]["fc1.weight"] = evil
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError):  # the edited index fails its manifest record
        sc.load_checkpoint(str(d), fresh_mlp())
    (d / "checkpoint_manifest.json").unlink()  # without a manifest the path check names the key
    with pytest.raises(CorruptCheckpointError, match=r"fc1\.weight"):
        sc.load_checkpoint(str(d), fresh_mlp())


def test_invalid_state_is_refused_before_writing(tmp_path: Path) -> None:
    cases: dict[str, tuple[Any, bool]] = {
        "not_a_tensor": ({"w": torch.ones(2), "lr": 0.1}, False),
        "complex128_safetensors": ({"w": torch.ones(2, dtype=torch.complex128)}, True),
        "meta_tensor": ({"w": torch.empty(2, device="meta")}, True),
    }
    for name, (sd, use_st) in cases.items():
        d = tmp_path / name
        with pytest.raises(InvalidStateError):
            sc.save_checkpoint(str(d), sd, safetensors=use_st)
        assert not d.exists() or not any(d.iterdir()), f"{name}: nothing may be written"


def test_load_shard_index_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=r"bad\.json"):
        sc.load_shard_index(str(tmp_path), "bad.json")
    (tmp_path / "nowm.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CorruptCheckpointError, match="weight_map"):
        sc.load_shard_index(str(tmp_path), "nowm.json")


# ---- legacy and Forgather-written layouts ----------------------------------------------------


def _legacy_writers() -> dict[str, Callable[[Path, dict[str, torch.Tensor]], None]]:
    def single_st(d: Path, sd: dict[str, torch.Tensor]) -> None:
        safetensors.torch.save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})

    def single_bin(d: Path, sd: dict[str, torch.Tensor]) -> None:
        torch.save(sd, d / "pytorch_model.bin")

    def forgather_sharded(d: Path, sd: dict[str, torch.Tensor], use_st: bool) -> None:
        # Forgather's own save: index first (indent=4), then one reference-writer file per shard
        index = sc.make_shard_index([sd], safetensors=use_st, max_shard_size=600)
        (d / sc.index_file_name(use_st)).write_text(json.dumps(index, indent=4))
        by_file: dict[str, dict[str, torch.Tensor]] = {}
        for k, f in index["weight_map"].items():
            by_file.setdefault(f, {})[k] = sd[k]
        for f, part in by_file.items():
            if use_st:
                safetensors.torch.save_file(part, str(d / f))
            else:
                torch.save(part, d / f)

    return {
        "model.safetensors": single_st,
        "pytorch_model.bin": single_bin,
        "forgather_safetensors_index": lambda d, sd: forgather_sharded(d, sd, True),
        "forgather_torch_index": lambda d, sd: forgather_sharded(d, sd, False),
    }


@pytest.mark.parametrize("layout", sorted(_legacy_writers()))
def test_legacy_layouts_load(tmp_path: Path, layout: str) -> None:
    src = TinyMLP(seed=0)
    sd = module_sd(src)
    _legacy_writers()[layout](tmp_path, sd)
    assert sc.validate_checkpoint(str(tmp_path)), "manifest-less weights are a legacy checkpoint"
    dst = fresh_mlp()
    sc.load_checkpoint(str(tmp_path), dst)
    assert_state_dicts_bitwise_equal(module_sd(dst), sd)
    got = sc.load_checkpoint(str(tmp_path), keys={"fc2.bias"})
    assert isinstance(got, dict) and list(got) == ["fc2.bias"]


def test_detection_order_is_forgathers(tmp_path: Path) -> None:
    assert sc.get_checkpoint_metadata(str(tmp_path)) is None
    assert sc.get_checkpoint_metadata(str(tmp_path / "absent")) is None
    order = [
        ("model.safetensors", sc.CheckpointMeta("model.safetensors", False, True)),
        ("pytorch_model.bin", sc.CheckpointMeta("pytorch_model.bin", False, False)),
        (
            "pytorch_model.bin.index.json",
            sc.CheckpointMeta("pytorch_model.bin.index.json", True, False),
        ),
        (
            "model.safetensors.index.json",
            sc.CheckpointMeta("model.safetensors.index.json", True, True),
        ),
    ]
    for name, expected in order:  # each new file outranks the ones already there
        (tmp_path / name).write_text("{}")
        assert sc.get_checkpoint_metadata(str(tmp_path)) == expected


def test_torch_files_load_with_weights_only(tmp_path: Path) -> None:
    """A .bin holding a non-tensor object (arbitrary pickle) is refused, never executed."""

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"w": torch.ones(1), "x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CorruptCheckpointError, match=r"pytorch_model\.bin"):
        sc.load_checkpoint(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_multi_process_style_save(tmp_path: Path) -> None:
    """Forgather's sharded-model recipe: one index for all parts, each part saved by its
    owner with save_sharded_checkpoint; the result loads as one model."""
    src = TinyMLP(seed=0)
    sd = module_sd(src)
    part0 = {k: v for k, v in sd.items() if k.startswith("fc1.")}
    part1 = {k: v for k, v in sd.items() if k not in part0}
    index = sc.make_shard_index([part0, part1], safetensors=True)
    d = str(tmp_path / "ckpt")
    sc.save_shard_index(index, d, sc.index_file_name(True))
    sc.save_sharded_checkpoint(d, index, part0, safetensors=True)
    sc.save_sharded_checkpoint(d, index, part1, safetensors=True)
    assert len(set(index["weight_map"].values())) == 2
    dst = fresh_mlp()
    sc.load_checkpoint(d, dst)
    assert_state_dicts_bitwise_equal(module_sd(dst), sd)
    got = sc.load_sharded_checkpoint(d, index, None, safetensors=True, keys={"fc2.weight"})
    assert isinstance(got, dict) and list(got) == ["fc2.weight"]


# ---- Forgather helpers -----------------------------------------------------------------------


def test_metrics_round_trip(storage_root_fast: StorageRoot) -> None:
    url, opts = storage_root_fast.join("ckpt"), storage_root_fast.storage_options
    assert sc.load_checkpoint_metrics(url, storage_options=opts) is None
    sc.save_checkpoint_metrics(url, {"loss": 1.5, "acc": 0.25}, storage_options=opts)
    assert sc.load_checkpoint_metrics(url, storage_options=opts) == {"loss": 1.5, "acc": 0.25}
    raw = Location.parse(url, opts).join("eval_metrics.json").read_bytes()
    assert json.loads(raw) == {"loss": 1.5, "acc": 0.25}


def test_validate_output_dir(tmp_path: Path) -> None:
    d = tmp_path / "out"
    sc.validate_output_dir(str(d))  # nothing there: fine
    sc.save_checkpoint(str(d), TinyMLP(), safetensors=True)
    with pytest.raises(FileExistsError, match="out"):
        sc.validate_output_dir(str(d))
    sc.validate_output_dir(str(d), overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="file"):  # Forgather raised a bare Exception
        sc.validate_output_dir(str(tmp_path / "file"))


@pytest.fixture
def model_dir_with_checkpoints(tmp_path: Path) -> Iterator[tuple[Path, list[TinyMLP]]]:
    models = [TinyMLP(seed=i) for i in range(4)]
    for step, m in enumerate(models, start=1):
        sc.save_checkpoint(
            sc.next_checkpoint_path(str(tmp_path), step * 10),
            m,
            safetensors=True,
            max_shard_size=1000,
        )
    yield tmp_path, models


def test_create_pretrained_symlinks(model_dir_with_checkpoints: tuple[Path, list[TinyMLP]]) -> None:
    root, models = model_dir_with_checkpoints
    planned = sc.create_pretrained_symlinks(str(root), dry_run=True)
    assert planned and not any(os.path.lexists(p) for p in planned)
    links = sc.create_pretrained_symlinks(str(root))
    assert sorted(links) == sorted(planned)
    assert str(root / sc.SAFE_WEIGHTS_INDEX_NAME) in links
    for link in links:
        assert os.path.islink(link)
        assert "checkpoint-40" in os.path.realpath(link)
    dst = fresh_mlp()
    sc.load_checkpoint(str(root), dst)
    assert_state_dicts_bitwise_equal(module_sd(dst), module_sd(models[-1]))
    # idempotent over its own symlinks; refuses to clobber a real file
    sc.create_pretrained_symlinks(str(root))
    os.remove(links[0])
    Path(links[0]).write_text("real file")
    with pytest.raises(FileExistsError):
        sc.create_pretrained_symlinks(str(root))
    sc.create_pretrained_symlinks(str(root), force_overwrite=True)
    assert os.path.islink(links[0])


def test_create_pretrained_symlinks_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        sc.create_pretrained_symlinks(str(tmp_path))


def test_maybe_delete_oldest_checkpoint(
    model_dir_with_checkpoints: tuple[Path, list[TinyMLP]],
) -> None:
    root, _ = model_dir_with_checkpoints
    ckpts = root / "checkpoints"
    first = str(ckpts / "checkpoint-10")
    sc.maybe_delete_oldest_checkpoint(str(root), 4)
    listed = [p for p in ckpts.iterdir() if p.name != POINTER_NAME]
    assert len(listed) == 4, "at the limit nothing is deleted"
    sc.maybe_delete_oldest_checkpoint(str(root), 2, preserved_checkpoints=[first])
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "checkpoint-10",
        "checkpoint-40",
        POINTER_NAME,
    ]
    assert sc.find_latest_checkpoint(str(root)) == str(ckpts / "checkpoint-40")
    sc.maybe_delete_oldest_checkpoint(str(root), 1, best_checkpoint=first)
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "checkpoint-10",
        "checkpoint-40",
        POINTER_NAME,
    ], "neither the best nor the newest complete checkpoint is ever deleted"


# ---- API surface: Forgather's names, signatures and defaults ---------------------------------

FORGATHER_SIGNATURES: dict[str, list[tuple[str, Any]]] = {
    "save_checkpoint": [
        ("output_dir", inspect.Parameter.empty),
        ("module", inspect.Parameter.empty),
        ("metadata", None),
        ("safetensors", False),
        ("max_shard_size", 2**31),
        ("debug", False),
        ("include_param_sharing", True),
        ("param_sharing_metadata", None),
    ],
    "load_checkpoint": [
        ("model_dir", inspect.Parameter.empty),
        ("module", None),
        ("device", "cpu"),
        ("strict", True),
        ("assign", False),
        ("keys", None),
    ],
    "load_sharded_checkpoint": [
        ("model_dir", inspect.Parameter.empty),
        ("shard_index", inspect.Parameter.empty),
        ("module", None),
        ("device", "cpu"),
        ("safetensors", False),
        ("strict", True),
        ("assign", False),
        ("debug", False),
        ("keys", None),
    ],
    "save_sharded_checkpoint": [
        ("output_dir", inspect.Parameter.empty),
        ("shard_index", inspect.Parameter.empty),
        ("module", inspect.Parameter.empty),
        ("safetensors", False),
        ("debug", False),
    ],
    "make_shard_index": [
        ("state_dictionaries", inspect.Parameter.empty),
        ("metadata", None),
        ("safetensors", False),
        ("max_shard_size", 2**32),
        ("param_sharing_metadata", None),
    ],
    "save_shard_index": [
        ("shard_index", inspect.Parameter.empty),
        ("output_dir", inspect.Parameter.empty),
        ("index_name", inspect.Parameter.empty),
    ],
    "load_shard_index": [
        ("output_dir", inspect.Parameter.empty),
        ("index_name", inspect.Parameter.empty),
    ],
    "find_latest_checkpoint": [("model_dir", inspect.Parameter.empty)],
    "next_checkpoint_path": [
        ("model_dir", inspect.Parameter.empty),
        ("checkpoint_id", inspect.Parameter.empty),
    ],
    "validate_checkpoint": [("checkpoint_path", inspect.Parameter.empty)],
    "get_checkpoint_metadata": [("path", inspect.Parameter.empty)],
    "validate_output_dir": [("output_dir", inspect.Parameter.empty), ("overwrite", False)],
    "index_file_name": [("safetensors", inspect.Parameter.empty)],
    "save_checkpoint_metrics": [
        ("checkpoint_path", inspect.Parameter.empty),
        ("metrics", inspect.Parameter.empty),
    ],
    "load_checkpoint_metrics": [("checkpoint_path", inspect.Parameter.empty)],
    "maybe_delete_oldest_checkpoint": [
        ("model_dir", inspect.Parameter.empty),
        ("max_checkpoints", inspect.Parameter.empty),
        ("best_checkpoint", None),
        ("preserved_checkpoints", None),
    ],
    "create_pretrained_symlinks": [
        ("model_dir", inspect.Parameter.empty),
        ("force_overwrite", False),
        ("dry_run", False),
    ],
    "create_sharing_metadata": [("model", inspect.Parameter.empty)],
    "retie_parameters": [
        ("module", inspect.Parameter.empty),
        ("sharing_metadata", inspect.Parameter.empty),
    ],
    "id_to_fqn": [("module", inspect.Parameter.empty)],
    "get_all_fqns": [("module", inspect.Parameter.empty)],
    "make_cannonical_names": [
        ("fqns", inspect.Parameter.empty),
        ("sharing_metadata", inspect.Parameter.empty),
    ],
    "map_cannonical_names": [("cnames", inspect.Parameter.empty)],
}


@pytest.mark.parametrize("name", sorted(FORGATHER_SIGNATURES))
def test_forgather_signature(name: str) -> None:
    """Positional parameters, their order and defaults are Forgather's; anything we add is
    keyword-only, so Forgather-style calls (positional or keyword) bind the same way."""
    fn = getattr(sc, name)
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert [(p.name, p.default) for p in positional] == FORGATHER_SIGNATURES[name]
    extra = [p for p in params if p not in positional]
    assert all(p.kind is p.KEYWORD_ONLY for p in extra), f"{name}: extras must be keyword-only"


def test_forgather_constants_and_types() -> None:
    assert sc.WEIGHTS_NAME == "pytorch_model.bin"
    assert sc.WEIGHTS_INDEX_NAME == "pytorch_model.bin.index.json"
    assert sc.SAFE_WEIGHTS_NAME == "model.safetensors"
    assert sc.SAFE_WEIGHTS_INDEX_NAME == "model.safetensors.index.json"
    meta = sc.CheckpointMeta("model.safetensors", False, True)
    assert (meta.file_name, meta.is_index, meta.safetensors) == ("model.safetensors", False, True)
    assert sc.CheckpointMeta(file_name="a", is_index=True, safetensors=False) == sc.CheckpointMeta(
        "a", True, False
    )


def test_positional_forgather_calls(tmp_path: Path) -> None:
    """Calls written the way Forgather code writes them (positional) work unchanged."""
    d = str(tmp_path / "ckpt")
    src = TinyMLP(seed=0)
    sc.save_checkpoint(d, src, {"dtype": "float32"}, True, 1000)
    dst = fresh_mlp()
    sc.load_checkpoint(d, dst, "cpu", True, False)
    assert_state_dicts_bitwise_equal(module_sd(dst), module_sd(src))


def test_top_level_package_exports_the_api() -> None:
    """``ckptsvc`` exports what a training script needs; every Forgather name stays
    importable from ``ckptsvc.sharded_checkpoint``, where Forgather users import it."""
    import ckptsvc

    for name in (
        "save_checkpoint",
        "load_checkpoint",
        "find_latest_checkpoint",
        "next_checkpoint_path",
        "verify_checkpoint",
    ):
        assert hasattr(ckptsvc, name), f"ckptsvc.{name} is missing"
    assert ckptsvc.save_checkpoint is sc.save_checkpoint
    for name in sc.__all__:
        assert hasattr(sc, name), f"ckptsvc.sharded_checkpoint.{name} is missing"
    assert "validate_checkpoint" in sc.__all__ and "CheckpointMeta" in sc.__all__
    assert not hasattr(ckptsvc, "make_cannonical_names")  # Forgather internals stay there


def test_retention_honours_relative_preserved_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forgather callers pass paths built with next_checkpoint_path(relative_dir, ...):
    a preserved checkpoint must survive however its path is spelled."""
    monkeypatch.chdir(tmp_path)
    for step in (1, 2, 3):
        sc.save_checkpoint(
            sc.next_checkpoint_path("run", step), TinyMLP(seed=step), safetensors=True
        )
    keep = sc.next_checkpoint_path("run", 1)
    sc.maybe_delete_oldest_checkpoint("run", 1, preserved_checkpoints=[keep])
    assert os.path.isdir(keep), "a preserved checkpoint was deleted"
    assert sorted(os.listdir(os.path.join("run", "checkpoints"))) == [
        "checkpoint-1",
        "checkpoint-3",
        POINTER_NAME,
    ]


def test_pathlib_paths_work(tmp_path: Path) -> None:
    """Forgather's os.path-based functions accepted Path objects; so do ours."""
    path = Path(sc.next_checkpoint_path(tmp_path, 1))  # type: ignore[arg-type]
    src = TinyMLP(seed=0)
    sc.save_checkpoint(path, src, safetensors=True)  # type: ignore[arg-type]
    assert sc.validate_checkpoint(path)  # type: ignore[arg-type]
    assert sc.find_latest_checkpoint(tmp_path) == str(path)  # type: ignore[arg-type]
    dst = fresh_mlp()
    sc.load_checkpoint(path, dst)  # type: ignore[arg-type]
    assert_state_dicts_bitwise_equal(module_sd(dst), module_sd(src))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("safetensors", FORMATS)
def test_cuda_save_and_load(tmp_path: Path, safetensors: bool) -> None:
    src = TiedLM(seed=0).cuda()
    d = str(tmp_path / "ckpt")
    sc.save_checkpoint(d, src, safetensors=safetensors)
    raw = sc.load_checkpoint(d, device="cuda")
    assert isinstance(raw, dict)
    assert all(t.device.type == "cuda" for t in raw.values())
    dst = TiedLM(seed=3).cuda()
    sc.load_checkpoint(d, dst, device="cuda")
    assert dst.head.weight is dst.embed.weight
    assert_state_dicts_bitwise_equal(module_sd(dst), module_sd(src))
    cpu = TiedLM(seed=4)
    sc.load_checkpoint(d, cpu, device="cpu")
    assert_bitwise_equal(cpu.body.weight, src.body.weight.cpu())


def test_a_forked_child_saves_after_its_parent_did(tmp_path: Path) -> None:
    """Module-level thread pools (the checksum helpers) do not survive a fork: a child of a
    process that already saved must still be able to save (a DataLoader worker, a
    fork-based launcher), not hang on a pool whose threads stayed in the parent."""
    state = {"w": torch.arange(1 << 20, dtype=torch.float32)}  # 4 MiB: the helper threads run
    sc.save_checkpoint(str(tmp_path / "parent"), state, safetensors=True)
    pid = os.fork()
    if pid == 0:  # the child: save, then leave without running the parent's cleanups
        code = 1
        try:
            sc.save_checkpoint(str(tmp_path / "child"), state, safetensors=True)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's save hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    loaded = sc.load_checkpoint(str(tmp_path / "child"))
    assert loaded is not None
    assert_state_dicts_bitwise_equal(loaded, state)
