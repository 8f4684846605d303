"""The host-memory budget: arena counts, piecewise staging and streaming, failures, peak RSS.

Real writer process, real shared memory, real kill -9, moto S3 on loopback.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import faulty_fs  # noqa: F401  (registers faulty:// in this process)
import pytest
import torch
from conftest import StorageRoot

from ckptsvc import hooks, knobs
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, load_components, load_state
from ckptsvc.errors import SaveFailedError, StorageError, WriterDiedError
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.format.layout import TensorSpec, plan_files
from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.liveness import pid_alive
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.stage.arena import ArenaPool, StagingArena, copy_into, plan_arena
from ckptsvc.stage.components import SharingPattern, StateComponent
from ckptsvc.stage.piecewise import (
    MIN_BUDGET_BYTES,
    MemoryBudget,
    PieceStreamer,
    _row_major_views,
    flat_segments,
)
from ckptsvc.stage.tensors import dtype_from_torch, dtype_to_torch
from ckptsvc.tools.bench_budget import measure_budget_peak
from ckptsvc.workers.protocol import PieceDone, PieceReady
from ckptsvc.workers.shm import ShmSegment

SHM = "/dev/shm"
MiB = 1 << 20


@pytest.fixture
def node(node: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The conftest's leak-checked private node, with the budget knobs at their defaults."""
    monkeypatch.delenv("CKPTSVC_MEMORY_BUDGET_BYTES", raising=False)
    monkeypatch.delenv("CKPTSVC_ARENAS_PER_RANK", raising=False)
    return node


def segments(node: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if n.startswith(f"ckptsvc-{node}-"))


