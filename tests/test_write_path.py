"""The write path's mechanics (issue 15): one big shard goes to S3 as several parts in
flight at once, a failed part leaves nothing visible, ``O_DIRECT`` bounce slots are reused
across files, and a sync save writes the same bytes with and without ``O_DIRECT``.

No timing: concurrency is shown by parts that wait for each other (a sequential upload
would never have them in flight together), reuse by counting mappings."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StorageRoot
from safetensors.torch import load_file
from test_direct_io import direct_capable

from ckptsvc.errors import StorageError
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.sharded_checkpoint import load_checkpoint, save_checkpoint
from ckptsvc.storage import Location, bounce, direct_io, multipart
from ckptsvc.storage.bounce import BouncePool
from ckptsvc.storage.direct_io import DirectFile
from ckptsvc.storage.multipart import S3_MAX_PARTS, S3_MIN_PART_BYTES, part_size_for
from ckptsvc.workers.options import WriterOptions

MiB = 2**20


# ---- part sizes --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "expect_parts"),
    [
        (256 * MiB, 4),
        (24 * MiB + 4096, 4),  # a 24 MiB shard: four parts of 7 MiB, not one of 24 MiB
        (100 * MiB, 4),  # 25 MiB parts, not one of 64 MiB and one of 36 MiB
        (1024 * MiB, 16),  # big files keep the largest part (64 MiB)
        (12 * MiB, 3),  # never below S3's 5 MiB minimum
    ],
)
def test_parts_spread_one_file_over_the_parts_in_flight(size: int, expect_parts: int) -> None:
    part = part_size_for(size, part_size_bytes=64 * MiB, parts_in_flight=4)
    assert S3_MIN_PART_BYTES <= part <= 64 * MiB
    assert part % MiB == 0
    assert -(-size // part) == expect_parts


def test_part_size_without_a_hint_and_for_huge_files() -> None:
    assert part_size_for(None, part_size_bytes=64 * MiB, parts_in_flight=4) == 64 * MiB
    assert part_size_for(None, part_size_bytes=1, parts_in_flight=4) == S3_MIN_PART_BYTES
    huge = 2**40  # 1 TiB: 64 MiB parts would be 16,384 of them, over S3's 10,000
    part = part_size_for(huge, part_size_bytes=64 * MiB, parts_in_flight=4)
    assert -(-huge // part) <= S3_MAX_PARTS


# ---- S3: one shard, several parts in flight -----------------------------------------------
class _PartGate:
    """Wraps the S3 requests of ``storage.multipart``: counts them by API call, and holds
    each UploadPart until ``expect`` parts have started (or ``patience_s`` passed), so the
    parts are in flight together only if the sink really sends them concurrently."""

    def __init__(self, expect: int, *, fail_part: int | None = None) -> None:
        self.expect = expect
        self.fail_part = fail_part
        self.calls: dict[str, int] = {}
        self.started = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.real = multipart._s3_request

    async def __call__(self, fs: Any, method: str, **kwargs: Any) -> Any:
        self.calls[method] = self.calls.get(method, 0) + 1
        if method != "upload_part":
            return await self.real(fs, method, **kwargs)
        self.started += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for _ in range(300):  # patience: 30 s for the other parts to start
                if self.started >= self.expect:
                    break
                await asyncio.sleep(0.1)
            if kwargs.get("PartNumber") == self.fail_part:
                raise PermissionError(f"injected: part {self.fail_part} refused")
            return await self.real(fs, method, **kwargs)
        finally:
            self.in_flight -= 1


@pytest.fixture
def big_tensor() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(15)
    return {"w": torch.randint(0, 2**31, (6 * MiB,), dtype=torch.int32, generator=gen)}  # 24 MiB


def test_one_big_shard_uploads_its_parts_concurrently(
    s3_root: StorageRoot, monkeypatch: pytest.MonkeyPatch, big_tensor: dict[str, torch.Tensor]
) -> None:
    """Default options, one 24 MiB shard: four parts, all four in flight at once."""
    gate = _PartGate(expect=4)
    monkeypatch.setattr(multipart, "_s3_request", gate)
    path = s3_root.join("ckpt")
    save_checkpoint(path, big_tensor, safetensors=True, storage_options=s3_root.storage_options)
    assert gate.calls.get("upload_part") == 4, gate.calls
    assert gate.calls.get("create_multipart_upload") == 1
    assert gate.calls.get("complete_multipart_upload") == 1
    assert gate.max_in_flight == 4
    assert s3_root.server is not None and s3_root.bucket is not None
    client = s3_root.server.boto3_client()
    ckpt = Location.parse(path, s3_root.storage_options)
    shards = [p for p in s3_root.fs().ls(ckpt.path) if p.endswith(".safetensors")]
    assert len(shards) == 1
    head = client.head_object(Bucket=s3_root.bucket, Key=shards[0].split("/", 1)[1])
    assert head["ETag"].strip('"').endswith("-4")  # S3's mark of a four-part upload
    got = load_checkpoint(path, storage_options=s3_root.storage_options)
    assert got is not None and torch.equal(got["w"], big_tensor["w"])


def test_a_failed_part_leaves_nothing_visible(
    s3_root: StorageRoot, monkeypatch: pytest.MonkeyPatch, big_tensor: dict[str, torch.Tensor]
) -> None:
    """Part 2 of 4 is refused (permanent, not retried): the save fails, the upload is
    aborted, no shard object and no complete checkpoint are visible."""
    gate = _PartGate(expect=4, fail_part=2)
    monkeypatch.setattr(multipart, "_s3_request", gate)
    path = s3_root.join("checkpoints", "checkpoint-1")
    with pytest.raises(StorageError, match="part 2 refused"):
        save_checkpoint(path, big_tensor, safetensors=True, storage_options=s3_root.storage_options)
    assert gate.calls.get("complete_multipart_upload") is None
    assert gate.calls.get("abort_multipart_upload") == 1
    assert s3_root.server is not None and s3_root.bucket is not None
    client = s3_root.server.boto3_client()
    assert not client.list_multipart_uploads(Bucket=s3_root.bucket).get("Uploads")
    ckpt = Location.parse(path, s3_root.storage_options)
    assert not [p for p in s3_root.fs().find(ckpt.path) if p.endswith(".safetensors")]
    assert find_latest_checkpoint(s3_root.url, storage_options=s3_root.storage_options) is None


# ---- local: bounce slots reused across files ----------------------------------------------
@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[BouncePool]:
    fresh = BouncePool()
    monkeypatch.setattr(bounce, "POOL", fresh)
    monkeypatch.setattr(direct_io, "_refused_devices", set())
    yield fresh


def _direct_or_skip(path: Path) -> None:
    if not direct_capable(path):
        pytest.skip(f"{path}: the filesystem refuses O_DIRECT")


def test_bounce_slots_are_reused_across_files(tmp_path: Path, pool: BouncePool) -> None:
    """Three files, each 12 slots' worth through the bounce: with one file's set of slots
    idle in the pool, no file maps another (how many a file holds at once depends on how
    fast its writes finish: at most ``_SLOTS``, all found idle)."""
    _direct_or_skip(tmp_path)
    slot = 64 * 1024
    warm = [pool.take(slot) for _ in range(direct_io._SLOTS)]
    for s in warm:
        pool.give(s)
    data = os.urandom(12 * slot + 100)  # bytes: never page aligned, so all via the bounce
    for i in range(3):
        f = DirectFile(str(tmp_path / f"f{i}"), chunk_nbytes=slot, size_hint_bytes=None, fsync=True)
        f.write(data)
        assert f._slots and all(any(x is w for w in warm) for x in f._slots)
        f.close()
        assert (tmp_path / f"f{i}").read_bytes() == data
        assert pool.mapped == direct_io._SLOTS  # every slot came from the pool
    assert pool.idle_bytes == direct_io._SLOTS * slot  # all given back, kept for the next


def test_aborted_file_gives_its_slots_back(tmp_path: Path, pool: BouncePool) -> None:
    _direct_or_skip(tmp_path)
    slot = 64 * 1024
    f = DirectFile(str(tmp_path / "f"), chunk_nbytes=slot, size_hint_bytes=None, fsync=True)
    f.write(os.urandom(3 * slot))
    f.abort()
    assert not (tmp_path / "f").exists()
    assert pool.idle_bytes == pool.mapped * slot > 0


def test_idle_slots_are_capped() -> None:
    small = BouncePool(idle_bytes_max=2 * 4096)
    slots = [small.take(4096) for _ in range(4)]
    for s in slots:
        small.give(s)
    assert small.idle_bytes == 2 * 4096
    assert small.take(4096) is slots[-1]  # the most recently given is reused first


def test_sync_save_maps_one_set_of_slots_for_all_its_shards(
    tmp_path: Path, pool: BouncePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four direct shards written one at a time share one set of bounce slots."""
    _direct_or_skip(tmp_path)
    monkeypatch.setenv("CKPTSVC_DIRECT_IO", "on")
    state = {f"t{i}": torch.randn(300_000 + i) for i in range(4)}  # ~1.2 MB each
    opts = WriterOptions.resolve(io_threads=1, direct_io_buffer_bytes=256 * 1024)
    path = tmp_path / "ckpt"
    save_checkpoint(
        str(path), state, safetensors=True, max_shard_size=1_300_000, writer_options=opts
    )
    assert len(list(path.glob("model-*.safetensors"))) == 4
    assert 0 < pool.mapped <= direct_io._SLOTS
    got = load_checkpoint(str(path))
    assert got is not None and all(torch.equal(got[k], state[k]) for k in state)


