"""Loading a shard in one pass (issue 15): ``read/shard_read.py`` and the loaders on it.

Real files written by ``save_checkpoint`` and by ``safetensors.save_file``; the reference
for every value is ``safetensors.torch.load_file``. No timing here: speed is the bench's
(``ckptsvc bench --size 1GiB``, ``ckptsvc bench --many-tensors``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptsvc import load_checkpoint, save_checkpoint
from ckptsvc.errors import CorruptCheckpointError
from ckptsvc.format.checksum import crc32c_combine, crc32c_value
from ckptsvc.format.layout import SAFE_WEIGHTS_NAME
from ckptsvc.read import shard_read
from ckptsvc.read.device_read import read_to_device
from ckptsvc.read.discovery import read_manifest
from ckptsvc.read.loading import read_safetensors, read_safetensors_header
from ckptsvc.read.shard_read import read_shard
from ckptsvc.storage import Location
from ckptsvc.storage.reads import RangeRead, plan_reads, read_ranges

pytestmark = pytest.mark.usefixtures("node")


@pytest.mark.parametrize(
    ("len_a", "len_b"), [(0, 0), (0, 7), (7, 0), (1, 1), (1000, 123457), (9, 3 * 2**20 + 5)]
)
def test_crc32c_combine_is_the_crc_of_the_concatenation(len_a: int, len_b: int) -> None:
    a, b = os.urandom(len_a), os.urandom(len_b)
    assert crc32c_combine(crc32c_value(a), crc32c_value(b), len_b) == crc32c_value(a + b)


def _mixed_state() -> dict[str, torch.Tensor]:
    """Runs of equal small tensors (one unbind each), odd shapes, 0-dim, empty, bool, bf16."""
    gen = torch.Generator().manual_seed(0)
    state = {f"small.{i:03d}": torch.randn(16, generator=gen) for i in range(300)}
    state |= {f"grid.{i}": torch.randn(3, 5, generator=gen) for i in range(7)}
    state |= {
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "mask": torch.rand(33, generator=gen) > 0.5,
        "bf16": torch.randn(11, 13, generator=gen).to(torch.bfloat16),
        "i64": torch.arange(9, dtype=torch.int64),
        "big": torch.randn(200, 1000, generator=gen),  # < 1 MiB: no writer CRC pool
    }
    return state


def _reference_file(tmp_path: Path) -> tuple[Path, Location, Any, int, dict[str, torch.Tensor]]:
    """The mixed state written by safetensors itself, and its parsed header."""
    state = _mixed_state()
    path = tmp_path / "ref.safetensors"
    save_file(state, str(path))
    loc = Location.parse(str(path))
    layout, size = read_safetensors_header(loc)
    return path, loc, layout, size, state


@pytest.mark.parametrize("mapped", ["on", "off"])
def test_full_load_matches_safetensors_and_builds_views_of_one_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: str
) -> None:
    monkeypatch.setenv("CKPTSVC_MAPPED_READS", mapped)
    path, loc, layout, size, _ = _reference_file(tmp_path)
    got = read_shard(loc, layout, file_nbytes=size).tensors
    ref = load_file(str(path))
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k
    for k, t in got.items():  # each its own storage, as safetensors returns them
        assert t.storage_offset() == 0, k
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), k


def test_loaded_tensors_behave_as_their_own(tmp_path: Path) -> None:
    """No loaded tensor drags the shard's buffer along: torch.save of one writes its bytes
    only, and torch.set_rng_state (which ignores storage offsets) takes a loaded state."""
    rng = torch.get_rng_state()
    state = {"rng": rng, "big": torch.randn(300_000), "small": torch.randn(7)}
    path = tmp_path / "s.safetensors"
    save_file(state, str(path))
    got = read_safetensors(Location.parse(str(path)))
    torch.set_rng_state(got["rng"])
    assert torch.equal(torch.get_rng_state(), rng)
    out = tmp_path / "one.pt"
    torch.save(got["small"], out)
    assert out.stat().st_size < 4096
    assert torch.equal(got["big"], state["big"])


def test_partial_load_reads_only_the_names_asked_for(tmp_path: Path) -> None:
    _, loc, layout, size, state = _reference_file(tmp_path)
    got = read_shard(loc, layout, file_nbytes=size, names=["small.007", "bf16"]).tensors
    assert set(got) == {"small.007", "bf16"}
    assert torch.equal(got["bf16"], state["bf16"]) and torch.equal(
        got["small.007"], state["small.007"]
    )
    with pytest.raises(CorruptCheckpointError, match="does not hold them"):
        read_shard(loc, layout, file_nbytes=size, names=["nope"])


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(64, 32)
        self.b = torch.nn.Linear(32, 8)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))


def test_load_into_a_module_writes_its_own_parameters_in_place(tmp_path: Path) -> None:
    src = _Net()
    src.steps += 7
    save_checkpoint(str(tmp_path / "ck"), src, safetensors=True)
    dst = _Net()
    before = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    load_checkpoint(str(tmp_path / "ck"), dst)
    after = dst.state_dict()
    assert {k: v.data_ptr() for k, v in after.items()} == before  # the same memory, filled
    for k, v in src.state_dict().items():
        assert torch.equal(after[k], v), k


def test_module_with_a_load_hook_still_goes_through_load_state_dict(tmp_path: Path) -> None:
    src = _Net()
    save_checkpoint(str(tmp_path / "ck"), src, safetensors=True)
    dst = _Net()
    seen: list[str] = []
    dst.a.register_load_state_dict_post_hook(lambda *_: seen.append("post"))
    load_checkpoint(str(tmp_path / "ck"), dst)
    assert seen  # the hook ran: no in-place shortcut around it
    assert torch.equal(dst.a.weight, src.a.weight)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("mapped", ["on", "off"])
@pytest.mark.parametrize("chunk", [None, "4096"])
def test_partial_load_checks_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: str | None, mapped: str
) -> None:
    """Damage in a tensor nobody asked for is still found: read into scratch beside the
    wanted ones, or (many unwanted bytes: a tiny read chunk) in a second streaming pass;
    mapped, the whole mapping is checksummed."""
    monkeypatch.setenv("CKPTSVC_MAPPED_READS", mapped)
    if chunk:
        monkeypatch.setenv("CKPTSVC_READ_CHUNK_BYTES", chunk)
    state = {"keep": torch.randn(64), "skip": torch.randn(256, 256)}
    ck = tmp_path / "ck"
    save_checkpoint(str(ck), state, safetensors=True, max_shard_size=10**9)
    shard = next(p for p in ck.iterdir() if p.suffix == ".safetensors")
    layout, _ = read_safetensors_header(Location.parse(str(shard)))
    skip = layout.entry("skip")
    assert torch.equal(load_checkpoint(str(ck), keys={"keep"})["keep"], state["keep"])  # type: ignore[index]
    _flip_byte(shard, layout.data_offset + skip.begin + 1000)
    with pytest.raises(CorruptCheckpointError, match="CRC-32C"):
        load_checkpoint(str(ck), keys={"keep"})


@pytest.mark.parametrize("mode", ["on", "off"])
def test_direct_and_buffered_reads_give_the_same_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Both read modes (and the fallback where the filesystem refuses O_DIRECT: /dev/shm
    is tmpfs) load the same values, and the checksum still matches."""
    monkeypatch.setenv("CKPTSVC_MAPPED_READS", "off")
    monkeypatch.setenv("CKPTSVC_DIRECT_IO_READS", mode)
    gen = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(3 * 2**20 + 17, generator=gen), "b": torch.randn(5, generator=gen)}
    for root in (tmp_path, Path("/dev/shm")):
        ck = root / f"ckptsvc-test-direct-{os.getpid()}-{mode}"
        ck.mkdir()
        try:  # save_file: an unaligned header, so the direct reads start past a head
            save_file(state, str(ck / SAFE_WEIGHTS_NAME))
            got = load_checkpoint(str(ck))
            assert got is not None
            assert all(torch.equal(got[k], v) for k, v in state.items())
        finally:
            shutil.rmtree(ck, ignore_errors=True)


