"""The on-disk layout of ``AsyncCheckpointer.save(step, state)`` (docs/reference/formats.md):
golden file names, sizes and CRC-32C of every file, and the manifest's components.

Regenerate the golden file (only on a deliberate layout change, documented in formats.md)
with ``CKPTSVC_REGENERATE_GOLDEN=1 pytest tests/test_checkpoint_layout.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptsvc import AsyncCheckpointer, load_state
from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.stage.parts import DOC_META_KEY

GOLDEN = Path(__file__).parent / "golden" / "layout.json"
REGENERATE = os.environ.get("CKPTSVC_REGENERATE_GOLDEN") == "1"


class Tiny(nn.Module):
    """Deterministic weights (no RNG), a tied head and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        self.proj = nn.Linear(3, 3)
        self.head = nn.Linear(3, 4, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.tensor([7], dtype=torch.int64))
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) / (i + 1))


def golden_state() -> dict[str, Any]:
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return {"model": model, "optimizer": opt, "step": 3, "data": {"epoch": 1, "pos": [2, 5]}}


def layout_of(path: Path) -> dict[str, Any]:
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    ours = manifest["metadata"]["ckptsvc"]
    return {
        "listing": sorted(p.name for p in path.iterdir()),
        "files": ours["files"],
        "components": [
            {k: c[k] for k in ("key", "sharing_pattern", "ranks", "size_bytes", "metadata")}
            for c in manifest["components"].values()
        ],
        "model_header": _header_metadata(path / "model.safetensors"),
    }


def _header_metadata(path: Path) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file, its document parsed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta[DOC_META_KEY] = json.loads(meta[DOC_META_KEY])
    return meta


def test_layout_matches_the_golden_file(tmp_path: Path, node: str) -> None:
    state = golden_state()
    with AsyncCheckpointer(tmp_path, metadata={"run": "golden"}) as ckpt:
        handle = ckpt.save(3, state)
        handle.wait(60)
    got = layout_of(Path(handle.path))
    if REGENERATE:
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert GOLDEN.exists(), "run with CKPTSVC_REGENERATE_GOLDEN=1 once to create the golden file"
    want = json.loads(GOLDEN.read_text())
    assert got == want, "the checkpoint layout changed: update formats.md and regenerate"
    # the layout's promises, spelled out (the golden file could be regenerated wrongly)
    assert got["listing"] == [  # a model in one shard: model.safetensors, no index (HF)
        MANIFEST_NAME,
        "data_state.json",
        "model.safetensors",
        "optimizer_state.safetensors",
        "step_state.json",
    ]
    doc = got["model_header"][DOC_META_KEY]  # the model's document, in its header
    assert got["model_header"]["format"] == "pt"
    assert sorted(doc["tensors"]) == ["embed.weight", "proj.bias", "proj.weight", "steps"]
    assert doc["param_sharing"] == [["embed.weight", "head.weight"]]
    instances = {c["key"]: c["metadata"]["ckptsvc"]["instances"][""] for c in got["components"]}
    assert {k: i["doc"] for k, i in instances.items()} == {
        "model": "model.safetensors",
        "optimizer": "optimizer_state.safetensors",
        "step": "step_state.json",
        "data": "data_state.json",
    }
    assert [c["key"] for c in got["components"]] == ["model", "optimizer", "step", "data"]
    back = load_state(handle.path)
    assert list(back) == ["model", "optimizer", "step", "data"]
    assert back["data"] == {"epoch": 1, "pos": [2, 5]} and back["step"] == 3
    assert back["model"]["head.weight"] is back["model"]["embed.weight"]


def test_a_module_or_a_list_is_the_state_itself(tmp_path: Path, node: str) -> None:
    """A state that is not a mapping of names is one component, marked as the root:
    ``load_state`` returns it as it was given (a module as its state dict)."""
    model = Tiny()
    pair = [torch.arange(3.0), {"k": 1}]
    with AsyncCheckpointer(tmp_path) as ckpt:
        a = ckpt.save(1, model)
        b = ckpt.save(2, pair)
        c = ckpt.save(3, {1: torch.ones(2)})  # a key that cannot name a component
        for h in (a, b, c):
            h.wait(60)
    assert (Path(a.path) / "model.safetensors").exists()
    got = load_state(a.path)
    assert sorted(got) == sorted(model.state_dict())
    back = load_state(b.path)
    assert isinstance(back, list) and torch.equal(back[0], pair[0]) and back[1] == {"k": 1}
    assert sorted(os.listdir(b.path)) == [MANIFEST_NAME, "state_state.safetensors"]
    keyed = load_state(c.path)
    assert list(keyed) == [1] and torch.equal(keyed[1], torch.ones(2))


def test_an_empty_state_round_trips(tmp_path: Path, node: str) -> None:
    with AsyncCheckpointer(tmp_path) as ckpt:
        handle = ckpt.save(1, {})
        handle.wait(60)
    assert load_state(handle.path) == {}


