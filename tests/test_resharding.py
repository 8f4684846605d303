"""Sharded tensors: region reads from stored pieces, and FSDP2 saved at 4 ranks loaded at 2 and 1."""

from __future__ import annotations

import itertools
import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StorageRoot
from dist_workers.launch import describe, launch
from helpers_models import assert_bitwise_equal, random_tensor
from safetensors.torch import save

from ckptsvc.errors import CorruptCheckpointError
from ckptsvc.ops.export import export_hf
from ckptsvc.read.regions import Piece, RegionReader
from ckptsvc.sharded_checkpoint import load_checkpoint

# ---- region reads ----------------------------------------------------------------------------

GLOBALS = {
    "mat": random_tensor(torch.float32, (10, 12), seed=1),
    "cube": random_tensor(torch.int16, (4, 6, 5), seed=2),
    "vec": random_tensor(torch.bfloat16, (9,), seed=3),
}
CUTS = {
    "mat": [[0, 3, 7, 10], [0, 5, 12]],
    "cube": [[0, 2, 4], [0, 1, 6], [0, 5]],
    "vec": [[0, 4, 9]],
}
DTYPES = {"mat": "F32", "cube": "I16", "vec": "BF16"}


def grid(cuts: list[list[int]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = [((), ())]
    for c in cuts:
        boxes = [((*o, a), (*s, b - a)) for o, s in boxes for a, b in itertools.pairwise(c)]
    return boxes


def write_pieces(root: StorageRoot) -> dict[str, list[Piece]]:
    """Each tensor cut into a grid of pieces; piece i of every tensor goes to file i % 3."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    pieces: dict[str, list[Piece]] = {}
    counter = 0
    for name, full in GLOBALS.items():
        for offsets, shape in grid(CUTS[name]):
            fname = f"piece-{counter % 3}-{counter}.safetensors"
            counter += 1
            box = tuple(slice(o, o + s) for o, s in zip(offsets, shape, strict=True))
            files.setdefault(fname, {})[name] = full[box].contiguous()
            pieces.setdefault(name, []).append(Piece(fname, offsets, shape))
    loc = root.location()
    loc.makedirs()
    for fname, tensors in files.items():
        loc.join(fname).publish(save(tensors))
    return pieces


def random_box(
    shape: tuple[int, ...], rng: random.Random
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lo = [rng.randrange(0, d) for d in shape]
    ext = [rng.randrange(1, d - a + 1) for a, d in zip(lo, shape, strict=True)]
    return tuple(lo), tuple(ext)


@pytest.mark.parametrize("storage_root", ["local", "s3"], indirect=True)
def test_any_region_reads_the_right_bytes(storage_root: StorageRoot) -> None:
    pieces = write_pieces(storage_root)
    loc = storage_root.location()
    rng = random.Random(0)
    for name, full in GLOBALS.items():
        boxes = [
            ((0,) * full.dim(), tuple(full.shape)),
            *(random_box(tuple(full.shape), rng) for _ in range(12)),
        ]
        reader = RegionReader(loc)
        outs = [reader.want(name, DTYPES[name], pieces[name], lo, ext) for lo, ext in boxes]
        reader.run()
        for (lo, ext), out in zip(boxes, outs, strict=True):
            box = tuple(slice(a, a + e) for a, e in zip(lo, ext, strict=True))
            assert_bitwise_equal(out, full[box], name=f"{name}{list(lo)}+{list(ext)}")


def test_row_regions_read_exactly_their_bytes(tmp_path: Path) -> None:
    """Rows of row-sharded pieces (FSDP's Shard(0)) are read with no extra byte."""
    root = StorageRoot("local", str(tmp_path), {})
    full = random_tensor(torch.float32, (12, 8), seed=4)
    loc = root.location()
    loc.makedirs()
    loc.join("a.safetensors").publish(save({"w": full[:5].contiguous()}))
    loc.join("b.safetensors").publish(save({"w": full[5:].contiguous()}))
    pieces = [Piece("a.safetensors", (0, 0), (5, 8)), Piece("b.safetensors", (5, 0), (7, 8))]
    reader = RegionReader(loc)
    out = reader.want("w", "F32", pieces, (3, 0), (6, 8))
    assert reader.planned_nbytes == 6 * 8 * 4
    reader.run()
    assert_bitwise_equal(out, full[3:9])


def test_missing_piece_is_reported(tmp_path: Path) -> None:
    root = StorageRoot("local", str(tmp_path), {})
    pieces = write_pieces(root)
    reader = RegionReader(root.location())
    with pytest.raises(CorruptCheckpointError, match="cover"):
        reader.want("mat", "F32", pieces["mat"][1:], (0, 0), (10, 12))
    with pytest.raises(CorruptCheckpointError, match="'mat'"):
        reader.want("mat", "I16", pieces["mat"], (0, 0), (10, 12))  # wrong dtype in the doc


# ---- FSDP2 across world sizes --------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """FSDP2 (fully_shard, CPU, gloo) trained and saved at 4 ranks on 2 simulated nodes."""
    root = tmp_path_factory.mktemp("fsdp")
    args = {
        "root": str(root / "run"),
        "reference": str(root / "reference.pt"),
        "max_shard_size": 700,
    }
    runs = launch("fsdp_save", args, world=4, nodes=2, node_prefix=f"f{uuid.uuid4().hex[:8]}")
    assert all(r.returncode == 0 and r.result for r in runs), describe(runs)
    yield {"path": runs[0].result["path"], "reference": args["reference"], "root": root}  # type: ignore[index]


@pytest.mark.multiproc
@pytest.mark.slow
def test_fsdp2_saved_sharded_with_global_offsets(fsdp_checkpoint: dict[str, Any]) -> None:
    path = Path(fsdp_checkpoint["path"])
    doc = json.loads((path / "model_state.json").read_text())
    w = doc["tensors"]["0.weight"]
    assert w["shape"] == [40, 16]
    assert sorted(tuple(p["offsets"]) for p in w["pieces"]) == [(0, 0), (10, 0), (20, 0), (30, 0)]
    assert {p["file"].split("-")[1] for p in w["pieces"]} == {
        "rank00000",
        "rank00001",
        "rank00002",
        "rank00003",
    }
    assert not (path / "model.safetensors.index.json").exists()  # not HF-loadable as is


@pytest.mark.multiproc
@pytest.mark.parametrize("world,fsdp", [(2, True), (1, False)], ids=["fsdp2-at-2", "plain-at-1"])
@pytest.mark.slow
def test_fsdp2_loads_at_another_world_size(
    fsdp_checkpoint: dict[str, Any], world: int, fsdp: bool
) -> None:
    args = {
        "path": fsdp_checkpoint["path"],
        "reference": fsdp_checkpoint["reference"],
        "fsdp": fsdp,
    }
    runs = launch("fsdp_load", args, world=world, node_prefix=f"f{uuid.uuid4().hex[:8]}")
    assert all(r.returncode == 0 and r.result for r in runs), describe(runs)
    for r in runs:
        assert r.result is not None
        assert r.result["mismatch"] == {"model": [], "optimizer": []}
        assert r.result["placements"] == (["(Shard(dim=0),)"] if fsdp else ["plain"])


@pytest.mark.multiproc
@pytest.mark.slow
def test_fsdp2_checkpoint_exports_to_plain_hf(
    fsdp_checkpoint: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "hf"
    result = export_hf(fsdp_checkpoint["path"], str(out), max_shard_size=2048, chunk_bytes=256)
    assert len(result.files) > 1
    reference = torch.load(fsdp_checkpoint["reference"], weights_only=True)["model"]
    weights = load_checkpoint(str(out))
    assert weights is not None and sorted(weights) == sorted(k.rstrip(".") for k in reference)
    for k, v in weights.items():
        assert_bitwise_equal(v, reference[k + "."], name=k)