def test_on_range_sees_every_range_once_with_its_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * 2**20 + 123)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    dest = bytearray(len(data) - 100)
    reads = plan_reads(
        [(100, memoryview(dest))], max_range_bytes=2**20, max_gap_bytes=0, min_ranges=4
    )
    assert len(reads) > 1
    seen: list[RangeRead] = []
    read_ranges(Location.parse(str(path)), reads, in_flight=3, on_range=seen.append)
    assert sorted(r.offset for r in seen) == sorted(r.offset for r in reads)
    assert bytes(dest) == data[100:]
    for rr in seen:
        assert b"".join(bytes(v) for v in rr.views) == data[rr.offset : rr.offset + rr.nbytes]


@pytest.mark.parametrize("mapped", ["on", "off"])
def test_single_file_load_reads_the_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: str
) -> None:
    """``model.safetensors`` without an index: the header names the tensors; the data
    is read (or mapped) once (before, the whole file was read twice)."""
    monkeypatch.setenv("CKPTSVC_MAPPED_READS", mapped)
    state = {"x": torch.randn(10), "y": torch.randn(3, 3)}
    ck = tmp_path / "single"
    ck.mkdir()
    save_file(state, str(ck / SAFE_WEIGHTS_NAME))
    calls: list[str] = []
    real_read, real_map = Location.read_scattered, shard_read.map_private

    def counting_read(self: Location, extents, **kw):  # type: ignore[no-untyped-def]
        calls.append("read")
        return real_read(self, extents, **kw)

    def counting_map(path: str, **kw):  # type: ignore[no-untyped-def]
        calls.append("map")
        return real_map(path, **kw)

    monkeypatch.setattr(Location, "read_scattered", counting_read)
    monkeypatch.setattr(shard_read, "map_private", counting_map)
    got = load_checkpoint(str(ck))
    assert got is not None and all(torch.equal(got[k], v) for k, v in state.items())
    assert calls == (["map"] if mapped == "on" else ["read"])


