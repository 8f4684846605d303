"""Issue 17, read side: one damaged, hostile or special-file entry never crashes, hangs or
misleads the readers (discovery, loaders, CLI, gc); every JSON document is read bounded;
partial reads are CRC-checked; documents must match the manifest.

Everything runs on real files on local disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from ckptsvc import load_state
from ckptsvc.cli import main as cli_main
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.errors import CheckpointError, CorruptCheckpointError
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.format.json_doc import parse_json_doc, read_json_doc
from ckptsvc.format.manifest import MANIFEST_NAME, FileRecord, Manifest
from ckptsvc.ops.gc import collect_garbage
from ckptsvc.read.discovery import (
    CheckpointStatus,
    list_checkpoints,
    next_checkpoint_path,
)
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.sharded_checkpoint import SAFE_WEIGHTS_INDEX_NAME, load_checkpoint, save_checkpoint
from ckptsvc.storage import Location

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def _state(step: int) -> dict[str, torch.Tensor]:
    """Four 256-byte tensors: two shards of two tensors at max_shard_size=512."""
    return {f"w{i}": torch.full((64,), float(step * 10 + i)) for i in range(4)}


def _save(root: Path, step: int) -> Path:
    path = next_checkpoint_path(str(root), step)
    save_checkpoint(path, _state(step), safetensors=True, max_shard_size=512, step=step)
    return Path(path)


def _rewrite_manifest(ckpt: Path, **changes: object) -> None:
    """Re-record every file's size and CRC (after an edit) and apply ``changes``."""
    m = Manifest.from_json((ckpt / MANIFEST_NAME).read_bytes(), where=str(ckpt))
    files = tuple(
        FileRecord(f.path, (ckpt / f.path).stat().st_size, crc32c_hex((ckpt / f.path).read_bytes()))
        for f in m.files
    )
    m = dataclasses.replace(m, files=files, **changes)  # type: ignore[arg-type]
    (ckpt / MANIFEST_NAME).write_bytes(m.to_json())


def _huge_int_manifest(ckpt: Path) -> None:
    raw = (ckpt / MANIFEST_NAME).read_text()
    doc = json.loads(raw)
    (ckpt / MANIFEST_NAME).write_text(
        raw.replace(f'"world_size": {doc["world_size"]}', '"world_size": ' + "9" * 5000)
    )


def _make_fifo(ckpt: Path) -> None:
    (ckpt / MANIFEST_NAME).unlink()
    os.mkfifo(ckpt / MANIFEST_NAME)


def _make_dir(ckpt: Path) -> None:
    (ckpt / MANIFEST_NAME).unlink()
    (ckpt / MANIFEST_NAME).mkdir()


def _link_dev_zero(ckpt: Path) -> None:
    (ckpt / MANIFEST_NAME).unlink()
    (ckpt / MANIFEST_NAME).symlink_to("/dev/zero")


def _year_9999(ckpt: Path) -> None:
    raw = (ckpt / MANIFEST_NAME).read_text()
    ts = json.loads(raw)["timestamp"]
    (ckpt / MANIFEST_NAME).write_text(raw.replace(ts, "9999-12-31T23:59:59.999999-01:00"))


def _garbage_timestamp(ckpt: Path) -> None:
    raw = (ckpt / MANIFEST_NAME).read_text()
    ts = json.loads(raw)["timestamp"]
    (ckpt / MANIFEST_NAME).write_text(raw.replace(ts, "not a time"))


def _deep_manifest(ckpt: Path) -> None:
    raw = (ckpt / MANIFEST_NAME).read_text()
    (ckpt / MANIFEST_NAME).write_text(
        raw.replace(
            '"metadata": {', '"deep": ' + "[" * 10_000 + "]" * 10_000 + ', "metadata": {', 1
        )
    )


