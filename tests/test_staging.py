"""Staging arenas: real POSIX shared memory, real child processes (ckptsvc.stage.arena,
ckptsvc.workers.shm)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers_models import ALL_DTYPES, assert_bitwise_equal, random_tensor

from ckptsvc.errors import StorageError
from ckptsvc.format.layout import TensorSpec, plan_files
from ckptsvc.liveness import pid_alive
from ckptsvc.stage.arena import ALIGN_BYTES, ArenaPool, StagingArena, copy_into, plan_arena
from ckptsvc.workers.shm import ShmSegment, reclaim_stale_segments, segment_prefix

SHM = "/dev/shm"


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A node id of this test alone; every segment it left behind is removed afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("CKPTSVC_NODE_ID", name)
    yield name
    for left in _segments(name):
        os.unlink(os.path.join(SHM, left))


def _segments(node: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if n.startswith(f"ckptsvc-{node}-"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_plan_puts_each_file_contiguous_and_page_aligned() -> None:
    specs = [TensorSpec(f"t{i}", "F32" if i % 2 else "BF16", (100 + i, 3)) for i in range(12)]
    files = plan_files(specs, max_shard_size=4000)
    assert len(files) > 2
    plan = plan_arena(files)
    for fp, base in zip(files, plan.file_offsets, strict=True):
        assert base % ALIGN_BYTES == 0
        cursor = base
        for e in fp.layout.entries:  # the data section, in entries order, without holes
            assert plan.tensor_offsets[e.name] == cursor
            cursor += e.nbytes
    ends = [b + f.layout.data_nbytes for b, f in zip(plan.file_offsets, files, strict=True)]
    assert all(end <= nxt for end, nxt in zip(ends, plan.file_offsets[1:], strict=False))
    assert plan.nbytes >= ends[-1]


def test_attach_sees_writes_and_never_unlinks(node: str) -> None:
    name = f"{segment_prefix(node)}{os.getpid()}-900"
    seg = ShmSegment.create(name, 8192)
    try:
        memoryview(seg.buffer)[:5] = b"hello"
        # A child attaches with our untracked mapping and exits: the segment must survive
        # (multiprocessing.shared_memory's resource tracker would unlink it here).
        code = (
            "import sys; from ckptsvc.workers.shm import ShmSegment; "
            f"s = ShmSegment.attach({name!r}); sys.stdout.write(bytes(s.buffer[:5]).decode()); s.close()"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout == "hello"
        assert os.path.exists(os.path.join(SHM, name))
        reader = ShmSegment.attach(name)
        with pytest.raises(TypeError):
            memoryview(reader.buffer)[0] = 1  # read-only mapping
        reader.close()
    finally:
        seg.close()
        seg.unlink()
    assert not os.path.exists(os.path.join(SHM, name))


def test_create_refuses_more_than_free_shared_memory(node: str) -> None:
    st = os.statvfs(SHM)
    too_big = st.f_bavail * st.f_frsize + (1 << 30)
    with pytest.raises(StorageError, match="--shm-size") as info:
        ShmSegment.create(f"{segment_prefix(node)}{os.getpid()}-901", too_big)
    assert "emptyDir" in str(info.value)
    assert _segments(node) == []


def test_pid_alive_treats_zombies_as_dead() -> None:
    assert pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    while True:  # not reaped yet: a zombie once it exits
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
    assert not pid_alive(proc.pid)
    proc.wait()
    assert not pid_alive(proc.pid)


def test_reclaim_unlinks_only_dead_owners_of_this_node(node: str) -> None:
    dead = f"{segment_prefix(node)}{_dead_pid()}-0"
    mine = f"{segment_prefix(node)}{os.getpid()}-0"
    other_node = f"{segment_prefix(node + 'x')}{_dead_pid()}-0"
    for name in (dead, mine, other_node):
        ShmSegment.create(name, 4096).close()
    try:
        assert reclaim_stale_segments(node) == [dead]
        assert not os.path.exists(os.path.join(SHM, dead))
        assert os.path.exists(os.path.join(SHM, mine))
        assert os.path.exists(os.path.join(SHM, other_node))
    finally:
        for name in (mine, other_node):
            if os.path.exists(os.path.join(SHM, name)):
                os.unlink(os.path.join(SHM, name))


def test_pool_double_buffers_and_applies_back_pressure(node: str) -> None:
    discarded: list[str] = []
    pool = ArenaPool(max_arenas=2, node=node, on_discard=discarded.append)
    a, _ = pool.acquire(10_000)
    b, _ = pool.acquire(10_000)
    assert a.name != b.name and len(_segments(node)) == 2
    got: list[tuple[StagingArena, float]] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(10_000)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # both arenas busy: the third save waits
    pool.release(a)
    t.join(10)
    assert got and got[0][0] is a and got[0][1] > 0  # reused, not re-created; wait reported
    assert len(_segments(node)) == 2
    pool.release(a)
    big, _ = pool.acquire(100_000)  # the free arena is too small: replaced
    assert big.nbytes >= 100_000 and discarded == [a.name]
    assert len(_segments(node)) == 2
    pool.discard(b)
    assert discarded == [a.name, b.name] and len(_segments(node)) == 1
    pool.release(big)
    pool.close()
    assert _segments(node) == []
    with pytest.raises(Exception, match="closed"):
        pool.acquire(1)


def test_close_unlinks_busy_arenas_too(node: str) -> None:
    pool = ArenaPool(max_arenas=2, node=node)
    arena, _ = pool.acquire(4096)
    pool.close()
    assert _segments(node) == []
    pool.release(arena)  # a late report after close is harmless


def _specs_and_sources() -> tuple[list[TensorSpec], list[torch.Tensor]]:
    from ckptsvc.stage.tensors import dtype_from_torch

    srcs = [random_tensor(d, (7, 5), seed=i) for i, d in enumerate(ALL_DTYPES)]
    srcs.append(random_tensor(torch.float32, (5, 7), seed=99).t())  # non-contiguous
    srcs.append(random_tensor(torch.float32, (6 << 20,), seed=7))  # 24 MiB: cut into pieces
    srcs.append(torch.tensor(2.5))  # 0-d
    srcs.append(torch.empty(0, 3))
    specs = [
        TensorSpec(f"t{i}", dtype_from_torch(s.dtype), tuple(s.shape)) for i, s in enumerate(srcs)
    ]
    return specs, srcs


@pytest.mark.parametrize("threads", [1, 3])
def test_copy_into_arena_views_is_bitwise_exact(node: str, threads: int) -> None:
    specs, srcs = _specs_and_sources()
    plan = plan_arena(plan_files(specs, max_shard_size=1 << 20))
    pool = ArenaPool(max_arenas=1, node=node)
    try:
        arena, _ = pool.acquire(plan.nbytes)
        view_specs = [(s.name, src.dtype, s.shape) for s, src in zip(specs, srcs, strict=True)]
        dsts = arena.views(plan, view_specs)
        assert arena.views(plan, view_specs) is dsts  # cached per plan
        with ThreadPoolExecutor(threads) as ex:
            copy_into(dsts, srcs, threads=threads, executor=ex)
        raw = memoryview(arena.segment.buffer)
        for s, src in zip(specs, srcs, strict=True):
            off = plan.tensor_offsets[s.name]
            want = bytes(src.contiguous().reshape(-1).view(torch.uint8).numpy())
            assert bytes(raw[off : off + s.nbytes]) == want, s.name
        del raw, dsts
        pool.release(arena)
    finally:
        pool.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copy_from_cuda_into_pinned_arena(node: str) -> None:
    specs, srcs = _specs_and_sources()
    cuda_srcs = [s.cuda() for s in srcs]
    plan = plan_arena(plan_files(specs, max_shard_size=1 << 20))
    pool = ArenaPool(max_arenas=1, node=node)
    try:
        arena, _ = pool.acquire(plan.nbytes)
        arena.pin()
        dsts = arena.views(
            plan, [(s.name, src.dtype, s.shape) for s, src in zip(specs, srcs, strict=True)]
        )
        copy_into(dsts, cuda_srcs, threads=1)
        for s, d, src in zip(specs, dsts, srcs, strict=True):
            assert_bitwise_equal(d, src, name=s.name)
        del dsts
        pool.release(arena)
    finally:
        pool.close()
