"""``ckptsvc.gc_pause``: the collector is off inside loads and comes back as it was."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptsvc.read.weights as weights
from ckptsvc import load_checkpoint, save_checkpoint
from ckptsvc.gc_pause import gc_paused, with_gc_paused


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_nested_blocks_resume_the_collector_once_at_the_outermost_end() -> None:
    gc.enable()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block still runs
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled() -> None:
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_an_exception_still_resumes_the_collector() -> None:
    gc.enable()
    with pytest.raises(ZeroDivisionError), gc_paused():
        _ = 1 / 0
    assert gc.isenabled()


def test_overlapping_blocks_in_threads_resume_after_the_last_one() -> None:
    gc.enable()
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with gc_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with gc_paused():
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # this block ended, the other thread's has not
    release.set()
    t.join(10)
    assert gc.isenabled()


def test_decorator_keeps_the_signature_and_result() -> None:
    @with_gc_paused
    def f(x: int, *, y: int) -> tuple[int, bool]:
        return x + y, gc.isenabled()

    gc.enable()
    assert f(1, y=2) == (3, False)
    assert f.__name__ == "f" and gc.isenabled()


def test_load_checkpoint_reads_its_shards_with_the_collector_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {f"w{i}": torch.full((4,), float(i)) for i in range(5)}
    save_checkpoint(str(tmp_path / "c"), state, safetensors=True)
    seen: list[bool] = []
    real = weights.read_shard

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "read_shard", spy)
    gc.enable()
    got = load_checkpoint(str(tmp_path / "c"))
    assert seen == [False] and gc.isenabled()
    assert got is not None and all(torch.equal(got[k], v) for k, v in state.items())
