"""Manifest format 3 (``format/manifest_v3.py``) and one rank's view of it
(``read/manifest_view.py``): golden bytes, round trip, hostile files, and real multi-rank
saves whose ranks each read a constant number of manifest bytes.

Regenerate the golden file (only with a format change) with
``CKPTSVC_REGENERATE_GOLDEN=1 pytest tests/test_manifest_v3.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StorageRoot
from servers import Server

from ckptsvc.errors import CorruptCheckpointError, LifecycleError
from ckptsvc.format import manifest_v3
from ckptsvc.format.manifest import (
    FOLDED_FORMAT_VERSION,
    FORMAT_VERSION,
    MANIFEST_NAME,
    ComponentRecord,
    FileRecord,
    Manifest,
)
from ckptsvc.ops.transfer import copy_checkpoint
from ckptsvc.read import manifest_view
from ckptsvc.read.component_load import load_state
from ckptsvc.read.discovery import CheckpointStatus, checkpoint_info, read_manifest
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.manifest_view import read_manifest_view
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.storage import Location
from ckptsvc.tools.simulate import SimulatedJob, _environment, _state, simulate
from ckptsvc.tools.simulate_probes import RequestLog

GOLDEN = Path(__file__).parent / "golden" / "manifest_v3.json"
REGENERATE = os.environ.get("CKPTSVC_REGENERATE_GOLDEN") == "1"
RANKS = 4


def _instance(rank: int) -> dict[str, Any]:
    name = f"optimizer_state_rank_{rank}.safetensors"
    return {"doc": name, "ranks": [rank], "files": [name]}


def sample_v3(ranks: int = RANKS) -> Manifest:
    """A deterministic manifest of ``ranks`` ranks: a replicated model, a per-rank optimizer."""
    files = [
        FileRecord("model-00001-of-00001.safetensors", 576, "265a70fb"),
        FileRecord("model_state.json", 715, "28ff8668"),
    ] + [FileRecord(f"optimizer_state_rank_{r}.safetensors", 496, f"{r:08x}") for r in range(ranks)]
    model_inst = {
        "doc": "model_state.json",
        "ranks": [0],
        "files": ["model-00001-of-00001.safetensors", "model_state.json"],
    }
    comps = (
        ComponentRecord(
            "model", "replicated", (0,), tuple(range(ranks)), size_bytes=1291,
            metadata={"ckptsvc": {"world_size": ranks, "sharded": False, "instances": {"": model_inst}}},
        ),
        ComponentRecord(
            "optimizer", "per_rank", tuple(range(ranks)), size_bytes=496 * ranks,
            metadata={
                "user": "kept",
                "ckptsvc": {
                    "world_size": ranks,
                    "sharded": False,
                    "instances": {f"_rank_{r}": _instance(r) for r in range(ranks)},
                },
            },
        ),
    )  # fmt: skip
    return Manifest(
        checkpoint_path="/run/checkpoints/checkpoint-7",
        world_size=ranks,
        timestamp="2026-01-02T03:04:05.000006+00:00",
        step=7,
        files=tuple(sorted(files, key=lambda f: f.path)),
        components=comps,
        pytorch_version="2.13.0",
        library_version="0.0.0",
        format_version=FORMAT_VERSION,
        user_metadata={"note": "golden"},
    )


def test_v3_bytes_match_the_golden_file() -> None:
    data = sample_v3().to_json()
    if REGENERATE:
        GOLDEN.write_bytes(data)
    assert data == GOLDEN.read_bytes(), "v3 manifest bytes changed: a format change"


def test_v3_is_one_json_document_with_forgathers_fields_last() -> None:
    m = sample_v3()
    raw = m.to_json()
    first = raw[: manifest_v3.LINE_NBYTES]
    assert first.endswith(b",\n") or first.endswith(b" \n")
    assert first.index(b"\n") == manifest_v3.LINE_NBYTES - 1
    doc = json.loads(raw)  # any JSON reader parses it whole
    assert list(doc)[-1] == "components"
    for key in ("checkpoint_path", "world_size", "timestamp", "pytorch_version", "metadata"):
        assert key in doc
    opt = doc["components"]["optimizer"]
    assert opt["ranks"] == list(range(RANKS))  # Forgather sees the full rank list
    assert opt["metadata"] == {"user": "kept"}
    assert len(doc["ckptsvc_regions"]) == RANKS
    table = doc["ckptsvc_table"]
    assert len(table) == manifest_v3.ENTRY_DIGITS * RANKS
    layout = manifest_v3.parse_layout_line(raw, where="x")
    assert layout is not None and layout.ranks == RANKS
    assert raw[layout.table_offset : layout.table_offset + len(table)].decode() == table
    for r in range(RANKS):
        entry = table[24 * r : 24 * r + 24]
        off, n = int(entry[:12]), int(entry[12:])
        assert json.loads(raw[off : off + n]) == doc["ckptsvc_regions"][r]


def test_v3_reads_back_whole_as_the_same_manifest_as_v2() -> None:
    m = sample_v3()
    back = Manifest.from_json(m.to_json(), where="x")
    assert back == m
    as_v2 = dataclasses.replace(m, format_version=FOLDED_FORMAT_VERSION).to_json()
    assert not as_v2.startswith(b'{"ckptsvc_layout"')
    v2_back = Manifest.from_json(as_v2, where="y")
    assert dataclasses.replace(v2_back, format_version=FORMAT_VERSION) == back


def test_new_writes_v3_only_when_several_ranks_wrote_per_rank_instances() -> None:
    def new(ranks: int) -> Manifest:
        m = sample_v3(ranks)
        return Manifest.new(
            checkpoint_path=m.checkpoint_path, world_size=ranks, step=1, files=m.files,
            components=m.components, pytorch_version=None,
        )  # fmt: skip

    assert new(2).format_version == FORMAT_VERSION == 3
    assert new(1).format_version == FOLDED_FORMAT_VERSION  # one rank: v2, byte-for-byte as before
    replicated_only = sample_v3(4).components[:1]
    m = Manifest.new(
        checkpoint_path="p", world_size=4, step=1, files=(), components=replicated_only,
        pytorch_version=None,
    )  # fmt: skip
    assert m.format_version < FORMAT_VERSION
    assert not m.to_json().startswith(b'{"ckptsvc_layout"')


@pytest.fixture
def v3_ckpt(tmp_path: Path) -> Location:
    ckpt = tmp_path / "checkpoint-7"
    ckpt.mkdir()
    (ckpt / MANIFEST_NAME).write_bytes(sample_v3(64).to_json())
    return Location.parse(str(ckpt))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Every ranged read the view reader makes: (start, bytes returned)."""
    seen: list[tuple[int, int]] = []
    inner = manifest_view._Source.read

    def counted(self: Any, start: int, end: int) -> bytes:
        raw = inner(self, start, end)
        seen.append((start, len(raw)))
        return raw

    monkeypatch.setattr(manifest_view._Source, "read", counted)
    yield seen