def mixed_state(seed: int) -> dict[str, Any]:
    """~8.6 MiB of tensors of several dtypes and layouts (odd sizes, views, 0-d, empty)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(700, 1200, generator=g, dtype=torch.float64)
    return {
        "f32": torch.randn(1000, 1100, generator=g),  # 4.4 MiB: cut by several pieces
        "bf16": torch.randn(777, 1001, generator=g).to(torch.bfloat16),
        "f64_transposed": wide[:, :500].t(),  # non-contiguous (500 x 700, strided)
        "i64_every_other": torch.arange(300_001, dtype=torch.int64)[::2],  # strided 1-D
        "i8_odd": torch.randint(-128, 127, (123_457,), generator=g, dtype=torch.int8),
        "flags": torch.rand(99_999, generator=g) > 0.5,
        "f16_permuted": torch.randn(33, 45, 57, generator=g).to(torch.float16).permute(2, 0, 1),
        "scalar": torch.tensor(seed * 1.5, dtype=torch.float64),
        "empty": torch.zeros(0, 7),
        "step": seed,
        "note": "budget",
    }


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            bits = got[k].reshape(-1).view(torch.uint8)
            assert torch.equal(bits, v.contiguous().reshape(-1).view(torch.uint8)), k
        else:
            assert got[k] == v, k


# ---- configuration ---------------------------------------------------------------------------


def test_budget_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTSVC_MEMORY_BUDGET_BYTES", raising=False)
    monkeypatch.delenv("CKPTSVC_ARENAS_PER_RANK", raising=False)
    resolve = MemoryBudget.resolve
    assert resolve(memory_budget_bytes=None, arenas_per_rank=None) == MemoryBudget(None, 1)
    assert resolve(memory_budget_bytes=None, arenas_per_rank=2) == MemoryBudget(None, 2)
    assert resolve(memory_budget_bytes=64 * MiB, arenas_per_rank=None) == MemoryBudget(64 * MiB, 2)
    assert resolve(memory_budget_bytes=64 * MiB, arenas_per_rank=1) == MemoryBudget(64 * MiB, 1)
    monkeypatch.setenv("CKPTSVC_MEMORY_BUDGET_BYTES", str(8 * MiB))
    budget = resolve(memory_budget_bytes=None, arenas_per_rank=None)
    assert budget == MemoryBudget(8 * MiB, 2)
    assert budget.ring_nbytes == 8 * MiB and budget.piece_nbytes == 4 * MiB
    assert not budget.streams(8 * MiB) and budget.streams(8 * MiB + 1)
    assert resolve(memory_budget_bytes=0, arenas_per_rank=None) == MemoryBudget(None, 1)
    assert knobs.MEMORY_BUDGET_BYTES.default == 0 and knobs.ARENAS_PER_RANK.default == 0


@pytest.mark.parametrize("value", [1, MIN_BUDGET_BYTES - 1, -5])
def test_a_budget_too_small_or_negative_is_refused_at_construction(
    node: str, tmp_path: Path, value: int
) -> None:
    with pytest.raises(ValueError, match="memory_budget_bytes") as info:
        AsyncCheckpointer(tmp_path, memory_budget_bytes=value)
    if value > 0:
        assert "too small" in str(info.value) and str(MIN_BUDGET_BYTES) in str(info.value)


def test_no_space_for_an_arena_names_the_budget_option(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info:
        ShmSegment.create("ckptsvc-test-huge", 1 << 60, shm_dir=str(tmp_path))
    text = str(info.value)
    assert "--shm-size" in text and "memory_budget_bytes" in text
    assert "CKPTSVC_MEMORY_BUDGET_BYTES" in text
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "shape, perm",
    [((6, 7), (1, 0)), ((3, 4, 5), (2, 0, 1)), ((4, 5, 6, 3), (3, 1, 0, 2)), ((50,), None)],
)
def test_row_major_views_cover_any_range_without_copying(
    shape: tuple[int, ...], perm: tuple[int, ...] | None
) -> None:
    base = torch.arange(math.prod(shape), dtype=torch.int32).reshape(shape)
    src = base.permute(perm) if perm else base[::2]
    flat = src.reshape(-1).clone()
    n = src.numel()
    for i0 in range(0, n, 7):
        for i1 in (i0 + 1, i0 + 13, n):
            i1 = min(i1, n)
            views = _row_major_views(src, i0, i1)
            got = torch.cat([v.reshape(-1) for _, v in views])
            assert torch.equal(got, flat[i0:i1]), (i0, i1)
            assert [a for a, _ in views] == list(
                itertools_accumulate(i0, [v.numel() for _, v in views])
            )
            for _, v in views:
                assert v.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def itertools_accumulate(start: int, sizes: list[int]) -> list[int]:
    out, at = [], start
    for s in sizes:
        out.append(at)
        at += s
    return out


# ---- arena counts ----------------------------------------------------------------------------


def _gated(tmp_path: Path) -> tuple[Path, str, dict[str, str]]:
    gate = tmp_path / "gate"
    gate.touch()
    return gate, f"faulty://{tmp_path}/root", {"gate_path": str(gate)}


def _blocks(fn: Any) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(1.0)
    return t, box


def test_default_is_one_arena_and_a_second_save_waits(node: str, tmp_path: Path) -> None:
    gate, root, options = _gated(tmp_path)
    state = {"w": torch.randn(64, 1024)}
    with AsyncCheckpointer(root, storage_options=options) as ckpt:
        first = ckpt.save(1, state)
        t, second = _blocks(lambda: ckpt.save(2, state))
        assert t.is_alive(), "with one arena the second save waits for the first (back-pressure)"
        assert len(segments(node)) == 1
        gate.unlink()
        t.join(60)
        assert first.done() and second[0].timings.arena_wait_s > 0
        ckpt.wait_all(60)
        assert len(segments(node)) == 1


def test_budget_for_two_states_gives_two_arenas(node: str, tmp_path: Path) -> None:
    gate, root, options = _gated(tmp_path)
    state = {"w": torch.randn(256, 1024)}  # 1 MiB
    with AsyncCheckpointer(root, storage_options=options, memory_budget_bytes=3 * MiB) as ckpt:
        first, second = ckpt.save(1, state), ckpt.save(2, state)  # neither waits
        assert not first.done() and not second.done()
        assert len(segments(node)) == 2
        t, _ = _blocks(lambda: ckpt.save(3, state))
        assert t.is_alive(), "a third arena would exceed arenas_per_rank (2)"
        gate.unlink()
        t.join(60)
        ckpt.wait_all(60)
        assert len(segments(node)) == 2
        assert not first.timings.streamed


def test_budget_below_two_states_gives_one_arena(node: str, tmp_path: Path) -> None:
    gate, root, options = _gated(tmp_path)
    state = {"w": torch.randn(512, 1024)}  # 2 MiB: two do not fit in 3 MiB
    with AsyncCheckpointer(root, storage_options=options, memory_budget_bytes=3 * MiB) as ckpt:
        ckpt.save(1, state)
        t, _ = _blocks(lambda: ckpt.save(2, state))
        assert t.is_alive() and len(segments(node)) == 1
        gate.unlink()
        t.join(60)
        ckpt.wait_all(60)


# ---- streamed round trips --------------------------------------------------------------------


def _check_streamed(handle: Any, budget: int) -> None:
    t = handle.timings
    assert t.streamed and t.pieces >= 4, t  # state ~4x the budget, pieces of budget / 2
    assert t.blocking_s >= t.copy_s >= 0 and t.piece_wait_s >= 0


@pytest.mark.parametrize("max_shard_size", [None, 3 * MiB // 2], ids=["one-shard", "shards"])
def test_state_4x_the_budget_round_trips_bitwise_on_local_disk(
    node: str, tmp_path: Path, max_shard_size: int | None
) -> None:
    budget = 2 * MiB
    root = str(tmp_path / "root")
    with AsyncCheckpointer(root, memory_budget_bytes=budget, max_shard_size=max_shard_size) as c:
        handles = [c.save(step, mixed_state(step)) for step in (1, 2)]
        for h in handles:
            h.wait(60)
            _check_streamed(h, budget)
        assert len(segments(node)) == 1
        assert os.path.getsize(os.path.join(SHM, segments(node)[0])) == budget
    path = find_latest_checkpoint(root)
    assert path is not None and path.endswith("checkpoint-2")
    assert verify_checkpoint(path).ok
    assert_same(load_state(path), mixed_state(2))
    assert_same(load_state(handles[0].path), mixed_state(1))


def test_state_4x_the_budget_round_trips_bitwise_on_s3(node: str, s3_root: StorageRoot) -> None:
    opts = s3_root.storage_options
    with AsyncCheckpointer(s3_root.url, storage_options=opts, memory_budget_bytes=2 * MiB) as c:
        h = c.save(7, mixed_state(7))
        h.wait(120)
        _check_streamed(h, 2 * MiB)
    path = find_latest_checkpoint(s3_root.url, storage_options=opts)
    assert path is not None and verify_checkpoint(path, storage_options=opts).ok
    assert_same(load_state(path, storage_options=opts), mixed_state(7))


class _Holder:
    """A Stateful over a dict of tensors (loads in place)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, Any]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            self.tensors[k].copy_(v)


