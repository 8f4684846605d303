"""Shard planning and the Hugging Face index (``ckptsvc.format.layout``), plus the Forgather-level
``make_shard_index`` built on it: tensor bytes (not storage bytes) decide the cuts, file
names follow the HF convention, and the caller's metadata is never mutated."""

from __future__ import annotations

import copy
import json
import re

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import ckptsvc.sharded_checkpoint as sc
from ckptsvc.errors import InvalidStateError
from ckptsvc.format.layout import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    TensorSpec,
    assign_shards,
    index_file_name,
    make_index,
    plan_files,
    shard_file_name,
)
from ckptsvc.format.safetensors_stream import parse_header

SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
BIN_RE = re.compile(r"^pytorch_model-(\d{5})-of-(\d{5})\.bin$")


def shards_in_order(weight_map: dict[str, str]) -> list[list[str]]:
    """Group names by file, files in order of first appearance."""
    out: dict[str, list[str]] = {}
    for name, f in weight_map.items():
        out.setdefault(f, []).append(name)
    return list(out.values())


# ---- names -----------------------------------------------------------------------------------


def test_hf_file_names() -> None:
    assert (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) == (
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    )
    assert (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) == (
        "model.safetensors",
        "model.safetensors.index.json",
    )
    assert index_file_name(True) == "model.safetensors.index.json"
    assert index_file_name(False) == "pytorch_model.bin.index.json"
    assert shard_file_name(1, 3, safetensors=True) == "model-00001-of-00003.safetensors"
    assert shard_file_name(12, 120, safetensors=False) == "pytorch_model-00012-of-00120.bin"


@pytest.mark.parametrize("safetensors", [True, False])
def test_assigned_names_are_numbered_1_to_n(safetensors: bool) -> None:
    group = [(f"w{i}", 40) for i in range(10)]
    wm = assign_shards([group], max_shard_size=100, safetensors=safetensors)
    pattern = SHARD_RE if safetensors else BIN_RE
    files = list(dict.fromkeys(wm.values()))
    n = len(files)
    assert n == 5
    for i, f in enumerate(files, start=1):
        m = pattern.match(f)
        assert m, f
        assert (int(m.group(1)), int(m.group(2))) == (i, n)


def test_single_shard_is_still_numbered() -> None:
    wm = assign_shards([[("a", 1), ("b", 2)]], max_shard_size=2**31, safetensors=True)
    assert set(wm.values()) == {"model-00001-of-00001.safetensors"}


# ---- assignment ------------------------------------------------------------------------------


def test_cut_before_the_tensor_that_would_overflow() -> None:
    wm = assign_shards(
        [[("a", 60), ("b", 40), ("c", 1), ("d", 100), ("e", 0)]],
        max_shard_size=100,
        safetensors=True,
    )
    assert shards_in_order(wm) == [["a", "b"], ["c"], ["d", "e"]]


def test_oversized_tensor_gets_a_shard_of_its_own() -> None:
    wm = assign_shards(
        [[("a", 10), ("huge", 1000), ("b", 10)]], max_shard_size=100, safetensors=True
    )
    assert shards_in_order(wm) == [["a"], ["huge"], ["b"]]


def test_groups_never_share_a_shard() -> None:
    wm = assign_shards(
        [[("r0.a", 1), ("r0.b", 1)], [("r1.a", 1)], []], max_shard_size=100, safetensors=False
    )
    assert shards_in_order(wm) == [["r0.a", "r0.b"], ["r1.a"]]
    assert list(wm) == ["r0.a", "r0.b", "r1.a"], "input order is kept"


def test_nonpositive_limit_is_refused() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_shard_size"):
            assign_shards([[("a", 1)]], max_shard_size=bad, safetensors=True)


def test_empty_input_gives_empty_map() -> None:
    assert assign_shards([], max_shard_size=10, safetensors=True) == {}


@settings(deadline=None)  # max_examples: the conftest profile (200; fast lane 25)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=40),
    limit=st.integers(min_value=1, max_value=400),
)
def test_assignment_properties(sizes: list[int], limit: int) -> None:
    group = [(f"t{i:03}", n) for i, n in enumerate(sizes)]
    wm = assign_shards([group], max_shard_size=limit, safetensors=True)
    assert list(wm) == [name for name, _ in group]
    nbytes = dict(group)
    shards = shards_in_order(wm)
    assert [n for s in shards for n in s] == [name for name, _ in group], (
        "shards are contiguous runs"
    )
    for i, shard in enumerate(shards):
        total = sum(nbytes[n] for n in shard)
        assert total <= limit or len(shard) == 1, (
            f"shard {i}: {total} > {limit} bytes in {len(shard)} tensors"
        )
        if i + 1 < len(shards):  # greedy: the next shard's first tensor did not fit
            assert total + nbytes[shards[i + 1][0]] > limit


# ---- plan_files and the index ----------------------------------------------------------------