HOSTILE_MANIFESTS = {
    "huge_int": _huge_int_manifest,
    "fifo": _make_fifo,
    "directory": _make_dir,
    "symlink_to_dev_zero": _link_dev_zero,
    "year_9999": _year_9999,
    "garbage_timestamp": _garbage_timestamp,
    "nested_10000_deep": _deep_manifest,
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("damage", sorted(HOSTILE_MANIFESTS))
def test_one_hostile_manifest_never_stops_discovery(
    tmp_path: Path,
    damage: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    HOSTILE_MANIFESTS[damage](bad)
    with caplog.at_level(logging.WARNING, logger="ckptsvc.read.discovery"):
        infos = {i.location.name: i for i in list_checkpoints(str(tmp_path))}
    assert infos[good.name].status is CheckpointStatus.COMPLETE
    assert infos[bad.name].status in (CheckpointStatus.INCOMPLETE, CheckpointStatus.DAMAGED)
    assert infos[bad.name].reason and MANIFEST_NAME in infos[bad.name].reason
    assert bad.name in caplog.text
    assert find_latest_checkpoint(str(tmp_path)) == str(good)
    assert cli_main(["ls", str(tmp_path)]) == 0
    assert cli_main(["ls", str(tmp_path), "--json"]) == 0
    assert "(latest)" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):  # names the reason
        load_checkpoint(str(bad))
    report = collect_garbage(str(tmp_path), dry_run=True, shared_memory=False)
    assert str(good) not in report.removed
    assert find_latest_checkpoint(str(tmp_path), verify="deep") == str(good)


def test_manifest_over_the_size_cap_is_refused_cheaply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _save(tmp_path, 1)
    with open(ckpt / MANIFEST_NAME, "ab") as f:  # a 300 MB sparse tail: never read
        f.truncate(300 * 2**20)
    with pytest.raises(CorruptCheckpointError, match="CKPTSVC_MAX_JSON_BYTES"):
        read_json_doc(Location.parse(str(ckpt / MANIFEST_NAME)), what="manifest")
    monkeypatch.setenv("CKPTSVC_MAX_JSON_BYTES", "100")
    other = _save(tmp_path, 2)
    with pytest.raises(CorruptCheckpointError, match="over the 100-byte limit"):
        read_json_doc(Location.parse(str(other / MANIFEST_NAME)), what="manifest")
    assert find_latest_checkpoint(str(tmp_path)) is None


@pytest.mark.parametrize(
    "text",
    ["9" * 5000, "[" * 10_000 + "]" * 10_000, '{"a": NaN}', '{"a": -Infinity}', "\xff", "{"],
)
def test_parse_json_doc_refuses_hostile_documents(text: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=r"doc\.json"):
        parse_json_doc(text.encode("utf-8", "surrogateescape"), where="doc.json", what="index")


def test_huge_int_in_index_and_header_is_corrupt(tmp_path: Path) -> None:
    ckpt = _save(tmp_path, 1)
    index = ckpt / SAFE_WEIGHTS_INDEX_NAME
    index.write_text(index.read_text().replace('"total_size": 1024', '"total_size": ' + "1" * 5000))
    _rewrite_manifest(ckpt)
    with pytest.raises(CorruptCheckpointError, match="integer literal"):
        load_checkpoint(str(ckpt))
    header = b'{"w":{"dtype":"F32","shape":[' + b"1" * 5000 + b'],"data_offsets":[0,4]}}'
    (ckpt / SHARD1).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert not verify_checkpoint(str(ckpt), deep=True).ok


def _shard(path: Path, header: dict[str, object], data: bytes) -> None:
    body = json.dumps(header).encode()
    body += b" " * (-(8 + len(body)) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _replace_shard(ckpt: Path, header: dict[str, object], data: bytes, names: list[str]) -> None:
    """Make SHARD1 hold ``header``/``data`` and the index map ``names`` to it, re-recorded."""
    (ckpt / SHARD2).unlink()
    _shard(ckpt / SHARD1, header, data)
    idx = json.loads((ckpt / SAFE_WEIGHTS_INDEX_NAME).read_text())
    idx["weight_map"] = dict.fromkeys(names, SHARD1)
    (ckpt / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(idx))
    m = Manifest.from_json((ckpt / MANIFEST_NAME).read_bytes(), where=str(ckpt))
    m = dataclasses.replace(m, files=tuple(f for f in m.files if f.path != SHARD2))
    (ckpt / MANIFEST_NAME).write_bytes(m.to_json())
    _rewrite_manifest(ckpt)


def test_zero_element_tensor_with_a_huge_dimension_loads_and_passes_the_crc(
    tmp_path: Path,
) -> None:
    ckpt = _save(tmp_path, 1)
    header = {
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "z": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [8, 8]},
    }
    _replace_shard(ckpt, header, torch.ones(2).numpy().tobytes(), ["b", "z"])
    assert verify_checkpoint(str(ckpt), deep=True).ok
    assert find_latest_checkpoint(str(tmp_path), verify=True) == str(ckpt)
    out = load_checkpoint(str(ckpt))
    assert out is not None and out["z"].shape == (0, 2**62) and out["b"].tolist() == [1, 1]
    assert load_checkpoint(str(ckpt), keys={"z"})["z"].numel() == 0  # type: ignore[index]


def test_bytes_between_tensors_are_part_of_the_crc_not_a_false_error(tmp_path: Path) -> None:
    ckpt = _save(tmp_path, 1)
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},  # an 8-byte hole
    }
    _replace_shard(ckpt, header, bytes(range(24)), ["a", "b"])
    assert verify_checkpoint(str(ckpt), deep=True).ok
    assert set(load_checkpoint(str(ckpt)) or {}) == {"a", "b"}