def test_a_view_holds_the_head_and_one_ranks_region(
    v3_ckpt: Location, reads: list[tuple[int, int]]
) -> None:
    whole = read_manifest(v3_ckpt)
    assert whole is not None and whole.view_rank is None
    size = os.path.getsize(Path(v3_ckpt.path, MANIFEST_NAME))
    for rank in (0, 37, 63):
        reads.clear()
        view = read_manifest_view(v3_ckpt, rank=rank)
        assert view is not None and view.view_rank == rank
        assert 2 <= len(reads) <= 4
        assert sum(n for _, n in reads) < 4096 + 1024 < size
        mine = f"optimizer_state_rank_{rank}.safetensors"
        assert {f.path for f in view.files} == {
            "model-00001-of-00001.safetensors", "model_state.json", mine,
        }  # fmt: skip
        assert view.file(mine) == whole.file(mine)
        opt = next(c for c in view.components if c.key == "optimizer")
        assert opt.ranks == tuple(range(64))  # ranges decoded back
        assert set(opt.metadata["ckptsvc"]["instances"]) == {f"_rank_{rank}"}
        assert view.step == whole.step and view.timestamp == whole.timestamp
        with pytest.raises(LifecycleError, match="view"):
            view.to_json()
        with pytest.raises(LifecycleError, match="view"):
            _ = view.total_nbytes
    outside = read_manifest_view(v3_ckpt, rank=64)  # a rank the saved job did not have
    assert outside is not None and outside.world_size == 64
    assert all(not f.path.startswith("optimizer") for f in outside.files)


def test_a_small_manifest_is_one_read(tmp_path: Path, reads: list[tuple[int, int]]) -> None:
    (tmp_path / MANIFEST_NAME).write_bytes(sample_v3(2).to_json())
    view = read_manifest_view(Location.parse(str(tmp_path)), rank=1)
    assert view is not None and view.view_rank == 1 and len(reads) == 1


