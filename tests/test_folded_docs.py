"""A per-rank instance is one object (issue 16): its component document travels in its
first tensor file's safetensors header (``__metadata__["ckptsvc_component"]``), not in a
``<key>_state_rank_<r>.json`` beside it (so does a GLOBAL or REPLICATED instance's: the
model's is in ``model.safetensors``); an instance without tensors keeps its JSON file.
Older checkpoints (separate JSON documents, written by main at 7eefc68:
``tests/golden/per_rank_json_docs``) still verify and load.

``node`` (tests/conftest.py): a private node writer per test, checked for leaks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_checkpoint_layout import Tiny, golden_state

from ckptsvc import AsyncCheckpointer, hooks, verify_checkpoint
from ckptsvc.errors import CorruptCheckpointError
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.format.manifest import FOLDED_FORMAT_VERSION, MANIFEST_NAME, PLAIN_FORMAT_VERSION
from ckptsvc.format.safetensors_stream import plan_shard, with_metadata
from ckptsvc.read.component_load import load_components
from ckptsvc.read.weights import load_checkpoint
from ckptsvc.stage.components import SharingPattern, StateComponent
from ckptsvc.stage.parts import DOC_META_KEY

GOLDEN = Path(__file__).parent / "golden" / "per_rank_json_docs" / "checkpoint-2"


class Counter:
    """A stateful without tensors."""

    def __init__(self, n: int = 4) -> None:
        self.n = n

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "name": "x"}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n = sd["n"]


def components(state: dict[str, Any], counter: Counter) -> list[StateComponent]:
    return [
        StateComponent("model", state["model"], SharingPattern.REPLICATED),
        StateComponent("optimizer", state["optimizer"], SharingPattern.PER_RANK),
        StateComponent("counter", counter, SharingPattern.PER_RANK),
    ]


def manifest_of(path: str) -> dict[str, Any]:
    return dict(json.loads(Path(path, MANIFEST_NAME).read_text()))


def instance(manifest: dict[str, Any], key: str, suffix: str) -> dict[str, Any]:
    return dict(manifest["components"][key]["metadata"]["ckptsvc"]["instances"][suffix])


def restored(path: str) -> tuple[torch.optim.Optimizer, Counter]:
    opt = torch.optim.SGD(Tiny().parameters(), lr=9.0)
    counter = Counter(0)
    load_components(
        path,
        [
            StateComponent("optimizer", opt, SharingPattern.PER_RANK),
            StateComponent("counter", counter, SharingPattern.PER_RANK),
        ],
    )
    return opt, counter


def test_a_per_rank_instance_with_tensors_is_one_standard_safetensors_file(
    node: str, tmp_path: Path
) -> None:
    state, counter = golden_state(), Counter()
    with AsyncCheckpointer(tmp_path / "run") as ckpt:
        handle = ckpt.save_components(2, components(state, counter))
        handle.wait(60)
    path = handle.path
    listing = sorted(p.name for p in Path(path).iterdir())
    assert listing == [
        MANIFEST_NAME,
        "counter_state_rank_0.json",  # no tensors: its document stays a file
        "model.safetensors",  # REPLICATED: its document in its header too, no index
        "optimizer_state_rank_0.safetensors",  # the document is inside
    ]
    manifest = manifest_of(path)
    ours = manifest["metadata"]["ckptsvc"]
    assert ours["format_version"] == FOLDED_FORMAT_VERSION == 2
    assert set(ours["files"]) == set(listing) - {MANIFEST_NAME}  # size + CRC of every file
    shard = "optimizer_state_rank_0.safetensors"
    assert instance(manifest, "optimizer", "_rank_0") == {
        "doc": shard,
        "ranks": [0],
        "files": [shard],
    }
    assert instance(manifest, "counter", "_rank_0")["doc"] == "counter_state_rank_0.json"
    # a standard safetensors file: the reference reader opens it and sees the document
    with safe_open(str(Path(path, shard)), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    doc = json.loads(meta[DOC_META_KEY])
    assert doc["format"] == "ckptsvc-component" and doc["key"] == "optimizer"
    assert sorted(doc["tensors"]) == sorted(load_file(str(Path(path, shard))))
    assert all(t["file"] == shard for t in doc["tensors"].values())
    assert verify_checkpoint(path).ok
    opt, back = restored(path)
    assert back.n == 4 and opt.param_groups[0]["lr"] == 0.5
    for i, slots in state["optimizer"].state_dict()["state"].items():
        assert torch.equal(
            opt.state_dict()["state"][i]["momentum_buffer"], slots["momentum_buffer"]
        )


def test_a_reused_plan_folds_each_saves_document(node: str, tmp_path: Path) -> None:
    """The second save reuses the plan; its header carries that save's values (the lr),
    and its files are byte for byte what a fresh checkpointer writes."""
    state, counter = golden_state(), Counter()
    opt = state["optimizer"]
    seen: list[tuple[str, bool]] = []
    remove = hooks.install("plan.component", lambda *, key, reused: seen.append((key, reused)))
    try:
        with AsyncCheckpointer(tmp_path / "run") as ckpt:
            for step, lr in ((1, 0.5), (2, 0.25)):
                opt.param_groups[0]["lr"] = lr
                handle = ckpt.save_components(step, components(state, counter))
                handle.wait(60)
    finally:
        remove()
    assert ("optimizer", True) in seen  # the second save reused the plan
    with AsyncCheckpointer(tmp_path / "fresh") as fresh:
        want = fresh.save_components(2, components(state, counter))
        want.wait(60)
    shard = "optimizer_state_rank_0.safetensors"
    got_bytes = Path(handle.path, shard).read_bytes()
    assert got_bytes == Path(want.path, shard).read_bytes()
    opt2, _ = restored(handle.path)
    assert opt2.param_groups[0]["lr"] == 0.25
    assert restored(str(Path(handle.path).parent / "checkpoint-1"))[0].param_groups[0]["lr"] == 0.5


def test_the_layout_with_separate_per_rank_documents_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-2"
    shutil.copytree(GOLDEN, path)
    manifest = manifest_of(str(path))
    assert manifest["metadata"]["ckptsvc"]["format_version"] == PLAIN_FORMAT_VERSION
    assert instance(manifest, "optimizer", "_rank_0")["doc"] == "optimizer_state_rank_0.json"
    assert verify_checkpoint(str(path)).ok
    opt, counter = restored(str(path))
    want = golden_state()["optimizer"].state_dict()
    assert counter.n == 4 and opt.param_groups[0]["lr"] == 0.5
    for i, slots in want["state"].items():
        assert torch.equal(
            opt.state_dict()["state"][i]["momentum_buffer"], slots["momentum_buffer"]
        )


def test_a_shard_named_as_document_without_one_is_corrupt(node: str, tmp_path: Path) -> None:
    """The manifest names the shard as the document, but its header holds none (a shard
    replaced by a plain safetensors file of the same tensors and size, the manifest's CRC
    updated to match): load and verify name the missing key."""
    state, counter = golden_state(), Counter()
    with AsyncCheckpointer(tmp_path / "run") as ckpt:
        handle = ckpt.save_components(2, components(state, counter))
        handle.wait(60)
    shard = Path(handle.path, "optimizer_state_rank_0.safetensors")
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = {
        "format": "pt",
        "other": "x" * len(header["__metadata__"][DOC_META_KEY]),
    }
    body = json.dumps(header, separators=(",", ":")).encode()
    assert len(body) <= n
    shard.write_bytes(raw[:8] + body.ljust(n, b" ") + raw[8 + n :])  # same size
    manifest_path = Path(handle.path, MANIFEST_NAME)  # and the CRC the manifest records
    manifest = json.loads(manifest_path.read_text())
    manifest["metadata"]["ckptsvc"]["files"][shard.name]["crc32c"] = crc32c_hex(shard.read_bytes())
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="ckptsvc_component"):
        restored(handle.path)
    report = verify_checkpoint(handle.path)
    assert any(DOC_META_KEY in p.detail for p in report.problems), report.problems


def test_with_metadata_gives_the_header_plan_shard_would() -> None:
    specs = [("a", "F32", (3, 4)), ("b", "I64", (2,)), ("c", "U8", (2**21,))]
    for tensors in (specs, specs[:2]):  # page-aligned data and 8-byte aligned
        base = plan_shard(tensors, metadata={"format": "pt"})
        meta = {"format": "pt", DOC_META_KEY: json.dumps({"k": 'é\n"' * 100})}
        folded = with_metadata(base, meta)
        assert folded == plan_shard(tensors, metadata=meta)
        assert folded.file_nbytes == plan_shard(tensors, metadata=meta).file_nbytes
        assert [e.begin for e in folded.entries] == [e.begin for e in base.entries]
        assert with_metadata(folded, {"format": "pt"}).header == base.header
    with pytest.raises(ValueError):
        with_metadata(plan_shard(specs), {"format": "pt"})


def test_a_large_document_stays_a_file_of_its_own(
    node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A document over ``MAX_FOLDED_DOC_BYTES`` (16 MiB: safetensors readers refuse
    headers over 100 MB) is not folded: the JSON file beside the shard, read as before."""
    monkeypatch.setattr("ckptsvc.stage.component_plan.MAX_FOLDED_DOC_BYTES", 64)
    state, counter = golden_state(), Counter()
    with AsyncCheckpointer(tmp_path / "run") as ckpt:
        handle = ckpt.save_components(2, components(state, counter))
        handle.wait(60)
    manifest = manifest_of(handle.path)
    assert manifest["metadata"]["ckptsvc"]["format_version"] == PLAIN_FORMAT_VERSION
    assert instance(manifest, "optimizer", "_rank_0")["doc"] == "optimizer_state_rank_0.json"
    with safe_open(str(Path(handle.path, "optimizer_state_rank_0.safetensors")), "pt") as f:
        assert DOC_META_KEY not in f.metadata()
    assert verify_checkpoint(handle.path).ok
    opt, back = restored(handle.path)
    assert back.n == 4 and opt.param_groups[0]["lr"] == 0.5
    # the model in one file keeps no index: its tied groups come from model_state.json
    assert instance(manifest, "model", "")["doc"] == "model_state.json"
    assert not Path(handle.path, "model.safetensors.index.json").exists()
    weights = load_checkpoint(handle.path)
    assert weights["head.weight"] is weights["embed.weight"]
