"""The cached save plan (issue 15): later saves of a state with the same signature reuse
the first save's plan (counted through the ``plan.component`` hook point), and every kind
of change plans again. Whatever happened, the files must be byte for byte the files a
fresh checkpointer writes for the same state (and load back to it).

``node`` (tests/conftest.py): a private node writer per test, checked for leaks.
"""

from __future__ import annotations

import gc
import os
import pickle
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_models import TiedLM, TinyMLP, assert_bitwise_equal

from ckptsvc import hooks
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, load_state
from ckptsvc.format.layout import FilePlan
from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.format.safetensors_stream import plan_shard
from ckptsvc.stage.copy_program import RUN_TENSOR_BYTES, copy_program


@contextmanager
def planned() -> Iterator[list[tuple[str, bool]]]:
    """``(component key, reused)`` of every component planned while inside."""
    seen: list[tuple[str, bool]] = []
    remove = hooks.install("plan.component", lambda *, key, reused: seen.append((key, reused)))
    try:
        yield seen
    finally:
        remove()


def saved(ckpt: AsyncCheckpointer, step: int, state: Any) -> str:
    """Save, wait until committed, return the checkpoint's path."""
    handle = ckpt.save(step, state)
    handle.wait()
    return handle.path


def files_of(path: str) -> dict[str, bytes]:
    """Every file of a checkpoint but its manifest (which records times), by name."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel != MANIFEST_NAME:
                out[rel] = Path(full).read_bytes()
    return out


def fresh_files(tmp_path: Path, step: int, state: Any) -> dict[str, bytes]:
    """The files a new checkpointer (planning from scratch) writes for ``state``."""
    root = tmp_path / f"fresh-{step}"
    with AsyncCheckpointer(root) as ckpt, planned() as seen:
        path = saved(ckpt, step, state)
        assert seen and not any(reused for _, reused in seen)
        return files_of(path)


def assert_same_checkpoint(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from a fresh plan's"


def assert_loads_as(path: str, state: dict[str, Any]) -> None:
    loaded = load_state(path)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert_bitwise_equal(loaded[key], value, name=key)
        elif isinstance(value, dict):
            for k, v in value.items():
                assert_bitwise_equal(loaded[key][k], v, name=f"{key}.{k}")


def test_later_saves_of_a_training_state_reuse_the_plan(node: str, tmp_path: Path) -> None:
    model = TinyMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randn(4, 16)

    def train() -> None:
        opt.zero_grad()
        model(batch).square().mean().backward()
        opt.step()

    train()
    with AsyncCheckpointer(tmp_path / "run") as ckpt:
        for step in range(3):
            state = {"model": model, "optimizer": opt, "step": step, "lr": 1e-3 / (step + 1)}
            with planned() as seen:
                path = saved(ckpt, step, state)
            assert [k for k, _ in seen] == ["model", "optimizer", "step", "lr"]
            assert all(reused == (step > 0) for _, reused in seen), seen
            assert_same_checkpoint(files_of(path), fresh_files(tmp_path, step, state))
            loaded = load_state(path)
            assert loaded["step"] == step and loaded["lr"] == state["lr"]
            for k, v in model.state_dict().items():
                assert_bitwise_equal(loaded["model"][k], v, name=k)
            train()


def _tensors() -> dict[str, Any]:
    torch.manual_seed(0)
    b = torch.randn(2, 3)
    return {
        "a": torch.randn(4),
        "b": b,
        "c": torch.randn(4, 4),
        "d": torch.randn(2, 3),
        "e": b,  # tied to "b" from the start
        "n": [torch.randn(3), 1, "x"],
        "s": torch.tensor(7),
    }


#: change name -> (change the "weights" component, whether its plan may be reused)
CHANGES: dict[str, tuple[Callable[[dict[str, Any]], Any], bool]] = {
    "values only": (lambda w: w["a"].add_(1), True),
    "new tensors, same signature": (lambda w: w.update(a=w["a"].clone(), c=w["c"].clone()), True),
    "strides only": (lambda w: w.update(c=w["c"].t()), True),
    "non-tensor value": (lambda w: w["n"].__setitem__(1, float("inf")), True),
    "shape": (lambda w: w.update(d=torch.randn(3, 2)), False),
    "1-d length": (lambda w: w.update(a=torch.randn(5)), False),
    "dtype": (lambda w: w.update(a=w["a"].double()), False),
    "key added": (lambda w: w.update(z=torch.randn(2)), False),
    "key removed": (lambda w: w.pop("d"), False),
    "key order": (lambda w: w.update(d=w.pop("d")), False),
    "tensor became a value": (lambda w: w.update(a=3), False),
    "value became a tensor": (lambda w: w["n"].__setitem__(1, torch.ones(2)), False),
    "list length": (lambda w: w["n"].append(2), False),
    "newly tied": (lambda w: w.update(d=w["b"]), False),
    "untied": (lambda w: w.update(e=w["b"].clone()), False),
    "0-d to 1-d": (lambda w: w.update(s=torch.tensor([7])), False),
    "empty tensor": (lambda w: w.update(a=torch.empty(0)), False),
    "parameter": (lambda w: w.update(a=torch.nn.Parameter(w["a"])), False),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_replans_and_the_files_stay_right(node: str, tmp_path: Path, change: str) -> None:
    mutate, reusable = CHANGES[change]
    weights = _tensors()
    state = {"weights": weights, "step": 0}
    with AsyncCheckpointer(tmp_path / "run") as ckpt:
        saved(ckpt, 0, state)
        with planned() as seen:
            saved(ckpt, 1, state)
        assert seen == [("weights", True), ("step", True)]
        mutate(weights)
        state["step"] = 2
        with planned() as seen:
            path = saved(ckpt, 2, state)
        assert dict(seen)["weights"] is reusable
        assert_same_checkpoint(files_of(path), fresh_files(tmp_path, 2, state))
        loaded = load_state(path)["weights"]
        for k, v in weights.items():
            if isinstance(v, torch.Tensor):
                assert_bitwise_equal(loaded[k], v.detach(), name=k)
        with planned() as seen:  # the new plan is the one kept (a tensor without data
            saved(ckpt, 3, state)  # pointer, an empty one, is planned every save)
        empty = any(isinstance(t, torch.Tensor) and t.numel() == 0 for t in weights.values())
        assert dict(seen)["weights"] is not empty


def test_a_mapping_of_tensors_that_gets_a_value_replans(node: str, tmp_path: Path) -> None:
    weights: dict[str, Any] = {"a": torch.randn(3), "b": torch.randn(3)}
    with AsyncCheckpointer(tmp_path / "run") as ckpt:
        saved(ckpt, 0, {"model": weights})
        weights["b"] = 5
        with planned() as seen:
            path = saved(ckpt, 1, {"model": weights})
        assert seen == [("model", False)]
        assert_same_checkpoint(files_of(path), fresh_files(tmp_path, 1, {"model": weights}))
        assert load_state(path)["model"]["b"] == 5


def test_tied_weights_stay_tied_and_untying_replans(node: str, tmp_path: Path) -> None:
    model = TiedLM()
    with AsyncCheckpointer(tmp_path / "run") as ckpt:
        saved(ckpt, 0, {"model": model})
        with planned() as seen:
            path = saved(ckpt, 1, {"model": model})
        assert seen == [("model", True)]
        assert_same_checkpoint(files_of(path), fresh_files(tmp_path, 1, {"model": model}))
        loaded = load_state(path)["model"]
        assert loaded["embed.weight"] is loaded["head.weight"]
        model.head.weight = torch.nn.Parameter(model.embed.weight.detach().clone() + 1)
        with planned() as seen:
            path = saved(ckpt, 2, {"model": model})
        assert seen == [("model", False)]
        assert_same_checkpoint(files_of(path), fresh_files(tmp_path, 2, {"model": model}))
        loaded = load_state(path)["model"]
        assert loaded["embed.weight"] is not loaded["head.weight"]
        assert_bitwise_equal(loaded["head.weight"], model.head.weight.detach(), name="head")


def test_many_small_tensors_reuse_and_copy_in_runs(node: str, tmp_path: Path) -> None:
    """Thousands of tiny tensors of mixed dtypes and shapes: the layout is cut into runs
    that one ``torch.cat`` copies each; the result is the fresh plan's, bitwise."""
    torch.manual_seed(1)
    shapes = [(16,), (4, 4), (2, 8), (3,), (1, 16)]
    dtypes = [torch.float32, torch.bfloat16, torch.int64]
    weights = {
        f"t{i}": torch.randn(shapes[i % 5]).to(dtypes[i % 3] if i % 7 else torch.float32)
        for i in range(3000)
    }
    weights["big"] = torch.randn(RUN_TENSOR_BYTES // 4 + 1)
    weights["scalar"] = torch.tensor(3.0)
    state = {"model": weights}
    with AsyncCheckpointer(tmp_path / "run") as ckpt:
        saved(ckpt, 0, state)
        for t in weights.values():
            t.add_(1)
        with planned() as seen:
            path = saved(ckpt, 1, state)
        assert seen == [("model", True)]
        assert_same_checkpoint(files_of(path), fresh_files(tmp_path, 1, state))
        assert_loads_as(path, state)


def test_copy_program_cuts_runs_at_dtype_shape_size_and_rank() -> None:
    layout = plan_shard(
        [
            ("a", "F32", (4,)),
            ("b", "F32", (2,)),
            ("c", "F32", (2, 3)),
            ("d", "F32", (1, 3)),
            ("e", "F32", ()),
            ("f", "I64", (2,)),
            ("g", "F32", (RUN_TENSOR_BYTES // 4 + 1,)),
        ]
    )
    program = copy_program([FilePlan("x.safetensors", layout)], [0])
    order = [e.name for e in layout.entries]
    runs = [[order[i] for i in range(r.first, r.stop)] for r in program.runs]
    singles = {order[i] for i in program.singles}
    assert ["f"] not in runs and "f" in singles  # alone in its dtype
    assert {"e", "g"} <= singles  # 0-d; bigger than RUN_TENSOR_BYTES
    assert ["a", "b"] in runs and ["c", "d"] in runs
    for r in program.runs:
        start, _dtype, shape = r.spec
        assert start == program.specs[r.first][0]
        assert shape[0] == sum(program.specs[i][2][0] for i in range(r.first, r.stop))


def test_shard_layout_travels_as_its_header() -> None:
    layout = plan_shard([(f"t{i}", "F32", (16,)) for i in range(1000)], metadata={"k": "v"})
    wire = pickle.dumps(layout, protocol=5)
    assert b"TensorEntry" not in wire
    back = pickle.loads(wire)
    assert back == layout and back.data_nbytes == layout.data_nbytes == 64_000
    assert back.file_nbytes == layout.file_nbytes
    assert back.entries == layout.entries  # parsed from the header when asked


def test_transformers_config_files_are_cached_while_unchanged(node: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from ckptsvc.format.hf_files import cached_pretrained_files, pretrained_files

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32)
    model = transformers.GPT2LMHeadModel(config)
    first = cached_pretrained_files(model)
    assert first == pretrained_files(model)
    assert cached_pretrained_files(model) == first
    model.config.n_positions = 64  # a change is seen at once
    changed = cached_pretrained_files(model)
    assert changed == pretrained_files(model) and changed != first
    with AsyncCheckpointer(tmp_path / "run") as ckpt:
        saved(ckpt, 0, {"model": model})
        with planned() as seen:
            path = saved(ckpt, 1, {"model": model})
        assert seen == [("model", True)]
        assert Path(path, "config.json").read_bytes() == changed["config.json"]
        assert_same_checkpoint(files_of(path), fresh_files(tmp_path, 1, {"model": model}))


def test_a_kept_plan_holds_no_old_tensor(node: str, tmp_path: Path) -> None:
    """The template of a component keeps no tensor of the state it was made from (a
    training loop that saves fresh copies must not keep the first one alive)."""
    old = torch.randn(64)
    gone = weakref.ref(old)
    with AsyncCheckpointer(tmp_path / "run") as ckpt:
        saved(ckpt, 0, {"model": {"w": old}})
        del old
        with planned() as seen:
            path = saved(ckpt, 1, {"model": {"w": torch.ones(64)}})
        assert seen == [("model", True)]
        gc.collect()
        assert gone() is None
        assert torch.equal(load_state(path)["model"]["w"], torch.ones(64))