def test_a_v2_manifest_is_read_whole_by_the_view_reader(tmp_path: Path) -> None:
    m = dataclasses.replace(sample_v3(64), format_version=FOLDED_FORMAT_VERSION)
    (tmp_path / MANIFEST_NAME).write_bytes(m.to_json())
    view = read_manifest_view(Location.parse(str(tmp_path)), rank=3)
    assert view == m and view is not None and view.view_rank is None


def _corrupt(raw: bytes, case: str) -> bytes:
    layout = manifest_v3.parse_layout_line(raw, where="x")
    assert layout is not None
    t = layout.table_offset
    if case == "truncated":
        return raw[: t + 10]
    if case == "bad_table":
        return raw[:t] + b"x" * 24 + raw[t + 24 :]
    if case == "offset_past_eof":
        return raw[:t] + b"%012d%012d" % (len(raw) * 4, 100) + raw[t + 24 :]
    if case == "region_in_head":
        return raw[:t] + b"%012d%012d" % (manifest_v3.LINE_NBYTES, 100) + raw[t + 24 :]
    if case == "head_not_json":
        s = manifest_v3.LINE_NBYTES
        return raw[:s] + b"#" * 10 + raw[s + 10 :]
    if case == "huge_n":
        return raw.replace(b"N=00000064", b"N=99999999", 1)
    if case == "head_past_eof":
        return raw.replace(b"H=%012d" % layout.head_nbytes, b"H=%012d" % (10**11), 1)
    if case == "bad_line":
        return raw.replace(b"H=0", b"H=x", 1)
    if case == "range_outside":
        return raw.replace(b'"ranks":["0..63"]', b'"ranks":["0..64"]', 1)
    raise AssertionError(case)


HOSTILE = [
    "truncated", "bad_table", "offset_past_eof", "region_in_head", "head_not_json", "huge_n",
    "head_past_eof", "bad_line", "range_outside",
]  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_v3_manifests_are_corrupt_checkpoints(tmp_path: Path, case: str) -> None:
    raw = _corrupt(sample_v3(64).to_json(), case)
    (tmp_path / MANIFEST_NAME).write_bytes(raw)
    loc = Location.parse(str(tmp_path))
    with pytest.raises(CorruptCheckpointError, match=str(tmp_path)):
        read_manifest_view(loc, rank=0)
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_json(raw, where=str(tmp_path))


def test_a_region_of_another_rank_is_refused(tmp_path: Path) -> None:
    raw = sample_v3(64).to_json()
    layout = manifest_v3.parse_layout_line(raw, where="x")
    assert layout is not None
    t = layout.table_offset
    raw = raw[:t] + raw[t + 24 : t + 48] + raw[t + 24 :]  # rank 0's entry points at rank 1's
    (tmp_path / MANIFEST_NAME).write_bytes(raw)
    with pytest.raises(CorruptCheckpointError, match="region of rank 0"):
        read_manifest_view(Location.parse(str(tmp_path)), rank=0)


def test_a_manifest_that_is_a_fifo_is_refused_by_the_view_reader(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / MANIFEST_NAME)
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        read_manifest_view(Location.parse(str(tmp_path)), rank=0)


def _save(root: str, ranks: int) -> str:
    with ThreadPoolExecutor(16) as pool:
        job = SimulatedJob(ranks=ranks, ranks_per_node=8, root=root, opts={})
        assert all(e is None for e in job.save(1, pool).values())
        job.close()
    return f"{root}/checkpoint-1"


def _expected(rank: int) -> dict[str, Any]:
    return {c.key: c.stateful.state_dict() for c in _state(rank)}