def test_save_components_streams_too(node: str, tmp_path: Path) -> None:
    state = {k: v for k, v in mixed_state(3).items() if isinstance(v, torch.Tensor)}
    extra = {"m": torch.randn(300, 1000)}
    replicated = {"r": torch.randn(200, 1000).t()}  # validated: CRCs from the staged pieces
    root = str(tmp_path / "root")
    with AsyncCheckpointer(root, memory_budget_bytes=2 * MiB, max_shard_size=3 * MiB) as ckpt:
        h = ckpt.save_components(
            3,
            [
                StateComponent("model", _Holder(state), SharingPattern.GLOBAL),
                StateComponent("extra", _Holder(extra), SharingPattern.PER_RANK),
                StateComponent(
                    "rep", _Holder(replicated), SharingPattern.REPLICATED, validate_replication=True
                ),
            ],
        )
        h.wait(60)
        _check_streamed(h, 2 * MiB)
    assert verify_checkpoint(h.path).ok
    got = _Holder({k: torch.zeros_like(v.contiguous()) for k, v in state.items()})
    got_extra = _Holder({"m": torch.zeros(300, 1000)})
    got_rep = _Holder({"r": torch.zeros(1000, 200)})
    load_components(
        h.path,
        [
            StateComponent("model", got, SharingPattern.GLOBAL),
            StateComponent("extra", got_extra, SharingPattern.PER_RANK),
            StateComponent("rep", got_rep, SharingPattern.REPLICATED),
        ],
    )
    for k, v in state.items():
        assert torch.equal(got.tensors[k], v), k
    assert torch.equal(got_extra.tensors["m"], extra["m"])
    assert torch.equal(got_rep.tensors["r"], replicated["r"])


