"""Nested state <-> flat tensors + JSON skeleton (ckptsvc.flatten)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers_models import ALL_DTYPES, TiedLM, TinyMLP, assert_bitwise_equal, random_tensor

from ckptsvc.errors import CorruptCheckpointError, InvalidStateError
from ckptsvc.flatten import flatten_state, parse_skeleton, unflatten_state


def _roundtrip(state: object) -> object:
    flat = flatten_state(state)
    skeleton = parse_skeleton(flat.skeleton_json(), where="test")
    stored = {name: t.clone() for name, t in flat.tensors}  # what a load would return
    return unflatten_state(skeleton, stored)


def _assert_same(got: object, want: object, path: str = "state") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert_bitwise_equal(got, want, name=path)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), path
        for k in want:
            assert type(next(x for x in got if x == k)) is type(k), f"{path}: key type of {k!r}"
            _assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), path
    else:
        assert type(got) is type(want) and got == want, path


def test_nested_state_roundtrips_with_types_preserved() -> None:
    state = {
        "tensors": {str(d): random_tensor(d, (3, 2), seed=i) for i, d in enumerate(ALL_DTYPES)},
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "list": [1, 2.5, "x", None, True, [torch.arange(3)]],
        "tuple": (0.9, 0.999),
        "int_keys": {0: {"exp_avg": torch.ones(2)}, 1: "b", 2.5: None, None: 1, "s": 2},
        "floats": [float("nan"), float("inf"), -float("inf"), -0.0],
        "looks_like_marker": {"__tensor__": "not a tensor"},
        "nested": {"a": {"b": {"c": torch.zeros(1)}}},
    }
    _assert_same(_roundtrip(state), state)


def test_module_state_keeps_state_dict_names() -> None:
    model = TinyMLP()
    flat = flatten_state(model)
    assert [n for n, _ in flat.tensors] == list(model.state_dict())
    got = _roundtrip(model)
    _assert_same(got, dict(model.state_dict()))


def test_nested_names_join_path_with_dots() -> None:
    flat = flatten_state({"model": TinyMLP(), "opt": {"state": {0: {"m": torch.ones(1)}}}})
    names = [n for n, _ in flat.tensors]
    assert "model.fc1.weight" in names and "opt.state.0.m" in names


def test_optimizer_state_roundtrips() -> None:
    model = TinyMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    got = _roundtrip({"opt": opt})
    want = opt.state_dict()
    _assert_same(got["opt"], want)  # type: ignore[index]
    fresh = torch.optim.AdamW(TinyMLP().parameters())
    fresh.load_state_dict(got["opt"])  # type: ignore[index]


def test_tied_weights_are_stored_once_and_retied() -> None:
    model = TiedLM()
    flat = flatten_state(model)
    names = [n for n, _ in flat.tensors]
    assert flat.param_sharing == (("embed.weight", "head.weight"),)
    assert "embed.weight" in names and "head.weight" not in names
    got = _roundtrip(model)
    assert got["head.weight"] is got["embed.weight"]  # type: ignore[index]
    assert_bitwise_equal(got["head.weight"], model.head.weight.detach())  # type: ignore[index]


def test_partially_overlapping_views_are_independent_copies() -> None:
    base = torch.arange(10.0)
    flat = flatten_state({"all": base, "head": base[:4], "same": base})
    assert sorted(n for n, _ in flat.tensors) == ["all", "head"]
    assert flat.param_sharing == (("all", "same"),)
    got = _roundtrip({"all": base, "head": base[:4], "same": base})
    assert_bitwise_equal(got["head"], base[:4])  # type: ignore[index]


def test_skeleton_is_strict_json() -> None:
    flat = flatten_state({"x": float("nan"), "t": torch.ones(1), "k": {1: 2}})
    doc = json.loads(flat.skeleton_json())  # no NaN literal: allow_nan=False succeeded
    assert doc["state"]["x"] == {"__float__": "nan"}
    assert doc["state"]["t"] == {"__tensor__": "t"}
    assert doc["state"]["k"] == {"__dict__": [[1, 2]]}


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"a": {"b": object()}}, "'a.b'"),
        ({"a": {1, 2}}, "'a'"),
        ({"m": torch.empty(2, device="meta")}, "'m'"),
        ({"s": torch.eye(2).to_sparse()}, "'s'"),
        ({"c": torch.zeros(2, dtype=torch.complex128)}, "'c'"),
        ({"d": {(1, 2): 3}}, "'d.<tuple key>'"),
        ({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, "'a.b'"),
        ({"": torch.ones(1)}, "'': an empty key"),
    ],
)
def test_invalid_state_names_the_key(state: object, where: str) -> None:
    with pytest.raises(InvalidStateError, match=r".*") as info:
        flatten_state(state)
    assert where in str(info.value)


def test_signature_depends_on_names_shapes_dtypes_only() -> None:
    a = flatten_state({"w": torch.zeros(2, 3), "n": 1})
    b = flatten_state({"w": torch.ones(2, 3), "n": 2})
    c = flatten_state({"w": torch.ones(3, 2)})
    d = flatten_state({"w": torch.ones(2, 3, dtype=torch.float16)})
    assert a.signature() == b.signature()
    assert a.signature() != c.signature() != d.signature()
    assert a.nbytes == 24


def test_unflatten_reports_missing_tensor() -> None:
    flat = flatten_state({"w": torch.ones(1)})
    with pytest.raises(CorruptCheckpointError, match="'w'"):
        unflatten_state(flat.skeleton, {})


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1]",
        b'{"format": "other", "state": 1}',
        b'{"format": "ckptsvc-state", "version": 99, "state": 1}',
    ],
)
def test_parse_skeleton_rejects_bad_documents(raw: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match=r"skel\.json"):
        parse_skeleton(raw, where="skel.json")


def test_parameters_are_detached() -> None:
    model = TinyMLP()
    flat = flatten_state({"p": model.fc1.weight})
    ((_, t),) = flat.tensors
    assert not t.requires_grad and t.data_ptr() == model.fc1.weight.data_ptr()