# ---- sync save: the same bytes either way -------------------------------------------------
def test_sync_save_bytes_identical_with_and_without_direct_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every shard and the index are byte-for-byte the same written with ``O_DIRECT`` (bounce
    slots, parallel writes, CRC beside) and through the page cache; safetensors reads them."""
    gen = torch.Generator().manual_seed(3)
    state = {
        "a.weight": torch.randn(1000, 1031, generator=gen),  # ~4 MB, sizes not block multiples
        "b.bias": torch.randn(17, generator=gen),
        "c.half": torch.randn(700_001, generator=gen).to(torch.bfloat16),
        "d.int": torch.arange(3_000_003, dtype=torch.int64),
    }
    written = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("CKPTSVC_DIRECT_IO", mode)
        path = tmp_path / mode
        save_checkpoint(str(path), state, safetensors=True, max_shard_size=8 * MiB)
        written[mode] = {
            p.name: p.read_bytes()
            for p in sorted(path.iterdir())
            if p.name.endswith((".safetensors", ".index.json"))
        }
    assert written["on"].keys() == written["off"].keys()
    assert len([n for n in written["on"] if n.endswith(".safetensors")]) >= 2
    for name, data in written["on"].items():
        assert data == written["off"][name], name
    loaded: dict[str, torch.Tensor] = {}
    for name in written["on"]:
        if name.endswith(".safetensors"):
            loaded.update(load_file(str(tmp_path / "on" / name)))
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# ---- local: zero-copy writes from a stable source (the node writer's arena) ---------------
def _arena(nbytes: int) -> tuple[Any, memoryview]:
    import mmap

    arena = mmap.mmap(-1, nbytes)
    arena[:] = os.urandom(nbytes)
    return arena, memoryview(arena)


def test_stable_source_keeps_writes_in_flight_across_chunks(
    tmp_path: Path, pool: BouncePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a stable source, ``write`` returns while its zero-copy writes are still held
    back (a chunk does not wait for its writes); the file is whole after ``close``. The
    writes from the source wait on a gate that opens only after ``write`` returned: a
    ``write`` that waited for them would see the gate's patience run out first."""
    import threading

    _direct_or_skip(tmp_path)
    arena, source = _arena(12 * MiB)
    gate = threading.Event()
    done_from_source = []
    real, real_v = os.pwrite, os.pwritev

    def gated(fd: int, data: Any, offset: int) -> int:
        from_source = memoryview(data).obj is arena
        if from_source:
            gate.wait(30)
        n = real(fd, data, offset)
        if from_source:
            done_from_source.append(n)
        return n

    def gated_v(fd: int, pieces: list[Any], offset: int) -> int:  # gathered writes
        from_source = [memoryview(p).obj is arena for p in pieces]
        if any(from_source):
            gate.wait(30)
        n = real_v(fd, pieces, offset)
        assert n == sum(memoryview(p).nbytes for p in pieces)
        done_from_source.extend(
            memoryview(p).nbytes for p, src in zip(pieces, from_source, strict=True) if src
        )
        return n

    monkeypatch.setattr(os, "pwrite", gated)
    monkeypatch.setattr(os, "pwritev", gated_v)
    header = bytes(4096)
    f = DirectFile(
        str(tmp_path / "f"), chunk_nbytes=MiB, size_hint_bytes=None, fsync=True, stable_source=True
    )
    f.write(header)
    f.write(source[: 4 * MiB])  # the header block's write proves O_DIRECT; these queue
    assert done_from_source == []
    gate.set()
    for lo in range(4 * MiB, 12 * MiB, 2 * MiB):
        f.write(source[lo : lo + 2 * MiB])
    f.close()
    source.release()
    assert (tmp_path / "f").read_bytes() == header + arena[:]
    assert sum(done_from_source) == 12 * MiB