def test_shape_whose_strides_overflow_is_corrupt_not_a_torch_error(tmp_path: Path) -> None:
    ckpt = _save(tmp_path, 1)
    header = {"z": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}
    _replace_shard(ckpt, header, b"", ["z"])
    with pytest.raises(CorruptCheckpointError, match="bad shape"):
        load_checkpoint(str(ckpt))


@pytest.mark.parametrize("copied", [1, 2, 3])
def test_copy_interrupted_after_the_manifest_is_never_returned(tmp_path: Path, copied: int) -> None:
    """``cp -r`` copies in name order: ``checkpoint_manifest.json`` first, then the index
    and the shards; the copy is cut after ``copied`` files."""
    src = tmp_path / "src"
    old = _save(tmp_path / "dst", 1)
    _save(src, 2)
    src_ckpt = Path(next_checkpoint_path(str(src), 2))
    dst_ckpt = Path(next_checkpoint_path(str(tmp_path / "dst"), 2))
    dst_ckpt.mkdir()
    names = sorted(p.name for p in src_ckpt.iterdir())
    assert names[0] == MANIFEST_NAME
    for name in names[:copied]:
        shutil.copyfile(src_ckpt / name, dst_ckpt / name)
    if copied < len(names):  # the file being copied when it stopped: half there
        raw = (src_ckpt / names[copied]).read_bytes()
        (dst_ckpt / names[copied]).write_bytes(raw[: len(raw) // 2])
    infos = {i.location.name: i for i in list_checkpoints(str(tmp_path / "dst"))}
    assert infos[dst_ckpt.name].status is CheckpointStatus.INCOMPLETE
    assert "do not match" in infos[dst_ckpt.name].reason
    assert find_latest_checkpoint(str(tmp_path / "dst")) == str(old)
    with pytest.raises(CorruptCheckpointError, match="do not match its manifest"):
        load_checkpoint(str(dst_ckpt))


def test_partial_load_checks_the_crc_of_the_covering_file(tmp_path: Path) -> None:
    ckpt = _save(tmp_path, 1)
    raw = bytearray((ckpt / SHARD1).read_bytes())
    raw[-1] ^= 0x01  # the last tensor of shard 1
    (ckpt / SHARD1).write_bytes(bytes(raw))
    from ckptsvc.read.loading import read_safetensors_header

    layout, _ = read_safetensors_header(Location.parse(str(ckpt / SHARD1)))
    first, last = layout.entries[0].name, layout.entries[-1].name
    for keys in ({first}, {last}):  # the flipped tensor not asked for, and asked for
        with pytest.raises(CorruptCheckpointError, match=SHARD1):
            load_checkpoint(str(ckpt), keys=keys)
    assert set(load_checkpoint(str(ckpt), keys={"w0", "w1", "w2", "w3"} - {first, last}) or {})


def test_inspect_refuses_a_shard_linked_outside_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _save(tmp_path / "run", 1)
    outside = tmp_path / "secret.safetensors"
    shutil.move(ckpt / SHARD1, outside)
    (ckpt / SHARD1).symlink_to(outside)
    assert cli_main(["inspect", str(ckpt)]) == 1
    assert "outside the checkpoint" in capsys.readouterr().err


def _save_async(root: Path, node: str) -> tuple[Path, Path]:
    with AsyncCheckpointer(str(root)) as ck:
        for step in (1, 2):
            ck.save(
                step,
                {"model": {"w": torch.full((4,), float(step))}, "step": step, "tag": f"t{step}"},
            ).wait(120)
    return Path(next_checkpoint_path(str(root), 1)), Path(next_checkpoint_path(str(root), 2))


def test_load_state_refuses_a_document_from_another_save(tmp_path: Path, node: str) -> None:
    one, two = _save_async(tmp_path, node)
    assert load_state(str(two))["step"] == 2
    shutil.copyfile(one / "tag_state.json", two / "tag_state.json")  # same size, other bytes
    with pytest.raises(CorruptCheckpointError, match=r"tag_state\.json.*CRC-32C"):
        load_state(str(two))


def test_load_state_refuses_an_index_from_another_save(tmp_path: Path, node: str) -> None:
    with AsyncCheckpointer(str(tmp_path), max_shard_size=16) as ck:  # two shards: an index
        handle = ck.save(2, {"model": {"v": torch.ones(4), "w": torch.zeros(4)}})
        handle.wait(120)
    two = Path(handle.path)
    index = two / SAFE_WEIGHTS_INDEX_NAME
    index.write_text(index.read_text() + " ")  # same meaning, not the recorded bytes
    with pytest.raises(CorruptCheckpointError, match=SAFE_WEIGHTS_INDEX_NAME):
        load_state(str(two))


@pytest.mark.parametrize("folded", [False, True], ids=["json-file", "in-header"])
def test_load_components_refuses_a_document_that_does_not_match_the_manifest(
    tmp_path: Path, node: str, monkeypatch: pytest.MonkeyPatch, folded: bool
) -> None:
    """A document of another save, as a JSON file (over the fold limit) or in the header
    of the model's shard (the whole file then: its CRC-32C is the manifest's check)."""
    from ckptsvc.engine.async_checkpointer import load_components
    from ckptsvc.stage.components import SharingPattern, StateComponent

    if not folded:
        monkeypatch.setattr("ckptsvc.stage.component_plan.MAX_FOLDED_DOC_BYTES", 0)
    paths = []
    with AsyncCheckpointer(str(tmp_path)) as ck:
        for step in (1, 2):
            model = torch.nn.Linear(2, 2)
            torch.nn.init.constant_(model.weight, float(step))
            h = ck.save_components(step, [StateComponent("model", model, SharingPattern.GLOBAL)])
            h.wait(120)
            paths.append(Path(h.path))
    one, two = paths
    if folded:
        docs = ["model.safetensors"]
        (two / docs[0]).write_bytes((one / docs[0]).read_bytes())  # same size, other bytes
    else:
        docs = sorted(p.name for p in two.iterdir() if p.name.endswith("_state.json"))
        assert docs, sorted(p.name for p in two.iterdir())
    for name in docs if not folded else []:  # same size, not the recorded bytes
        (two / name).write_bytes((one / name).read_bytes().replace(b", ", b",\n", 1))
    fresh = torch.nn.Linear(2, 2)
    with pytest.raises(CorruptCheckpointError, match=re.escape(docs[0]) + ".*CRC-32C"):
        load_components(str(two), [StateComponent("model", fresh, SharingPattern.GLOBAL)])
