"""export_hf: sharded (and unsharded) checkpoints to plain HF safetensors shards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import StorageRoot, unfinished_save
from helpers_models import TiedLM, assert_bitwise_equal, random_tensor
from safetensors.torch import load_file, save

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.errors import CheckpointNotFoundError, IncompleteCheckpointError
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.format.manifest import ComponentRecord, FileRecord, Manifest, now_iso
from ckptsvc.ops.export import add_cli, export_hf
from ckptsvc.sharded_checkpoint import load_checkpoint
from ckptsvc.stage.components import SharingPattern, StateComponent
from ckptsvc.storage import Location
from ckptsvc.workers.commit import commit_checkpoint

TENSORS = {
    "embed.weight": random_tensor(torch.bfloat16, (50, 16), seed=1),
    "layer.w": random_tensor(torch.float32, (24, 30), seed=2),
    "layer.b": random_tensor(torch.float32, (30,), seed=3),
    "scale": torch.tensor(2.5),
}
#: the pieces each "rank" stored: rows of embed (uneven), a 2x2 grid of layer.w, whole others
LAYOUT: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {
    "embed.weight": [
        ((0, 0), (13, 16)),
        ((13, 0), (13, 16)),
        ((26, 0), (13, 16)),
        ((39, 0), (11, 16)),
    ],
    "layer.w": [((0, 0), (12, 15)), ((0, 15), (12, 15)), ((12, 0), (12, 15)), ((12, 15), (12, 15))],
    "layer.b": [((0,), (30,))],
    "scale": [((), ())],
}


def write_sharded(loc: Location) -> None:
    """A committed checkpoint whose model is stored as per-rank pieces (as FSDP saves)."""
    loc.makedirs()
    files: dict[str, dict[str, torch.Tensor]] = {}
    doc_tensors = {}
    for name, boxes in LAYOUT.items():
        full = TENSORS[name]
        pieces = []
        for rank, (offsets, shape) in enumerate(boxes):
            fname = f"model-rank{rank:05}.safetensors"
            box = tuple(slice(o, o + s) for o, s in zip(offsets, shape, strict=True))
            files.setdefault(fname, {})[name] = full[box].contiguous()
            pieces.append({"file": fname, "offsets": list(offsets), "shape": list(shape)})
        dtype = {torch.bfloat16: "BF16", torch.float32: "F32"}[full.dtype]
        doc_tensors[name] = {"dtype": dtype, "shape": list(full.shape), "pieces": pieces}
    doc = {
        "format": "ckptsvc-component", "version": 1, "key": "model", "sharing_pattern": "global",
        "param_sharing": [["embed.weight", "head.weight"]], "state": {k: {"__tensor__": k} for k in TENSORS},
        "tensors": doc_tensors,
    }  # fmt: skip
    blobs = {f: save(t) for f, t in files.items()}
    blobs["model_state.json"] = json.dumps(doc).encode()
    records = []
    for fname, data in blobs.items():
        loc.join(fname).publish(data)
        records.append(FileRecord(fname, len(data), crc32c_hex(data)))
    comp = ComponentRecord(
        key="model", sharing_pattern="global", ranks=(0, 1, 2, 3),
        metadata={"ckptsvc": {"world_size": 4, "sharded": True, "instances": {"": {"doc": "model_state.json", "ranks": [0, 1, 2, 3], "files": sorted(blobs)}}}},
    )  # fmt: skip
    commit_checkpoint(
        loc,
        Manifest(loc.url, 4, now_iso(), 1, tuple(records), components=(comp,), library_version="t"),
    )


@pytest.mark.parametrize("storage_root", ["local", "s3"], indirect=True)
def test_sharded_checkpoint_exports_to_hf_shards(storage_root: StorageRoot, tmp_path: Path) -> None:
    src = storage_root.location("ckpt")
    write_sharded(src)
    out = tmp_path / "hf"
    result = export_hf(
        src.url, str(out), max_shard_size=2048, chunk_bytes=100,
        storage_options=storage_root.storage_options, dst_storage_options={},
    )  # fmt: skip
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in TENSORS.values()
    )
    assert index["metadata"]["param_sharing"] == [["embed.weight", "head.weight"]]
    assert sorted(index["weight_map"]) == sorted(TENSORS)
    assert list(result.files) == sorted(set(index["weight_map"].values())) and len(result.files) > 1
    for name in result.files:  # the reference reader, shard by shard, sizes within the limit
        part = load_file(str(out / name))
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 2048 or len(part) == 1
        for k, v in part.items():
            assert_bitwise_equal(v, TENSORS[k], name=k)
    weights = load_checkpoint(str(out))
    assert weights is not None and weights["head.weight"] is weights["embed.weight"]


def test_export_to_object_storage(s3_root: StorageRoot, tmp_path: Path) -> None:
    src = Location.parse(str(tmp_path / "ckpt"))
    write_sharded(src)
    dst = s3_root.join("hf")
    export_hf(src.url, dst, dst_storage_options=s3_root.storage_options)
    weights = load_checkpoint(dst, storage_options=s3_root.storage_options)
    assert weights is not None
    for k, v in TENSORS.items():
        assert_bitwise_equal(weights[k], v, name=k)


def test_unsharded_checkpoint_is_resharded(node: str, tmp_path: Path) -> None:
    model = TiedLM()
    with AsyncCheckpointer(tmp_path / "run") as ckpt:
        handle = ckpt.save_components(1, [StateComponent("model", model, SharingPattern.GLOBAL)])
        handle.wait(60)
    assert [p.name for p in Path(handle.path).glob("model*.safetensors")] == ["model.safetensors"]
    result = export_hf(handle.path, str(tmp_path / "hf"), max_shard_size=1024)
    assert len(result.files) > 1
    weights = load_checkpoint(str(tmp_path / "hf"))
    assert weights is not None
    for k, v in model.state_dict().items():
        assert_bitwise_equal(weights[k], v, name=k)


def test_incomplete_or_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    loc = Location.parse(str(tmp_path / "ckpt"))
    unfinished_save(loc)
    with pytest.raises(IncompleteCheckpointError):
        export_hf(loc.url, str(tmp_path / "out"))
    with pytest.raises(CheckpointNotFoundError):
        export_hf(str(tmp_path / "nothing"), str(tmp_path / "out"))


def test_cli_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = Location.parse(str(tmp_path / "ckpt"))
    write_sharded(src)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["export-hf", src.url, str(tmp_path / "hf"), "--json"])
    assert args.fn(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["index"] == "model.safetensors.index.json"
    assert (tmp_path / "hf" / printed["files"][0]).exists()