def test_a_checkpoint_of_the_previous_layout_still_loads(tmp_path: Path) -> None:
    """``tests/golden/v1_save_layout``: the same state saved by ``save`` before the component
    layout (every tensor prefixed in the model shards, the rest in ``ckptsvc_state.json``),
    written by that code. It verifies, loads with ``load_state`` and is found as latest."""
    import shutil

    from ckptsvc import find_latest_checkpoint, verify_checkpoint

    root = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "golden" / "v1_save_layout", root / "checkpoints")
    path = str(root / "checkpoints" / "checkpoint-3")
    assert find_latest_checkpoint(str(root)) == path
    assert verify_checkpoint(path).ok
    back = load_state(path)
    want = golden_state()
    assert back["step"] == 3 and back["data"] == {"epoch": 1, "pos": [2, 5]}
    # that checkpoint's model had no ``steps`` buffer
    model_sd = {k: v for k, v in want["model"].state_dict().items() if k != "steps"}
    assert sorted(back["model"]) == sorted(model_sd)
    _assert_golden_model_and_optimizer(back, model_sd, want)


def _assert_golden_model_and_optimizer(
    back: dict[str, Any], model_sd: dict[str, torch.Tensor], want: dict[str, Any]
) -> None:
    """``back`` (a loaded golden checkpoint) holds ``model_sd`` bitwise with its tied
    weights one tensor, and an optimizer state that restores ``want``'s momentum."""
    for k, v in model_sd.items():
        assert torch.equal(back["model"][k], v), k
    assert back["model"]["head.weight"] is back["model"]["embed.weight"]
    opt = torch.optim.SGD(Tiny().parameters(), lr=0.5, momentum=0.9)
    opt.load_state_dict(back["optimizer"])
    for i, slots in want["optimizer"].state_dict()["state"].items():
        assert torch.equal(
            opt.state_dict()["state"][i]["momentum_buffer"], slots["momentum_buffer"]
        )


def test_a_state_dict_is_one_model_component_not_a_file_per_tensor(
    tmp_path: Path, node: str
) -> None:
    from safetensors.torch import load_file

    model = Tiny()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with AsyncCheckpointer(tmp_path) as ckpt:
        handle = ckpt.save(5, sd)
        handle.wait(60)
    path = Path(handle.path)
    listing = sorted(p.name for p in path.iterdir())
    shards = [n for n in listing if n.endswith(".safetensors")]
    assert shards == ["model.safetensors"], listing  # not a file per tensor
    assert [n for n in listing if n.endswith(".json")] == [MANIFEST_NAME], listing
    on_disk = load_file(path / shards[0])  # plain HF weights of exactly its keys
    assert sorted(on_disk) == sorted(sd)
    loaded = load_state(str(path))
    assert list(loaded) == list(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    # a mapping that also holds a non-tensor keeps one component per key
    with AsyncCheckpointer(tmp_path / "mixed") as ckpt:
        handle = ckpt.save(1, {"w": sd["proj.weight"], "step": 1})
        handle.wait(60)
    mixed = Path(handle.path)
    assert (mixed / "w_state.safetensors").exists() and (mixed / "step_state.json").exists()


def test_a_checkpoint_with_json_documents_and_an_index_still_loads(tmp_path: Path) -> None:
    """``tests/golden/json_docs_v1``: ``save(3, golden_state())`` written by main at
    773b28c, before the GLOBAL documents moved into the tensor files' headers and a
    one-shard model lost its index (``model-00001-of-00001.safetensors`` +
    ``model.safetensors.index.json`` + ``model_state.json``). It verifies, is found as
    latest, loads with ``load_state`` and as HF weights (tied groups from the index)."""
    import shutil

    from ckptsvc import find_latest_checkpoint, verify_checkpoint
    from ckptsvc.read.weights import load_checkpoint

    root = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "golden" / "json_docs_v1", root / "checkpoints")
    path = str(root / "checkpoints" / "checkpoint-3")
    assert sorted(os.listdir(path))[2:5] == [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "model_state.json",
    ]
    assert find_latest_checkpoint(str(root)) == path
    report = verify_checkpoint(path)
    assert report.ok and report.files_checked == 7, report  # all but the manifest
    back = load_state(path)
    want = golden_state()
    assert list(back) == ["model", "optimizer", "step", "data"]
    assert back["step"] == 3 and back["data"] == {"epoch": 1, "pos": [2, 5]}
    _assert_golden_model_and_optimizer(back, want["model"].state_dict(), want)
    weights = load_checkpoint(path)
    assert weights["head.weight"] is weights["embed.weight"]


def test_a_one_file_model_keeps_its_tied_groups_for_every_reader(tmp_path: Path, node: str) -> None:
    """No index in a one-shard save: ``load_checkpoint`` (module or state dict) and
    ``export_hf`` take the tied groups from the document in ``model.safetensors``."""
    from safetensors.torch import load_file

    from ckptsvc.ops.export import export_hf
    from ckptsvc.read.weights import load_checkpoint

    with AsyncCheckpointer(tmp_path) as ckpt:
        handle = ckpt.save(3, golden_state())
        handle.wait(60)
    path = Path(handle.path)
    assert not (path / "model.safetensors.index.json").exists()
    assert "head.weight" not in load_file(path / "model.safetensors")  # stored once
    weights = load_checkpoint(str(path))
    assert weights["head.weight"] is weights["embed.weight"]
    fresh = Tiny()
    with torch.no_grad():
        fresh.embed.weight.zero_()
    load_checkpoint(str(path), fresh)
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, golden_state()["model"].embed.weight)
    export_hf(str(path), str(tmp_path / "hf"))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["param_sharing"] == [["embed.weight", "head.weight"]]
