"""The pieces the HF Trainer layout rests on, without a Trainer: ``StateComponent.files``
(small named files in the component's commit) and discovery of ``<root>/checkpoint-*``
beside ``<root>/checkpoints/checkpoint-*`` (find_latest, ``ckptsvc ls``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ckptsvc.cli import main as cli_main
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.errors import ConfigError
from ckptsvc.ops.transfer import copy_tree
from ckptsvc.read.discovery import CheckpointStatus, list_checkpoints
from ckptsvc.read.latest import find_latest_checkpoint, find_latest_verified
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.stage.components import RNGState, SharingPattern, StateComponent


def _save(root: Path, step: int, path: Path, files: dict[str, bytes] | None = None) -> None:
    model = torch.nn.Linear(3, 2)
    comps = [
        StateComponent("model", model, SharingPattern.GLOBAL),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK, files=files or {}),
    ]
    with AsyncCheckpointer(str(root)) as ckpt:
        ckpt.save_components(step, comps, checkpoint_path=str(path)).wait()


def test_component_files_are_committed_and_listed(tmp_path: Path, node: str) -> None:
    path = tmp_path / "checkpoint-3"
    _save(tmp_path, 3, path, files={"rng_state.pth": b"\x00rng", "notes.txt": b"hi"})
    assert (path / "rng_state.pth").read_bytes() == b"\x00rng"
    (info,) = list_checkpoints(str(tmp_path))
    assert info.status is CheckpointStatus.COMPLETE and info.manifest is not None
    assert info.manifest.file("notes.txt") is not None
    (rng,) = [c for c in info.manifest.components if c.key == "rng"]
    instances = rng.metadata["ckptsvc"]["instances"]
    assert {"rng_state.pth", "notes.txt"} <= set(instances["_rank_0"]["files"])
    assert verify_checkpoint(str(path), deep=True).ok
    (path / "notes.txt").write_bytes(b"ho")  # the manifest's CRC covers the file
    assert not verify_checkpoint(str(path), deep=True).ok


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"a/b": b""}, "plain name"),
        ({".hidden": b""}, "plain name"),
        ({"x.json": "text"}, "must be bytes"),
    ],
)
def test_component_files_bad_names_refused(files: dict[str, bytes], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK, files=files)


def test_component_files_that_clash_are_refused(tmp_path: Path, node: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.safetensors\.index\.json"):
        _save(tmp_path, 1, tmp_path / "c1", files={"model.safetensors.index.json": b"{}"})
    with pytest.raises(ConfigError, match=r"checkpoint_manifest\.json"):
        _save(tmp_path, 2, tmp_path / "c2", files={"checkpoint_manifest.json": b"{}"})
    comps = [
        StateComponent("a", RNGState(), SharingPattern.GLOBAL, files={"x": b"1"}),
        StateComponent("b", RNGState(), SharingPattern.GLOBAL, files={"x": b"2"}),
    ]
    with (
        AsyncCheckpointer(str(tmp_path)) as ckpt,
        pytest.raises(ConfigError, match="more than one component"),
    ):
        ckpt.save_components(4, comps)


def test_discovery_lists_both_layouts(
    tmp_path: Path, node: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    _save(root, 1, root / "checkpoint-1")  # the HF Trainer's layout
    assert find_latest_checkpoint(str(root)) == os.path.join(str(root), "checkpoint-1")
    _save(root, 2, root / "checkpoints" / "checkpoint-2")  # ckptsvc's own
    infos = list_checkpoints(str(root))
    assert [(i.location.name, i.status) for i in infos] == [
        ("checkpoint-1", CheckpointStatus.COMPLETE),
        ("checkpoint-2", CheckpointStatus.COMPLETE),
    ]
    latest = os.path.join(str(root), "checkpoints", "checkpoint-2")
    assert find_latest_checkpoint(str(root)) == latest
    assert find_latest_verified(str(root)) == latest
    capsys.readouterr()
    assert cli_main(["ls", str(root)]) in (0, None)
    out = capsys.readouterr().out
    assert "checkpoint-1" in out and "checkpoint-2" in out


def test_copy_tree_keeps_the_hf_trainer_layout(tmp_path: Path, node: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _save(src, 1, src / "checkpoint-1")
    _save(src, 2, src / "checkpoints" / "checkpoint-2")
    copy_tree(str(src), str(dst))
    assert [i.url for i in list_checkpoints(str(dst))] == [
        str(dst / "checkpoint-1"),
        str(dst / "checkpoints" / "checkpoint-2"),
    ]
    assert verify_checkpoint(str(dst / "checkpoint-1"), deep=True).ok