def test_plan_files_headers_and_metadata() -> None:
    specs = [
        TensorSpec("embed.weight", "F32", (10, 4)),  # 160 bytes
        TensorSpec("norm.weight", "BF16", (4,)),  # 8
        TensorSpec("head.weight", "F32", (10, 4)),  # 160
        TensorSpec("step", "I64", ()),  # 8
    ]
    plans = plan_files(specs, max_shard_size=170, metadata={"producer": "test"})
    assert [p.file_name for p in plans] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert [sorted(e.name for e in p.layout.entries) for p in plans] == [
        ["embed.weight", "norm.weight"],
        ["head.weight", "step"],
    ]
    for p in plans:
        assert p.layout.metadata == {"format": "pt", "producer": "test"}, (
            "transformers needs format=pt"
        )
        parsed = parse_header(p.layout.header, file_nbytes=None, where=p.file_name)
        assert parsed.entries == tuple(sorted(parsed.entries, key=lambda e: (e.begin, e.end)))
        assert {e.name for e in parsed.entries} == {e.name for e in p.layout.entries}
    assert sum(p.layout.data_nbytes for p in plans) == sum(s.nbytes for s in specs) == 336


def test_plan_files_rejects_duplicates() -> None:
    with pytest.raises(InvalidStateError, match="dup"):
        plan_files(
            [TensorSpec("dup", "F32", (1,)), TensorSpec("dup", "F32", (1,))], max_shard_size=100
        )


def test_tensor_spec_nbytes() -> None:
    assert TensorSpec("a", "BF16", (3, 5)).nbytes == 30
    assert TensorSpec("a", "F64", ()).nbytes == 8
    assert TensorSpec("a", "F32", (4, 0)).nbytes == 0


def test_make_index_structure_and_no_mutation() -> None:
    caller_meta = {"dtype": "bfloat16", "nested": {"a": [1]}}
    before = copy.deepcopy(caller_meta)
    sharing = [["embed.weight", "head.weight"]]
    weight_map = {"embed.weight": "model-00001-of-00001.safetensors"}
    index = make_index(weight_map, total_size=123, metadata=caller_meta, param_sharing=sharing)
    assert caller_meta == before, "the caller's metadata dict must not be mutated"
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"] == {
        "dtype": "bfloat16",
        "nested": {"a": [1]},
        "total_size": 123,
        "param_sharing": sharing,
    }
    assert index["weight_map"] == weight_map and index["weight_map"] is not weight_map
    json.dumps(index)  # plain JSON
    bare = make_index({}, total_size=0)
    assert bare == {"metadata": {"total_size": 0}, "weight_map": {}}


# ---- Forgather-level make_shard_index --------------------------------------------------------


def test_make_shard_index_counts_tensor_bytes_not_storage() -> None:
    huge = torch.zeros(1 << 20)  # 4 MiB of storage
    sd = {"view": huge[:4], "other": torch.ones(4), "third": torch.ones(2, dtype=torch.float64)}
    index = sc.make_shard_index([sd], max_shard_size=64, safetensors=True)
    assert index["metadata"]["total_size"] == 16 + 16 + 16
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}


def test_make_shard_index_splits_and_keeps_dicts_apart() -> None:
    sd0 = {f"a{i}": torch.zeros(8) for i in range(4)}  # 32 bytes each
    sd1 = {"b0": torch.zeros(8)}
    index = sc.make_shard_index([sd0, sd1], safetensors=False, max_shard_size=64)
    wm = index["weight_map"]
    assert shards_in_order(wm) == [["a0", "a1"], ["a2", "a3"], ["b0"]]
    assert all(BIN_RE.match(f) for f in wm.values())
    assert index["metadata"]["total_size"] == 5 * 32


def test_make_shard_index_does_not_mutate_metadata() -> None:
    meta = {"dtype": "float32"}
    index = sc.make_shard_index(
        [{"w": torch.ones(2)}], metadata=meta, safetensors=True, param_sharing_metadata=[["w", "v"]]
    )
    assert meta == {"dtype": "float32"}
    assert index["metadata"]["dtype"] == "float32"
    assert index["metadata"]["param_sharing"] == [["w", "v"]]
    assert index["metadata"]["total_size"] == 8


def test_make_shard_index_on_meta_device_matches_real() -> None:
    real = {
        "a": torch.zeros(10, 10),
        "b": torch.zeros(5, dtype=torch.bfloat16),
        "c": torch.zeros(100),
    }
    with torch.device("meta"):
        meta = {k: torch.empty_like(v, device="meta") for k, v in real.items()}
    assert sc.make_shard_index([meta], max_shard_size=450) == sc.make_shard_index(
        [real], max_shard_size=450
    )


def test_make_shard_index_default_limit_is_forgathers() -> None:
    import inspect

    params = inspect.signature(sc.make_shard_index).parameters
    assert list(params) == [
        "state_dictionaries",
        "metadata",
        "safetensors",
        "max_shard_size",
        "param_sharing_metadata",
    ]
    assert params["max_shard_size"].default == 2**32
    assert params["safetensors"].default is False