def _saved_shard(tmp_path: Path, state: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    ck = tmp_path / "ck"
    save_checkpoint(str(ck), state, safetensors=True)
    return ck, next(p for p in ck.iterdir() if p.suffix == ".safetensors")


def test_mapped_tensors_are_private_copies_on_write(tmp_path: Path) -> None:
    """A loaded tensor is the file's mapping, copy-on-write: writing to it changes neither
    the file nor a second load; a later save into the same directory (a new inode) leaves
    the loaded values as they were."""
    gen = torch.Generator().manual_seed(3)
    # < 1 MiB: no writer CRC pool (a process-wide pool the leak check would see)
    state = {"w": torch.randn(200, 1000, generator=gen), "b": torch.randn(7, generator=gen)}
    ck, shard = _saved_shard(tmp_path, state)
    before = shard.read_bytes()
    got = load_checkpoint(str(ck))
    assert got is not None and torch.equal(got["w"], state["w"])
    got["w"].add_(1.0)
    assert shard.read_bytes() == before
    again = load_checkpoint(str(ck))
    assert again is not None and torch.equal(again["w"], state["w"])
    save_checkpoint(str(ck), {"w": torch.zeros(200, 1000), "b": torch.zeros(7)}, safetensors=True)
    assert torch.equal(again["w"], state["w"]) and torch.equal(got["w"], state["w"] + 1.0)


def test_mapped_load_fills_in_place_destinations_and_fresh_tensors(tmp_path: Path) -> None:
    """Mixed: destinations that fit are filled from the mapping, the others are fresh."""
    _, loc, layout, size, state = _reference_file(tmp_path)
    dest = torch.empty_like(state["big"])
    wrong = torch.empty(3)  # does not fit "i64": a fresh tensor instead
    got = read_shard(loc, layout, file_nbytes=size, destinations={"big": dest, "i64": wrong})
    assert got.in_place == frozenset({"big"}) and got.tensors["big"] is dest
    assert torch.equal(dest, state["big"]) and torch.equal(got.tensors["i64"], state["i64"])
    assert set(got.tensors) == set(state)


def test_mapped_load_without_a_checksum_and_of_a_truncated_file(tmp_path: Path) -> None:
    """No expected CRC: the wanted bytes are populated, values right; a file shorter than
    the checkpoint says is CorruptCheckpointError, not a crash on a page past its end."""
    path, loc, layout, size, state = _reference_file(tmp_path)
    got = read_shard(loc, layout, file_nbytes=size, names=["big", "bf16"]).tensors
    assert torch.equal(got["big"], state["big"]) and torch.equal(got["bf16"], state["bf16"])
    with open(path, "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        read_shard(loc, layout, file_nbytes=size)


def _staged_case(tmp_path: Path) -> tuple[Location, Any, int, dict[str, torch.Tensor], str]:
    state = _mixed_state()
    ck = tmp_path / "ck"
    save_checkpoint(str(ck), state, safetensors=True)
    shard = next(p for p in ck.iterdir() if p.suffix == ".safetensors")
    loc = Location.parse(str(shard))
    layout, size = read_safetensors_header(loc)
    manifest = read_manifest(Location.parse(str(ck)))
    record = manifest.file(shard.name)
    assert record is not None
    return loc, layout, size, state, record.crc32c


@pytest.mark.parametrize("staging", [4096, 3 * 4096 + 0, 2**20])
def test_staged_device_pipeline_on_cpu(tmp_path: Path, staging: int) -> None:
    """The pinned-staging pipeline of CUDA loads, run on the CPU: chunk boundaries cut
    tensors anywhere, destinations that fit are filled in place, the CRC is checked."""
    loc, layout, size, state, crc = _staged_case(tmp_path)
    dest = torch.empty_like(state["big"])
    got = read_to_device(
        loc, layout, device=torch.device("cpu"), file_nbytes=size, entries=layout.entries,
        destinations={"big": dest}, expected_crc32c=crc, staging_nbytes=staging,
    )  # fmt: skip
    assert got["big"] is dest
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    with pytest.raises(CorruptCheckpointError, match="CRC-32C"):
        read_to_device(
            loc, layout, device=torch.device("cpu"), file_nbytes=size, entries=layout.entries,
            expected_crc32c="00000000", staging_nbytes=staging,
        )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_onto_cuda_through_pinned_staging(tmp_path: Path) -> None:
    """On CUDA: ``load_checkpoint(device="cuda")`` and a module on the GPU (filled in
    place) read through pinned staging and a side stream; the values are exact."""
    src = _Net()
    save_checkpoint(str(tmp_path / "ck"), src, safetensors=True)
    got = load_checkpoint(str(tmp_path / "ck"), device="cuda")
    assert got is not None and all(t.device.type == "cuda" for t in got.values())
    for k, v in src.state_dict().items():
        assert torch.equal(got[k].cpu(), v), k
    dst = _Net().cuda()
    before = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    load_checkpoint(str(tmp_path / "ck"), dst)
    after = dst.state_dict()
    assert {k: v.data_ptr() for k, v in after.items()} == before
    for k, v in src.state_dict().items():
        assert torch.equal(after[k].cpu(), v), k
