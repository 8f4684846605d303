"""O_DIRECT local writes (``storage.direct_io`` behind ``LocalSink``): the bytes on disk are
identical to a buffered write for every size and header alignment, filesystems that refuse
O_DIRECT (at open or at the first write) get a correct buffered file, abort leaves nothing,
I/O errors surface with the file's name, and whole saves (sync and async) round-trip."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsvc.errors import StorageError
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.sharded_checkpoint import load_checkpoint, save_checkpoint
from ckptsvc.storage import Location, direct_io
from ckptsvc.storage.direct_io import (
    AUTO_FILESYSTEMS,
    DirectFile,
    direct_io_mode,
    filesystem_type,
    want_direct,
)
from ckptsvc.testing.faultinject import OsFault, install_os_faults
from ckptsvc.workers.shard_writer import write_stream

KiB, MiB = 1024, 2**20
CHUNK = 8 * KiB  # small halves, so KiB-sized files exercise the flusher thread


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Forget refusals of earlier tests; small write chunks (many halves per file)."""
    monkeypatch.setattr(direct_io, "_refused_devices", set())
    monkeypatch.setenv("CKPTSVC_DIRECT_IO_BUFFER_BYTES", str(CHUNK))
    monkeypatch.setenv("CKPTSVC_WRITE_CHUNK_BYTES", str(3 * CHUNK // 2))
    monkeypatch.delenv("CKPTSVC_DIRECT_IO", raising=False)
    yield


def direct_capable(path: Path) -> bool:
    """Whether O_DIRECT works here (so a test can insist that it was used)."""
    probe = path / ".probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        try:
            os.write(fd, buf)
        except OSError:
            return False
        finally:
            buf.close()
    finally:
        os.close(fd)
        probe.unlink()
    return True


def payload(nbytes: int, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).numpy().tobytes()


def stream(path: Path, pieces: list[bytes], *, mode: str, size_hint: int | None = None) -> Any:
    sink = Location.parse(str(path)).open_sink(direct_io=mode, size_hint_bytes=size_hint)
    for piece in pieces:
        sink.write(memoryview(piece))
    sink.close()
    return sink


def split(data: bytes, first: int, step: int) -> list[bytes]:
    """A header-like first piece, then ``step``-byte pieces (the writer's pattern)."""
    pieces = [data[:first]]
    pieces += [data[i : i + step] for i in range(first, len(data), step)]
    return [p for p in pieces if p] or [b""]


SIZES = [0, 1, 4095, 4096, 4097, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 5 * CHUNK + 4095]
HEADERS = [8, 4088, 4095, 4096, 4097, 4104]


@pytest.mark.parametrize("nbytes", SIZES)
def test_bytes_identical_to_buffered(tmp_path: Path, nbytes: int) -> None:
    data = payload(nbytes)
    pieces = split(data, min(100, nbytes), 3000)
    buffered = stream(tmp_path / "buffered.bin", pieces, mode="off")
    direct = stream(tmp_path / "direct.bin", pieces, mode="on", size_hint=nbytes)
    assert not buffered.direct
    assert direct.direct == direct_capable(tmp_path)
    assert (tmp_path / "direct.bin").read_bytes() == data
    assert (tmp_path / "buffered.bin").read_bytes() == data


@pytest.mark.parametrize("header", HEADERS)
def test_header_alignments_and_piece_sizes(tmp_path: Path, header: int) -> None:
    """Data after an unaligned ``8 + N``-byte header, in pieces smaller, equal and larger
    than a half of the bounce buffer; the CRC-32C recorded matches the file."""
    data = payload(header + 3 * CHUNK + 777, seed=header)
    for step in (1000, CHUNK, 3 * CHUNK):
        path = tmp_path / f"h{header}-{step}.safetensors"
        record = write_stream(
            Location.parse(str(path)),
            split(data, header, step),
            rel_path=path.name,
            expect_nbytes=len(data),
        )
        assert path.read_bytes() == data
        assert record.nbytes == len(data) and record.crc32c == crc32c_hex(data)


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_big_pieces_copied_without_the_gil(tmp_path: Path, kind: type) -> None:
    """Pieces of 64 KiB and more take the ``memmove`` path (read-only sources included),
    across half boundaries and with a small piece first (unaligned file offsets)."""
    data = payload(3 * MiB + 4097, seed=7)
    path = tmp_path / "f.bin"
    f = DirectFile(str(path), chunk_nbytes=256 * KiB, size_hint_bytes=len(data), fsync=True)
    pos = 0
    for step in (13, 64 * KiB, 300 * KiB, 1 * MiB, 64 * KiB - 1, len(data)):
        f.write(kind(data[pos : pos + step]))
        pos += step
    f.close()
    assert path.read_bytes() == data


def test_write_chunk_larger_than_file_uses_small_buffer(tmp_path: Path) -> None:
    f = DirectFile(str(tmp_path / "f"), chunk_nbytes=64 * MiB, size_hint_bytes=5000, fsync=True)
    assert f._slot_nbytes == 8192  # bounce buffer sized to the file, not the chunk
    f.write(payload(5000))
    f.close()
    assert (tmp_path / "f").read_bytes() == payload(5000)


def test_refused_at_open_falls_back_and_logs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_open = os.open
    attempts = []

    def refusing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECT:
            attempts.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    caplog.set_level(logging.INFO, logger=direct_io.__name__)
    data = payload(3 * CHUNK + 5)
    for name in ("a.bin", "b.bin"):
        sink = stream(tmp_path / name, split(data, 13, 4000), mode="on")
        assert not sink.direct
        assert (tmp_path / name).read_bytes() == data
    refusals = [r for r in caplog.records if "refuses O_DIRECT" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.INFO
    assert len(attempts) == 1  # the second file did not try again on the same filesystem


def test_refused_at_first_write_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_pwrite = os.pwrite
    refused = []

    def refusing_pwrite(fd: int, data: Any, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    caplog.set_level(logging.INFO, logger=direct_io.__name__)
    data = payload(4 * CHUNK + 4097)
    path = tmp_path / "f.bin"
    f = DirectFile(str(path), chunk_nbytes=CHUNK, size_hint_bytes=None, fsync=True)
    for piece in split(data, 100, 5000):
        f.write(piece)
    f.close()
    assert path.read_bytes() == data
    assert len(refused) == 1  # the descriptor dropped O_DIRECT after the first refusal
    assert any("refuses O_DIRECT" in r.getMessage() for r in caplog.records)
    assert not want_direct(str(tmp_path), mode="on", size_hint_bytes=None)  # remembered


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_tmpfs(tmp_path: Path) -> None:
    """auto never uses O_DIRECT on tmpfs (no device to bypass); on writes correctly either
    way (recent kernels accept O_DIRECT on tmpfs, older ones refuse it at open)."""
    shm = Path("/dev/shm") / f"ckptsvc-test-direct-{os.getpid()}"
    shm.mkdir()
    try:
        assert filesystem_type(str(shm)) == "tmpfs"
        assert not want_direct(str(shm), mode="auto", size_hint_bytes=1 << 30)
        data = payload(3 * CHUNK + 11)
        for mode in ("auto", "on"):
            stream(shm / f"{mode}.bin", split(data, 9, 3000), mode=mode, size_hint=len(data))
            assert (shm / f"{mode}.bin").read_bytes() == data
    finally:
        for p in shm.iterdir():
            p.unlink()
        shm.rmdir()


@pytest.mark.parametrize("when", ["before_flush", "after_flush"])
def test_abort_removes_the_file(tmp_path: Path, when: str) -> None:
    path = tmp_path / "f.bin"
    sink = Location.parse(str(path)).open_sink(direct_io="on")
    sink.write(payload(100 if when == "before_flush" else 5 * CHUNK))
    assert path.exists()
    sink.abort()
    assert not path.exists()
    sink.abort()  # twice is harmless
    with pytest.raises(ValueError, match="after close or abort"):
        sink.write(b"x")


def test_abort_after_close_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    sink = stream(path, [payload(3 * CHUNK)], mode="on")
    sink.abort()
    assert path.read_bytes() == payload(3 * CHUNK)


@pytest.mark.parametrize(("op", "cause"), [("write", "EIO"), ("close", "EIO"), ("write", "ENOSPC")])
def test_io_error_names_the_file_and_cleans_up(tmp_path: Path, op: str, cause: str) -> None:
    path = tmp_path / "model-00001-of-00001.safetensors"
    undo = install_os_faults([OsFault(root=str(tmp_path), op=op, errno_name=cause)])
    try:
        with pytest.raises(StorageError) as info:
            write_stream(
                Location.parse(str(path)),
                split(payload(6 * CHUNK), 64, CHUNK),
                rel_path=path.name,
                expect_nbytes=6 * CHUNK,
            )
    finally:
        undo()
    assert path.name in str(info.value)
    assert os.strerror(getattr(errno, cause)).lower() in str(info.value).lower()
    assert not path.exists()


def test_modes_and_auto_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert direct_io_mode(True) == "on" and direct_io_mode(False) == "off"
    assert direct_io_mode() == "auto"
    monkeypatch.setenv("CKPTSVC_DIRECT_IO", "OFF")
    assert direct_io_mode() == "off"
    assert direct_io_mode("on") == "on"  # an explicit argument wins
    monkeypatch.setenv("CKPTSVC_DIRECT_IO", "sometimes")
    with pytest.raises(ValueError, match="CKPTSVC_DIRECT_IO"):
        direct_io_mode()
    d = str(tmp_path)
    on_auto_fs = filesystem_type(d) in AUTO_FILESYSTEMS
    assert not want_direct(d, mode="off", size_hint_bytes=1 << 30)
    assert want_direct(d, mode="on", size_hint_bytes=None)
    assert not want_direct(d, mode="auto", size_hint_bytes=None)
    assert not want_direct(d, mode="auto", size_hint_bytes=8 * MiB - 1)
    assert want_direct(d, mode="auto", size_hint_bytes=8 * MiB) == on_auto_fs
    monkeypatch.setenv("CKPTSVC_DIRECT_IO_MIN_BYTES", "4096")
    assert want_direct(d, mode="auto", size_hint_bytes=4096) == on_auto_fs


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(3, 1001, generator=gen),
        "b": torch.randn(7, generator=gen).to(torch.bfloat16),
        "big": torch.randn(5 * CHUNK // 4 + 3, generator=gen),
    }


@pytest.mark.parametrize("mode", ["on", "off"])
def test_sync_save_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("CKPTSVC_DIRECT_IO", mode)
    state = _state()
    path = str(tmp_path / f"ckpt-{mode}")
    save_checkpoint(path, state, safetensors=True, max_shard_size=64 * KiB)
    got = load_checkpoint(path)
    assert got is not None and sorted(got) == sorted(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.multiproc
def test_async_save_round_trip_with_direct_io(
    node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node writer (a fresh one, which inherits CKPTSVC_DIRECT_IO=on) writes the shards."""
    from ckptsvc.engine.async_checkpointer import AsyncCheckpointer

    monkeypatch.setenv("CKPTSVC_DIRECT_IO", "on")  # before the test's node writer starts
    state = _state()
    with AsyncCheckpointer(str(tmp_path / "run"), max_shard_size=64 * KiB) as ckpt:
        handle = ckpt.save(1, {"model": state})
        handle.wait(120)
    got = load_checkpoint(handle.path)
    assert got is not None and all(torch.equal(got[k], state[k]) for k in state)


def test_page_aligned_chunks_after_a_block_aligned_header_go_straight_to_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zero copy: a shard whose header fills whole blocks, streamed from page-aligned memory
    (the staging arena), is written from that memory; only the header and the tail pass
    through the bounce buffer. The bytes are the same as ever."""
    import mmap

    header = bytes(range(256)) * 16  # 4096 bytes: one block
    arena = mmap.mmap(-1, 3 * MiB)
    arena[:] = os.urandom(3 * MiB)
    source = memoryview(arena)
    data_nbytes = 3 * MiB - 100  # a tail that is not a whole block
    sizes_from_source: list[int] = []
    real_pwrite = os.pwrite

    def recording_pwrite(fd: int, data: Any, offset: int) -> int:
        view = memoryview(data)
        if view.obj is arena:
            sizes_from_source.append(view.nbytes)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    path = tmp_path / "zero-copy.bin"
    f = DirectFile(str(path), chunk_nbytes=MiB, size_hint_bytes=None, fsync=True)
    f.write(header)
    f.write(source[: 2 * MiB])
    f.write(source[2 * MiB : data_nbytes])
    f.close()
    source.release()
    assert path.read_bytes() == header + arena[:data_nbytes]
    assert sum(sizes_from_source) >= 2 * MiB  # the first chunk was not copied
    arena.close()