# ---- failures --------------------------------------------------------------------------------


def test_writer_killed_mid_stream_fails_the_save_and_the_next_one_works(
    node: str, tmp_path: Path
) -> None:
    gate, root, options = _gated(tmp_path)
    with AsyncCheckpointer(root, storage_options=options, memory_budget_bytes=2 * MiB) as ckpt:
        pid = ckpt.writer_pid
        assert pid is not None
        t, box = _blocks(lambda: _outcome(lambda: ckpt.save(1, mixed_state(1))))
        assert t.is_alive(), "the writer is stuck: save waits for a free slot"
        os.kill(pid, signal.SIGKILL)
        t.join(60)
        assert not t.is_alive() and isinstance(box[0], WriterDiedError), box
        gate.unlink()
        h = ckpt.save(2, mixed_state(2))
        h.wait(60)
        assert ckpt.writer_pid not in (None, pid)
        ckpt.wait_all(60)  # the failure was raised by save(): not reported again
    assert not (tmp_path / "root" / "checkpoints" / "checkpoint-1" / MANIFEST_NAME).exists()
    latest = find_latest_checkpoint(root, storage_options=options)
    assert latest is not None and latest.endswith("checkpoint-2")
    assert_same(load_state(latest, storage_options=options), mixed_state(2))


def _outcome(fn: Any) -> Any:
    try:
        return fn()
    except Exception as e:
        return e


def test_storage_error_mid_stream_fails_the_save_and_nothing_commits(
    node: str, tmp_path: Path
) -> None:
    fail = tmp_path / "fail"
    fail.touch()
    root = f"faulty://{tmp_path}/root"
    options = {"fail_path": str(fail), "fail_after_bytes": 3 * MiB}
    with AsyncCheckpointer(root, storage_options=options, memory_budget_bytes=2 * MiB) as ckpt:
        with pytest.raises(SaveFailedError, match="failed while streaming"):
            ckpt.save(1, mixed_state(1))  # the writer fails after 3 MiB: save() is still staging
        fail.unlink()
        ckpt.save(2, mixed_state(2)).wait(60)
        ckpt.wait_all(60)
    assert not (tmp_path / "root" / "checkpoints" / "checkpoint-1" / MANIFEST_NAME).exists()
    latest = find_latest_checkpoint(root, storage_options=options)
    assert latest is not None and latest.endswith("checkpoint-2")


def test_trainer_error_mid_stream_cancels_the_job(node: str, tmp_path: Path) -> None:
    calls = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("copy exploded")

    root = str(tmp_path / "root")
    with AsyncCheckpointer(root, memory_budget_bytes=2 * MiB) as ckpt:
        remove = hooks.install("snapshot.copy.before", flaky)
        try:
            with pytest.raises(RuntimeError, match="copy exploded"):
                ckpt.save(1, mixed_state(1))
        finally:
            remove()
        h = ckpt.save(2, mixed_state(2))  # waits for the cancelled job to give the ring back
        h.wait(60)
        ckpt.wait_all(60)
    assert not (tmp_path / "root" / "checkpoints" / "checkpoint-1" / MANIFEST_NAME).exists()
    assert_same(load_state(h.path), mixed_state(2))


# ---- the memory bound ------------------------------------------------------------------------


@pytest.mark.slow
def test_peak_extra_memory_of_a_state_4x_the_budget_stays_within_the_budget(
    tmp_path: Path,
) -> None:
    budget = 16 * MiB
    result = measure_budget_peak(
        state_nbytes=4 * budget, budget_nbytes=budget, root=str(tmp_path / "root")
    )
    assert result["streamed_pieces"] >= 8, result
    assert result["shm_peak_bytes"] <= budget, result
    assert result["extra_bytes"] <= 1.10 * budget, result
    # the probe measures something: the ring is in the trainer's resident set
    assert result["trainer_extra_bytes"] >= budget // 2, result


_TRAINER = """
import json, sys, threading, time, torch
import faulty_fs
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
root, gate = sys.argv[1:3]
ckpt = AsyncCheckpointer(root, storage_options={"gate_path": gate}, memory_budget_bytes=2 << 20)
w = torch.arange(2_000_000, dtype=torch.float32)  # 8 MiB: streamed
ckpt.save(1, {"w": w}).wait(60)
open(gate, "w").close()
print(json.dumps({"writer": ckpt.writer_pid}), flush=True)
ckpt.save(2, {"w": w + 1})  # blocks: the writer is stuck on the gate, the ring is full
time.sleep(600)
"""