def _bitwise(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_bitwise(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.mark.parametrize("ranks", [8, 64])
def test_every_rank_loads_bitwise_reading_a_constant_part_of_the_manifest(
    tmp_path: Path, ranks: int, reads: list[tuple[int, int]]
) -> None:
    path = _save(str(tmp_path), ranks)
    raw = Path(path, MANIFEST_NAME).read_bytes()
    assert raw.startswith(b'{"ckptsvc_layout"')
    assert verify_checkpoint(path).ok  # the whole-manifest tools read v3 as before
    per_rank = []
    with _environment(ranks, 8):
        for rank in range(ranks):
            reads.clear()
            state = load_state(path, rank=rank)
            assert _bitwise(state, _expected(rank)), rank
            assert len(reads) <= 4
            per_rank.append(sum(n for _, n in reads))
    # independent of the job's size: the first guess, a table entry and a region
    assert max(per_rank) <= 4096 + 24 + 512, (max(per_rank), len(raw))
    if ranks == 64:
        assert len(raw) > 4 * max(per_rank)


def test_a_v2_multi_rank_checkpoint_still_loads(tmp_path: Path) -> None:
    path = _save(str(tmp_path), 8)
    file = Path(path, MANIFEST_NAME)
    m = Manifest.from_json(file.read_bytes(), where=str(file))
    file.write_bytes(dataclasses.replace(m, format_version=FOLDED_FORMAT_VERSION).to_json())
    assert not file.read_bytes().startswith(b'{"ckptsvc_layout"')
    with _environment(8, 8):
        for rank in (0, 5):
            assert _bitwise(load_state(path, rank=rank), _expected(rank))


@pytest.mark.cloud
def test_metadata_bytes_per_rank_do_not_grow_with_the_job_on_s3(moto_server: Server) -> None:
    """``ckptsvc simulate``'s own counter (ranged GETs counted by their bytes) on moto."""
    small = simulate(ranks=16, saves=1, endpoint=moto_server.endpoint_url)
    large = simulate(ranks=64, saves=1, endpoint=moto_server.endpoint_url)
    # per rank: the first 4096 bytes of the manifest, a table entry, its region (~250 B),
    # the model's document and HF index (~1 KB), whatever the job's size (the mean is a
    # little lower where some ranks' entries and regions lie in the first 4096 bytes);
    # the whole 64-rank manifest is ~20 KB
    bound = 4096 + 24 + 512 + 2048
    assert small.json_bytes_per_rank <= bound and large.json_bytes_per_rank <= bound, (
        small.json_bytes_per_rank,
        large.json_bytes_per_rank,
    )
    assert large.load_requests / 64 <= small.load_requests / 16 + 2


def test_a_views_file_check_covers_the_head_and_its_own_files_only(tmp_path: Path) -> None:
    path = _save(str(tmp_path), 8)
    Path(path, "optimizer_state_rank_5.safetensors").unlink()
    other = checkpoint_info(path, view_rank=2)  # rank 2's files and the model's are intact
    assert other.status is CheckpointStatus.COMPLETE and other.manifest is not None
    assert other.manifest.view_rank == 2
    own = checkpoint_info(path, view_rank=5)
    assert own.mismatch and "optimizer_state_rank_5.safetensors" in own.reason
    assert checkpoint_info(path).mismatch  # the whole manifest: every file


def test_whole_manifest_tools_read_v3_as_before(tmp_path: Path) -> None:
    path = _save(str(tmp_path / "run"), 8)
    assert find_latest_checkpoint(str(tmp_path / "run")) == path
    copied = str(tmp_path / "copy" / "checkpoint-1")
    copy_checkpoint(path, copied)
    assert Path(copied, MANIFEST_NAME).read_bytes().startswith(b'{"ckptsvc_layout"')
    assert verify_checkpoint(copied).ok
    whole, original = read_manifest(Location.parse(copied)), read_manifest(Location.parse(path))
    assert whole is not None and original is not None and whole.format_version == FORMAT_VERSION
    assert dataclasses.replace(whole, checkpoint_path=path) == original  # cp rewrites the path
    assert len(whole.files) == 8 + 1  # 8 per-rank shards, model.safetensors (its document inside)
    with _environment(8, 8):
        assert _bitwise(load_state(copied, rank=6), _expected(6))


@pytest.mark.cloud
@pytest.mark.parametrize("case", ["truncated", "offset_past_eof", "huge_n"])
def test_hostile_v3_manifests_on_s3(s3_root: StorageRoot, case: str) -> None:
    """On an object store the file's size is unknown until a read comes back short."""
    ckpt = Location.parse(f"{s3_root.url}/checkpoint-7", s3_root.storage_options)
    ckpt.join(MANIFEST_NAME).publish(_corrupt(sample_v3(64).to_json(), case))
    with pytest.raises(CorruptCheckpointError, match="checkpoint-7"):
        read_manifest_view(ckpt, rank=0)


@pytest.mark.cloud
def test_a_view_on_s3_is_three_ranged_reads(s3_root: StorageRoot) -> None:
    ckpt = Location.parse(f"{s3_root.url}/checkpoint-7", s3_root.storage_options)
    ckpt.join(MANIFEST_NAME).publish(sample_v3(64).to_json())
    log = RequestLog(s3_root.url, s3_root.storage_options)
    view = read_manifest_view(ckpt, rank=63)
    assert view is not None and view.file("optimizer_state_rank_63.safetensors") is not None
    gets = [r for r in log.records() if r.method == "GET"]
    assert len(gets) == len(log.records()) == 3 and all(r.range for r in gets), gets