def test_stable_source_write_error_surfaces_and_abort_removes_the_file(
    tmp_path: Path, pool: BouncePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued zero-copy write that fails is raised by a later ``write`` or ``close``,
    with the file's name; ``abort`` drops queued writes and deletes the file."""
    _direct_or_skip(tmp_path)
    _, source = _arena(8 * MiB)
    real, real_v = os.pwrite, os.pwritev
    calls = {"n": 0}

    def failing(fd: int, data: Any, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] >= 2:  # the first proves O_DIRECT; a later one (queued) fails
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    def failing_v(fd: int, pieces: list[Any], offset: int) -> int:
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(28, "No space left on device")
        return real_v(fd, pieces, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    monkeypatch.setattr(os, "pwritev", failing_v)
    path = tmp_path / "f"
    sink = Location.parse(str(path)).open_sink(direct_io="on", stable_source=True)
    with pytest.raises(StorageError, match="f"):
        for lo in range(0, 8 * MiB, 2 * MiB):
            sink.write(source[lo : lo + 2 * MiB])
        sink.close()
    sink.abort()
    assert not path.exists()


# ---- sync save: heap tensors copied into huge-page slots ------------------------------
def test_sync_save_writes_heap_tensors_through_the_slots_and_the_same_bytes_twice(
    tmp_path: Path, pool: BouncePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``save_checkpoint`` copies the caller's heap tensors into the bounce slots (whose
    pages are physically contiguous) instead of writing them from their own scattered
    pages: no write reads the tensors' memory. Two saves of one state write identical
    files, which safetensors reads, and the manifest's CRC-32C matches the bytes."""
    from ckptsvc.format.checksum import crc32c_hex
    from ckptsvc.format.manifest import Manifest
    from ckptsvc.storage.buffer_address import address_of

    _direct_or_skip(tmp_path)
    monkeypatch.setenv("CKPTSVC_DIRECT_IO", "on")
    gen = torch.Generator().manual_seed(5)
    state = {f"w{i}": torch.randn(2**19 + 1024 * i, generator=gen) for i in range(6)}
    state["bias"] = torch.randn(1000, generator=gen)
    spans = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in state.values()]
    written = {"from_tensors": 0, "total": 0}
    real, real_v = os.pwrite, os.pwritev

    def note(piece: Any) -> None:
        view = memoryview(piece)
        written["total"] += view.nbytes
        if any(lo <= address_of(view) < hi for lo, hi in spans):
            written["from_tensors"] += view.nbytes

    def recording(fd: int, data: Any, offset: int) -> int:
        note(data)
        return real(fd, data, offset)

    def recording_v(fd: int, pieces: list[Any], offset: int) -> int:
        for piece in pieces:
            note(piece)
        return real_v(fd, pieces, offset)

    monkeypatch.setattr(os, "pwrite", recording)
    monkeypatch.setattr(os, "pwritev", recording_v)
    save_checkpoint(str(tmp_path / "a"), state, safetensors=True)
    monkeypatch.undo()
    save_checkpoint(str(tmp_path / "b"), state, safetensors=True)

    tensor_nbytes = sum(t.nbytes for t in state.values())
    assert written["total"] > tensor_nbytes and written["from_tensors"] == 0
    assert pool.mapped > 0  # the bytes went through slots, of huge pages
    assert all(slot.huge for slot in pool._idle.values())
    (shard,) = (tmp_path / "a").glob("*.safetensors")
    data = shard.read_bytes()
    assert data == (tmp_path / "b" / shard.name).read_bytes()
    loaded = load_file(str(shard))
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    manifest = Manifest.from_json(
        (tmp_path / "a" / "checkpoint_manifest.json").read_bytes(),
        where="checkpoint_manifest.json",
    )
    (record,) = [f for f in manifest.files if f.path == shard.name]
    assert record.crc32c == crc32c_hex(data) and record.nbytes == len(data)


def test_huge_bounce_slots_are_advised_as_huge_and_others_are_not(pool: BouncePool) -> None:
    """A slot starts on a 2 MiB boundary; a ``huge`` one carries the huge-page advice
    (``hg`` in ``/proc/self/smaps``) where the kernel offers transparent huge pages, an
    ordinary one does not (a header block in it must not make 2 MiB resident). The pool
    hands each kind out for its own kind only."""
    nbytes = bounce.HUGE_PAGE_BYTES * 2
    huge, plain = pool.take(nbytes, huge=True), pool.take(nbytes)
    try:
        for slot in (huge, plain):
            assert slot.address % bounce.HUGE_PAGE_BYTES == 0 and slot.view.nbytes == nbytes
            slot.view[:] = b"x" * nbytes  # writable, private memory
        assert "hg" not in _vm_flags_at(plain.address)
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
        if thp.exists() and "[never]" not in thp.read_text():
            assert "hg" in _vm_flags_at(huge.address)
    finally:
        pool.give(huge)
        pool.give(plain)
    assert pool.take(nbytes) is plain and pool.take(nbytes, huge=True) is huge


def _vm_flags_at(address: int) -> list[str]:
    """The ``VmFlags`` of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_gathered_writes_of_many_pieces_keep_every_byte(
    tmp_path: Path, pool: BouncePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a stable source, pieces in step with the file (page-aligned chunks), pieces
    that are not, and small ones go out as few ``pwritev`` s (bounce blocks of several
    pieces share one slot); the file is byte for byte the input."""
    _direct_or_skip(tmp_path)
    _, source = _arena(24 * MiB)
    calls = {"pwritev": 0}
    real_v = os.pwritev

    def counting(fd: int, pieces: list[Any], offset: int) -> int:
        calls["pwritev"] += 1
        return real_v(fd, pieces, offset)

    monkeypatch.setattr(os, "pwritev", counting)
    f = DirectFile(
        str(tmp_path / "f"), chunk_nbytes=MiB, size_hint_bytes=None, fsync=True, stable_source=True
    )
    expected = bytearray()
    pieces = [source[: 4096 + 64]]  # a header whose data starts 64 bytes past a block
    lo = 64
    for n in [2 * MiB, 1000, 3 * MiB + 8, 70_000, 2 * MiB, 5, 4 * MiB + 4096]:
        pieces.append(source[lo + 8192 : lo + 8192 + n])  # 64 bytes past a page, or not
        lo += n + 8192 + 8
    for piece in pieces:
        f.write(piece)
        expected += piece
    f.close()
    assert (tmp_path / "f").read_bytes() == bytes(expected)
    assert 0 < calls["pwritev"] < len(pieces)


def test_a_failed_direct_write_commits_nothing(
    tmp_path: Path, pool: BouncePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync save whose slot writes fail (on the writing threads, after the first one
    went through) raises with the file's name and leaves the committed checkpoint it was
    to replace as it was."""
    _direct_or_skip(tmp_path)
    monkeypatch.setenv("CKPTSVC_DIRECT_IO", "on")
    gen = torch.Generator().manual_seed(9)
    old = {f"w{i}": torch.randn(2**21, generator=gen) for i in range(4)}  # 4 slots' worth
    path = tmp_path / "ckpt"
    save_checkpoint(str(path), old, safetensors=True)
    new = {k: v + 1 for k, v in old.items()}
    calls = {"n": 0, "failed": 0}
    real = os.pwrite

    def failing(fd: int, data: Any, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 1 and memoryview(data).nbytes >= MiB:
            calls["failed"] += 1
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(StorageError, match="safetensors"):
        save_checkpoint(str(path), new, safetensors=True)
    monkeypatch.undo()
    assert calls["failed"] >= 1  # the failure came from a slot's write
    got = load_checkpoint(str(path))
    assert got is not None and all(torch.equal(got[k], old[k]) for k in old)