@pytest.mark.slow
def test_trainer_killed_mid_stream_leaves_no_manifest_and_no_shared_memory(
    node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPTSVC_WRITER_LINGER_S", "60")  # only the EOF path may reclaim in time
    gate = tmp_path / "gate"
    root = f"faulty://{tmp_path}/root"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    child = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, root, str(gate)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        info = json.loads(child.stdout.readline())  # type: ignore[union-attr]
        ckpt2 = tmp_path / "root" / "checkpoints" / "checkpoint-2"
        _wait_until(lambda: any(ckpt2.glob("*.part-*")), "save 2 to stream its first piece")
        child.send_signal(signal.SIGKILL)
        child.wait()
        gate.unlink()
        _wait_until(lambda: not segments(node), "the writer to reclaim the dead trainer's ring")
        assert pid_alive(info["writer"])
        os.kill(info["writer"], signal.SIGTERM)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not (tmp_path / "root" / "checkpoints" / "checkpoint-2" / MANIFEST_NAME).exists()
    latest = find_latest_checkpoint(root, storage_options={"gate_path": str(gate)})
    assert latest is not None and latest.endswith("checkpoint-1")


def _wait_until(cond: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class _AckingClient:
    """Stands in for the writer connection: every piece is copied out and acknowledged."""

    def __init__(self, ring: StagingArena) -> None:
        self.ring = ring
        self.stream = bytearray()
        self.callback: Any = None

    def watch_pieces(self, job_id: int, callback: Any) -> None:
        self.callback = callback

    def send(self, message: Any) -> None:
        assert isinstance(message, PieceReady) and message.offset == len(self.stream)
        at = message.arena_offset
        self.stream += bytes(self.ring.segment.buffer[at : at + message.nbytes])
        self.callback(PieceDone(message.job_id, message.seq))


def test_streamer_stages_the_exact_layout_and_crcs(node: str) -> None:
    tensors = [(k, v) for k, v in mixed_state(5).items() if isinstance(v, torch.Tensor)]
    specs = [TensorSpec(k, dtype_from_torch(v.dtype), tuple(v.shape)) for k, v in tensors]
    files = plan_files(specs, max_shard_size=MiB)
    plan = plan_arena(files)
    views = [(s.name, dtype_to_torch(s.dtype), s.shape) for s in specs]
    segs = flat_segments(plan, views, tensors)
    pool = ArenaPool(max_arenas=1, node=node, budget_bytes=2 * MiB)
    ring, _ = pool.acquire(2 * MiB)
    try:
        streamer = PieceStreamer(
            ring=ring,
            piece_nbytes=MiB,
            layout_nbytes=plan.nbytes,
            segments=segs,
            on_outcome=lambda outcome: None,
            copy=copy_into,
            threads=1,
            executor=None,
            what="test",
            crc_segments=range(len(segs)),
        )
        client = _AckingClient(ring)
        stats = streamer.run(client, 1)  # type: ignore[arg-type,unused-ignore]
        streamer.release()
    finally:
        pool.release(ring)
        pool.close()
    assert stats.pieces == math.ceil(plan.nbytes / MiB) and len(client.stream) == plan.nbytes
    for i, (name, t) in enumerate(tensors):
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        at = plan.tensor_offsets[name]
        assert bytes(client.stream[at : at + len(raw)]) == raw, name
        assert stats.crcs[i] == crc32c_hex(raw), name


@pytest.mark.gpu
def test_cuda_state_streams_through_the_pinned_ring(node: str, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu = {k: v for k, v in mixed_state(9).items() if isinstance(v, torch.Tensor)}
    state = {k: v.cuda() for k, v in cpu.items()}  # .cuda() keeps each layout's values
    root = str(tmp_path / "root")
    with AsyncCheckpointer(root, memory_budget_bytes=2 * MiB) as ckpt:
        h = ckpt.save(9, state)
        h.wait(60)
        _check_streamed(h, 2 * MiB)
    assert_same(load_state(h.path), cpu)
