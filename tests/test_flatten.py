"""Nested state <-> flat tensors + JSON skeleton (ckptsvc.stage.flatten)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_models import ALL_DTYPES, TiedLM, TinyMLP, assert_bitwise_equal, random_tensor

from ckptsvc import AsyncCheckpointer
from ckptsvc.errors import CorruptCheckpointError, InvalidStateError
from ckptsvc.stage.flatten import (
    MAX_DEPTH,
    MAX_INT_DIGITS,
    MAX_PROBLEMS_SHOWN,
    flatten_state,
    parse_skeleton,
    unflatten_state,
)


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


# ---- the whole state is validated first (issue 17) -------------------------------------------
class _SelfStateful:
    """An object whose state_dict() holds the object itself (a cycle through state_dict)."""

    def state_dict(self) -> dict[str, object]:
        return {"me": self, "w": torch.ones(1)}


def _deep(levels: int) -> dict[str, object]:
    root: dict[str, object] = {}
    cur = root
    for _ in range(levels - 1):  # ``levels`` dicts, the root included
        nxt: dict[str, object] = {}
        cur["x"] = nxt
        cur = nxt
    return root


def _cyclic_dict() -> dict[str, object]:
    d: dict[str, object] = {"ok": 1}
    d["inner"] = {"back": d}
    return d


def _cyclic_list() -> dict[str, object]:
    lst: list[object] = [1]
    lst.append(lst)
    return {"opt": {"l": lst}}


def _nested_tensor() -> torch.Tensor:
    with warnings.catch_warnings():  # "nested tensors are a prototype"
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():  # deprecated in recent torch
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)


HOSTILE = {
    "surrogate key": ({"m": {"\udc80": torch.ones(1)}}, "'m.\\udc80'", "UTF-8"),
    "surrogate key, no tensor": ({"\ud800x": 1}, "'\\ud800x'", "UTF-8"),
    "huge int": (
        {"optimizer": {"state": {3: {"foo": 10**5000}}}},
        "'optimizer.state.3.foo'",
        "digits",
    ),
    "huge negative int": ({"n": -(10**MAX_INT_DIGITS)}, "'n'", "digits"),
    "huge int key": ({"d": {10**5000: 1}}, "'d.<int of 16610 bits>'", "digits"),
    "numpy vector": ({"a": np.ones(2)}, "'a'", "shape (2,)"),
    "numpy 1x1": ({"a": np.ones((1, 1))}, "'a'", "shape (1, 1)"),
    "numpy 0-d": ({"a": np.array(3)}, "'a'", "torch.from_numpy"),
    "cycle dict": (_cyclic_dict(), "'inner.back'", "cycle"),
    "cycle list": (_cyclic_list(), "'opt.l.1'", "the key 'opt.l'"),
    "cycle via state_dict": ({"s": _SelfStateful()}, "'s.me'", "cycle"),
    "500 deep": (_deep(500), "'" + ".".join(["x"] * MAX_DEPTH) + "'", f"{MAX_DEPTH} levels"),
    "nested tensor": ({"n": _nested_tensor()}, "'n'", "torch.nested"),
    "quantized tensor": ({"q": _quantized()}, "'q'", "quantized"),
    "set": ({"a": [0, {1}]}, "'a.1'", "set"),
    "complex scalar": ({"c": 1j}, "'c'", "complex"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_state_is_one_invalid_state_error(case: str) -> None:
    state, key, reason = HOSTILE[case]
    with pytest.raises(InvalidStateError) as info:
        flatten_state(state)
    text = str(info.value)
    assert key in text and reason in text, text
    assert len(info.value.problems) == 1
    text.encode("ascii")  # escaped: the message itself always prints


def test_every_problem_is_listed_capped_in_the_message() -> None:
    n = MAX_PROBLEMS_SHOWN + 5
    state = {
        "model": {"w": torch.ones(2)},
        "arrays": [np.zeros(3) for _ in range(n - 2)],
        "deep": {"\udc80": 0},
        "big": 2 ** (4 * MAX_INT_DIGITS),
    }
    with pytest.raises(InvalidStateError) as info:
        flatten_state(state)
    problems = info.value.problems
    assert len(problems) == n
    assert [k for k, _ in problems][-2:] == ["deep.\\udc80", "big"]
    text = str(info.value)
    assert f"{n} values in the state cannot be checkpointed" in text
    assert "'arrays.0'" in text and f"'arrays.{MAX_PROBLEMS_SHOWN - 1}'" in text
    assert f"'arrays.{MAX_PROBLEMS_SHOWN}'" not in text
    assert "and 5 more" in text


def test_values_at_the_limits_still_roundtrip() -> None:
    big = 10**MAX_INT_DIGITS - 1
    shared = [1, 2]
    state = {
        "ints": [big, -big, 2**64 - 1, -(2**63)],
        "int_keys": {big: "b", -(2**63): "c"},
        "shared": [shared, shared],  # the same list twice is not a cycle
        "surrogate_value": "a\udc80b",  # values may hold surrogates (JSON escapes them)
        "np_scalars": [np.float64(1.5), np.int64(7)],
    }
    got = _roundtrip(state)
    _assert_same(got, {**state, "np_scalars": [1.5, 7]})
    for beyond in (big + 1, -big - 1):  # one more digit is refused, as value and as key
        with pytest.raises(InvalidStateError, match="digits"):
            flatten_state({"v": beyond})
        with pytest.raises(InvalidStateError, match="digits"):
            flatten_state({"k": {beyond: 1}})


@pytest.mark.parametrize("kind", ["dict", "tuple", "int_key_dict", "stateful"])
def test_deepest_allowed_state_roundtrips(kind: str) -> None:
    """MAX_DEPTH levels of the most expensive containers pass, save and load back."""

    class Wrap:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def state_dict(self) -> object:
            return {"i": self.inner}

    leaf: object = torch.ones(1)
    for _ in range(MAX_DEPTH if kind != "stateful" else MAX_DEPTH // 2):
        if kind == "dict":
            leaf = {"x": leaf}
        elif kind == "tuple":
            leaf = (leaf,)
        elif kind == "int_key_dict":
            leaf = {0: leaf}
        else:
            leaf = Wrap(leaf)  # a stateful object and its dict: two levels
    got = _roundtrip(leaf)
    for _ in range(MAX_DEPTH if kind != "stateful" else MAX_DEPTH // 2):
        got = got["i"] if kind == "stateful" else got["x"] if kind == "dict" else got[0]  # type: ignore[index]
    assert_bitwise_equal(got, torch.ones(1))  # type: ignore[arg-type]
    with pytest.raises(InvalidStateError, match="levels deep"):
        flatten_state({"one_more": leaf})


def test_save_refuses_before_anything_is_written(node: str, tmp_path: Path) -> None:
    """Through a real AsyncCheckpointer: one error names both bad values, and no checkpoint
    directory is created; the next save of a good state works."""
    root = tmp_path / "root"
    state = {"w": torch.ones(3), "\udc80": torch.ones(1), "opt": {"m": np.ones((1, 1))}}
    with AsyncCheckpointer(root, arenas_per_rank=1) as ckpt:
        with pytest.raises(InvalidStateError) as info:
            ckpt.save(1, state)
        assert [k for k, _ in info.value.problems] == ["\\udc80", "opt.m"]
        assert not (root / "checkpoints").exists() or not any((root / "checkpoints").iterdir())
        ckpt.save(2, {"w": torch.ones(3)}).wait(60)
    assert not (root / "checkpoints" / "checkpoint-1").exists()
    assert (root / "checkpoints" / "checkpoint-2").is_dir()


def test_save_components_lists_problems_of_every_component() -> None:
    from ckptsvc.ranks import RankInfo
    from ckptsvc.stage.component_plan import plan_components
    from ckptsvc.stage.components import SharingPattern, StateComponent

    class S:
        def __init__(self, d: dict[object, object]) -> None:
            self.d = d

        def state_dict(self) -> dict[object, object]:
            return self.d

    comps = [
        StateComponent("model", S({"w": torch.ones(1), "a": np.ones(2)}), SharingPattern.GLOBAL),
        StateComponent("opt", S({"x": {1: 10**2000}}), SharingPattern.GLOBAL),
    ]
    with pytest.raises(InvalidStateError) as info:
        plan_components(
            comps, info=RankInfo.current(), process_groups=None, max_shard_size=2**20,
            user_metadata={},
        )  # fmt: skip
    assert [k for k, _ in info.value.problems] == ["model.a", "opt.x.1"]
