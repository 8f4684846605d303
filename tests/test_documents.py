"""Documents in headers and the one-file model (issue 16, ``ckptsvc.read.documents``):
every component document with tensor files travels in its first file's header; a model
in one shard is ``model.safetensors`` without an index, several keep the HF index. Edge
cases: exactly at the shard limit and one byte over, overwriting a checkpoint of the
other layout (and of the layout before this one), and the tools (``verify``, ``ls``,
``inspect``, ``export-hf``, ``cp``) on both layouts.

``node`` (tests/conftest.py): a private node writer per test, checked for leaks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from test_checkpoint_layout import golden_state

from ckptsvc import AsyncCheckpointer, cli, load_state, verify_checkpoint
from ckptsvc.errors import CorruptCheckpointError
from ckptsvc.format.manifest import MANIFEST_NAME, Manifest
from ckptsvc.read.documents import instance_doc_name, model_param_sharing, read_document
from ckptsvc.read.weights import load_checkpoint
from ckptsvc.stage.parts import DOC_META_KEY
from ckptsvc.storage import Location

GOLDEN = Path(__file__).parent / "golden" / "json_docs_v1"
INDEX = "model.safetensors.index.json"
ONE, TWO = (
    "model.safetensors",
    ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"),
)


def weights(seed: float) -> dict[str, torch.Tensor]:
    """Two float32 tensors of 64 bytes each: 128 tensor bytes."""
    return {"a": torch.full((16,), seed), "b": torch.arange(16, dtype=torch.float32) + seed}


def save(root: Path, step: int, state: Any, *, max_shard_size: int, **kw: Any) -> str:
    with AsyncCheckpointer(root, max_shard_size=max_shard_size) as ckpt:
        handle = ckpt.save(step, state, **kw)
        handle.wait(60)
    return handle.path


def header_doc(path: str | Path) -> dict[str, Any] | None:
    with safe_open(str(path), "pt") as f:
        text = (f.metadata() or {}).get(DOC_META_KEY)
    return None if text is None else dict(json.loads(text))


def manifest_of(path: str) -> Manifest:
    return Manifest.from_json(Path(path, MANIFEST_NAME).read_bytes(), where=path)


def model_files(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith("model"))


def assert_loads(path: str, want: dict[str, torch.Tensor]) -> None:
    assert verify_checkpoint(path).ok
    got = load_checkpoint(path)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    back = load_state(path)
    assert all(torch.equal(back[k], v) for k, v in want.items())


def test_exactly_at_the_shard_limit_is_one_file_one_byte_less_is_two(
    node: str, tmp_path: Path
) -> None:
    """128 tensor bytes with ``max_shard_size=128``: ``model.safetensors``, the document
    in its header, no index; with 127: two shards + the index, the document in the first."""
    one = save(tmp_path / "one", 1, weights(1.0), max_shard_size=128)
    assert model_files(one) == [ONE]
    doc = header_doc(Path(one, ONE))
    assert doc is not None and sorted(doc["tensors"]) == ["a", "b"]
    assert instance_doc_name(manifest_of(one), "model") == ONE
    assert_loads(one, weights(1.0))

    two = save(tmp_path / "two", 1, weights(2.0), max_shard_size=127)
    assert model_files(two) == sorted([*TWO, INDEX])
    doc = header_doc(Path(two, TWO[0]))
    assert doc is not None and {t["file"] for t in doc["tensors"].values()} == set(TWO)
    assert header_doc(Path(two, TWO[1])) is None
    assert instance_doc_name(manifest_of(two), "model") == TWO[0]
    index = json.loads(Path(two, INDEX).read_text())
    assert set(index["weight_map"].values()) == set(TWO)
    assert_loads(two, weights(2.0))


@pytest.mark.parametrize("first", [128, 127], ids=["one-file-then-shards", "shards-then-one-file"])
def test_overwrite_replaces_a_checkpoint_of_the_other_layout(
    node: str, tmp_path: Path, first: int
) -> None:
    """``overwrite=True`` leaves only the new layout: no stale index or shard that a
    reader (ours prefers the index, transformers ``model.safetensors``) could pick up."""
    second = 127 if first == 128 else 128
    old = save(tmp_path, 4, weights(1.0), max_shard_size=first)
    new = save(tmp_path, 4, weights(5.0), max_shard_size=second, overwrite=True)
    assert new == old
    assert model_files(new) == ([ONE] if second == 128 else sorted([*TWO, INDEX]))
    assert_loads(new, weights(5.0))


def test_overwrite_replaces_a_checkpoint_of_the_previous_layout(node: str, tmp_path: Path) -> None:
    """The golden checkpoint with ``model_state.json`` and a one-shard index, replaced."""
    shutil.copytree(GOLDEN, tmp_path / "checkpoints")
    path = str(tmp_path / "checkpoints" / "checkpoint-3")
    with AsyncCheckpointer(tmp_path) as ckpt:
        with pytest.raises(Exception, match="overwrite=True"):
            ckpt.save(3, golden_state()).wait(60)
        ckpt.save(3, golden_state(), overwrite=True).wait(60)
    assert sorted(os.listdir(path)) == [
        MANIFEST_NAME,
        "data_state.json",
        ONE,
        "optimizer_state.safetensors",
        "step_state.json",
    ]
    assert verify_checkpoint(path).ok
    back = load_state(path)
    assert back["model"]["head.weight"] is back["model"]["embed.weight"]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(argv)
    out = capsys.readouterr().out
    assert code == 0, (argv, out)
    return out


@pytest.mark.parametrize("layout", ["new", "previous"])
def test_the_tools_on_both_layouts(
    node: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    """``verify``, ``ls``, ``inspect``, ``export-hf`` and ``cp`` on a checkpoint of this
    layout and on the golden one of the previous layout; the copy loads the same."""
    root = tmp_path / "run"
    if layout == "new":
        path = save(root, 3, golden_state(), max_shard_size=1 << 20)
    else:
        shutil.copytree(GOLDEN, root / "checkpoints")
        path = str(root / "checkpoints" / "checkpoint-3")
    assert "ok" in _cli(["verify", path], capsys).lower()
    assert "checkpoint-3" in _cli(["ls", str(root)], capsys)
    shown = _cli(["inspect", path], capsys)
    assert "embed.weight" in shown and "optimizer" in shown
    _cli(["export-hf", path, str(tmp_path / "hf")], capsys)
    exported = load_checkpoint(str(tmp_path / "hf"))
    want = golden_state()["model"].state_dict()
    assert exported["head.weight"] is exported["embed.weight"]  # tied groups kept
    assert all(torch.equal(exported[k], v) for k, v in want.items())
    _cli(["cp", path, str(tmp_path / "copy")], capsys)
    assert verify_checkpoint(str(tmp_path / "copy")).ok
    copied = load_state(str(tmp_path / "copy"))
    assert all(torch.equal(copied["model"][k], v) for k, v in want.items())
    assert copied["step"] == 3


def test_read_document_and_param_sharing_name_what_is_wrong(node: str, tmp_path: Path) -> None:
    """A ``.safetensors`` document without the header key, and a malformed
    ``param_sharing``, are ``CorruptCheckpointError`` naming the file."""
    path = save(tmp_path, 1, weights(1.0), max_shard_size=1 << 20)
    ckpt = Location.parse(path)
    doc = read_document(ckpt, ONE, manifest=manifest_of(path))
    assert doc["key"] == "model" and doc["param_sharing"] == []
    other = save(tmp_path / "two", 1, weights(1.0), max_shard_size=64)
    with pytest.raises(CorruptCheckpointError, match=TWO[1]):
        read_document(Location.parse(other), TWO[1])
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(
        load_file(Path(path, ONE)),
        bad / ONE,
        metadata={"format": "pt", DOC_META_KEY: json.dumps({"param_sharing": [["a", 1]]})},
    )
    with pytest.raises(CorruptCheckpointError, match="param_sharing"):
        model_param_sharing(Location.parse(str(bad)), None, file_name=ONE)


def test_a_reused_plan_folds_each_saves_global_documents(node: str, tmp_path: Path) -> None:
    """The second ``save`` of the same state reuses the plans of the GLOBAL model and
    optimizer; their headers carry that save's document (the lr), byte for byte what a
    fresh checkpointer writes."""
    from ckptsvc import hooks

    state = golden_state()
    opt = state["optimizer"]
    seen: list[tuple[str, bool]] = []
    remove = hooks.install("plan.component", lambda *, key, reused: seen.append((key, reused)))
    try:
        with AsyncCheckpointer(tmp_path / "run") as ckpt:
            for step, lr in ((1, 0.5), (2, 0.25)):
                opt.param_groups[0]["lr"] = lr
                handle = ckpt.save(step, state)
                handle.wait(60)
    finally:
        remove()
    assert ("optimizer", True) in seen and ("model", True) in seen
    with AsyncCheckpointer(tmp_path / "fresh") as fresh:
        want = fresh.save(2, state)
        want.wait(60)
    for name in (ONE, "optimizer_state.safetensors"):
        assert Path(handle.path, name).read_bytes() == Path(want.path, name).read_bytes(), name
    doc = header_doc(Path(handle.path, "optimizer_state.safetensors"))
    assert doc is not None and '"lr": 0.25' in json.dumps(doc["state"])
    assert load_state(handle.path)["optimizer"]["param_groups"][0]["lr"] == 0.25
