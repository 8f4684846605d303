"""Object stores end to end: streaming uploads, ranged parallel reads, request-bounded
discovery and batched retention, against the real emulators (moto, SeaweedFS, GCS).

Request counts come from ``FaultProxy`` in pass-through mode: every HTTP request the
client sends is recorded on its way to the server.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from conftest import StorageRoot, unfinished_save

import ckptsvc.storage.multipart as multipart
from ckptsvc.errors import CorruptCheckpointError, StoragePermissionError
from ckptsvc.format.manifest import MARKER_NAME
from ckptsvc.ops.gc import collect_garbage
from ckptsvc.ops.retention import delete_checkpoint, delete_oldest_checkpoints_in_background
from ckptsvc.read.discovery import CheckpointStatus, list_checkpoints
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.sharded_checkpoint import load_checkpoint, save_checkpoint
from ckptsvc.storage import Location, plan_reads
from ckptsvc.testing.fault_proxy import FaultProxy, RequestRecord
from ckptsvc.workers.latest_pointer import POINTER_NAME
from ckptsvc.workers.shard_writer import write_stream

MiB = 2**20
PART = 5 * MiB  # the smallest S3 part


def _payload(nbytes: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def _chunks(data: bytes, step: int) -> Iterator[memoryview]:
    view = memoryview(data)
    for i in range(0, len(data), step):
        yield view[i : i + step]


def _uploads(root: StorageRoot) -> list[dict[str, Any]]:
    assert root.server is not None
    return list(
        root.server.boto3_client().list_multipart_uploads(Bucket=root.bucket).get("Uploads", [])
    )


@pytest.fixture
def counted(storage_root: StorageRoot) -> Iterator[tuple[FaultProxy, dict[str, Any]]]:
    """A pass-through proxy in front of the root's server, and storage options using it."""
    if storage_root.server is None:
        pytest.skip("needs a server")
    with FaultProxy(storage_root.server.endpoint_url) as proxy:
        opts = dict(storage_root.storage_options)
        if storage_root.server.kind == "gcs":
            opts["endpoint_url"] = proxy.endpoint_url
        else:
            opts["client_kwargs"] = {**opts["client_kwargs"], "endpoint_url": proxy.endpoint_url}
        yield proxy, opts


class _S3Spy:
    """Wraps every S3 request of the multipart sink: methods seen, parts in flight."""

    def __init__(
        self, delay_s: float = 0.0, fail_part: int | None = None, flaky_part: int | None = None
    ) -> None:
        self.calls: list[str] = []
        self._flaky_part = flaky_part  # its first attempt reads 1 MiB of its body, then fails
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._delay_s = delay_s
        self._fail_part = fail_part
        self._real = multipart._s3_request

    async def __call__(self, fs: Any, method: str, **kwargs: Any) -> Any:
        import asyncio

        with self._lock:
            self.calls.append(method)
        if method != "upload_part":
            return await self._real(fs, method, **kwargs)
        if kwargs["PartNumber"] == self._fail_part:
            raise PermissionError(f"AccessDenied: part {self._fail_part}")
        if kwargs["PartNumber"] == self._flaky_part:
            self._flaky_part = None
            kwargs["Body"].read(MiB)
            raise ConnectionResetError("connection reset mid-body")
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self._delay_s)
            return await self._real(fs, method, **kwargs)
        finally:
            with self._lock:
                self.in_flight -= 1


# ---- writes: S3 multipart -------------------------------------------------------------------
def _peak_upload_nbytes(loc: Location, data: bytes) -> int:
    """Peak Python heap growth while streaming ``data`` through a sink (5 MiB parts, 2 in
    flight); ``data`` itself is allocated before tracing starts."""
    tracemalloc.start()
    try:
        sink = loc.open_sink(part_size_bytes=PART, parts_in_flight=2)
        tracemalloc.reset_peak()
        for piece in _chunks(data, 3 * MiB + 7):
            sink.write(piece)
        sink.close()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_s3_multipart_parts_in_flight_and_bounded_memory(
    s3_root: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _S3Spy(delay_s=0.2)
    monkeypatch.setattr(multipart, "_s3_request", spy)
    small = _payload(4 * PART - 99, seed=1)
    big = _payload(12 * PART - 1234, seed=2)
    loc = s3_root.location("ckpt", "model.safetensors")
    peak_small = _peak_upload_nbytes(s3_root.location("small.bin"), small)
    spy.calls.clear()
    peak_big = _peak_upload_nbytes(loc, big)
    assert spy.max_in_flight == 2  # parts really go in parallel, and never more than asked
    # memory is a few part buffers, whatever the file size (not a copy of the file)
    assert peak_big < peak_small + MiB
    assert peak_big < 4 * PART + 2 * MiB
    assert Counter(spy.calls) == {
        "create_multipart_upload": 1,
        "upload_part": 12,
        "complete_multipart_upload": 1,
    }
    assert s3_root.server is not None
    key = loc.path.split("/", 1)[1]
    head = s3_root.server.boto3_client().head_object(Bucket=s3_root.bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-12")  # one object of twelve parts
    assert loc.read_bytes() == big
    assert _uploads(s3_root) == []


def test_s3_stable_source_parts_are_views_of_the_callers_memory(
    s3_root: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stable_source``: no part buffer is allocated (the heap stays far below one part),
    parts are cut across the caller's chunks, and a part that failed mid-body is sent again
    from the same memory, whole."""
    spy = _S3Spy(delay_s=0.05, flaky_part=3)
    monkeypatch.setattr(multipart, "_s3_request", spy)
    data = _payload(6 * PART + 4321, seed=3)
    loc = s3_root.location("ckpt", "views.bin")
    warm = s3_root.location("ckpt", "warm.bin").open_sink(stable_source=True)
    warm.write(b"botocore loads its service models once, before the measurement")
    warm.close()
    spy.calls.clear()
    tracemalloc.start()
    try:
        sink = loc.open_sink(part_size_bytes=PART, parts_in_flight=2, stable_source=True)
        tracemalloc.reset_peak()
        for piece in _chunks(data, 3 * MiB + 7):
            sink.write(piece)
        sink.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PART, peak  # the copy path allocates (parts in flight + 1) buffers of PART
    assert Counter(spy.calls) == {
        "create_multipart_upload": 1,
        "upload_part": 8,  # 7 parts, part 3 twice
        "complete_multipart_upload": 1,
    }
    assert spy.max_in_flight == 2
    assert loc.read_bytes() == data
    small = s3_root.location("ckpt", "one-part.bin")
    sink = small.open_sink(part_size_bytes=PART, stable_source=True)
    for piece in _chunks(data[:PART], MiB + 1):  # exactly one part, in six views
        sink.write(piece)
    sink.close()
    assert spy.calls[-1] == "put_object" and small.read_bytes() == data[:PART]


def test_s3_small_file_is_one_put(s3_root: StorageRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _S3Spy()
    monkeypatch.setattr(multipart, "_s3_request", spy)
    loc = s3_root.location("small.bin")
    sink = loc.open_sink(part_size_bytes=PART)
    sink.write(b"x" * 1000)
    sink.write(memoryview(b"y" * (PART - 1000)))  # exactly one part: still one request
    sink.close()
    assert spy.calls == ["put_object"]
    assert loc.read_bytes() == b"x" * 1000 + b"y" * (PART - 1000)


@pytest.mark.parametrize("storage_root", ["s3", "seaweedfs"], indirect=True)
def test_s3_failed_part_aborts_the_upload(
    storage_root: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multipart, "_s3_request", _S3Spy(fail_part=3))
    monkeypatch.setenv("CKPTSVC_PART_SIZE_BYTES", str(PART))
    loc = storage_root.location("ckpt", "model-00001-of-00001.safetensors")
    with pytest.raises(StoragePermissionError) as info:
        write_stream(
            loc, _chunks(_payload(5 * PART), MiB), rel_path="model-00001-of-00001.safetensors"
        )
    assert loc.url in str(info.value)
    assert _uploads(storage_root) == []
    assert not loc.exists()


# ---- writes: GCS resumable ------------------------------------------------------------------
@pytest.mark.parametrize("storage_root", ["gcs"], indirect=True)
def test_gcs_resumable_upload_is_chunked_and_pipelined(
    storage_root: StorageRoot, counted: tuple[FaultProxy, dict[str, Any]]
) -> None:
    proxy, opts = counted
    chunk = MiB
    data = _payload(3 * chunk + 4321, seed=2)
    loc = Location.parse(storage_root.join("big.bin"), opts)
    sink = loc.open_sink(part_size_bytes=chunk)
    for piece in _chunks(data, 300_000):
        sink.write(piece)
    sink.close()
    uploads = [r for r in proxy.records() if "/upload/" in r.path]
    started = [r for r in uploads if "upload_id" not in r.query]
    chunks = [r for r in uploads if "upload_id" in r.query]
    assert len(started) == 1
    assert [r.nbytes for r in chunks] == [chunk, chunk, chunk, 4321]
    proxy.reset_records()
    small = Location.parse(storage_root.join("small.bin"), opts)
    sink = small.open_sink(part_size_bytes=chunk)
    sink.write(b"tiny")
    sink.close()
    assert [r.method for r in proxy.records()] == ["POST"]  # one simple upload
    assert loc.read_bytes() == data and small.read_bytes() == b"tiny"


# ---- reads ----------------------------------------------------------------------------------
def test_plan_reads_coalesces_neighbours_and_splits_big_ones() -> None:
    small = [(i * 100, memoryview(bytearray(100))) for i in range(10)]  # contiguous 0..1000
    big = (5000, memoryview(bytearray(10 * MiB)))
    gap = (1500, memoryview(bytearray(100)))  # 500 bytes after the small ones
    far = (13 * MiB, memoryview(bytearray(10)))  # well past the big one: a range of its own
    reads = plan_reads([*small, big, gap, far], max_range_bytes=4 * MiB, max_gap_bytes=1000)
    assert [(r.offset, r.nbytes) for r in reads][:1] == [(0, 1600)]  # 10 small + gap + 1
    assert len(reads[0].views) == 12  # the 500-byte hole lands in scratch
    big_ranges = [r for r in reads if 5000 <= r.offset < 5000 + 10 * MiB and r.nbytes > 10]
    assert [r.nbytes for r in big_ranges] == [4 * MiB, 4 * MiB, 2 * MiB]
    assert sum(r.nbytes for r in reads) == 1600 + 10 * MiB + 10
    assert len(plan_reads([big], max_range_bytes=64 * MiB, max_gap_bytes=0, min_ranges=4)) == 2


def test_read_scattered_fills_views_on_every_backend(storage_root: StorageRoot) -> None:
    data = _payload(3 * MiB + 17, seed=3)
    loc = storage_root.location("blob.bin")
    loc.publish(data)
    spans = [
        (0, 8),
        (8, 100_000),
        (100_500, 200_000),
        (2 * MiB, 3 * MiB + 17),
        (1_000_000, 1_000_001),
    ]
    outs = [bytearray(end - start) for start, end in spans]
    loc.read_scattered([(s, memoryview(o)) for (s, _), o in zip(spans, outs, strict=True)])
    for (start, end), out in zip(spans, outs, strict=True):
        assert bytes(out) == data[start:end]
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        loc.read_scattered([(3 * MiB, memoryview(bytearray(MiB)))])


@pytest.mark.parametrize("storage_root", ["s3", "gcs"], indirect=True)
def test_remote_load_uses_parallel_ranged_gets(
    storage_root: StorageRoot,
    counted: tuple[FaultProxy, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CKPTSVC_READ_CHUNK_BYTES", str(2 * MiB))
    proxy, opts = counted
    g = torch.Generator().manual_seed(0)
    sd = {
        "big": torch.randn(2 * MiB, generator=g),
        **{f"s{i}": torch.randn(100) for i in range(20)},
    }
    url = storage_root.join("ckpt")
    save_checkpoint(url, sd, safetensors=True, storage_options=opts)
    proxy.reset_records()
    out = load_checkpoint(url, storage_options=opts)
    assert out is not None and all(torch.equal(out[k], v) for k, v in sd.items())
    shard = [r for r in proxy.records() if r.method == "GET" and r.path.endswith(".safetensors")]
    assert shard and all(r.range for r in shard)  # never the whole file in one GET
    spans = [tuple(int(x) for x in r.range.removeprefix("bytes=").split("-")) for r in shard]
    data_ranges = [s for s in spans if s[1] - s[0] + 1 >= MiB]
    assert len(data_ranges) == 4  # 8 MiB of tensor data in 2 MiB ranges
    small = [s for s in spans if s[1] - s[0] + 1 < MiB and s[0] > 0]  # not the header probe
    assert len(small) == 1  # the 20 small tensors coalesced into one range


# ---- discovery ------------------------------------------------------------------------------
@pytest.mark.parametrize("storage_root", ["s3", "gcs"], indirect=True)
def test_find_latest_costs_one_listing_plus_manifests(
    storage_root: StorageRoot, counted: tuple[FaultProxy, dict[str, Any]]
) -> None:
    proxy, opts = counted
    root = storage_root.join("run")
    n = 7
    for i in range(n):
        save_checkpoint(f"{root}/checkpoints/checkpoint-{i}", {"w": torch.full((4,), float(i))},
                        safetensors=True, storage_options=opts, step=i)  # fmt: skip
    unfinished_save(Location.parse(f"{root}/checkpoints/checkpoint-{n}", opts))  # in flight
    listings, reads = _discovery_requests(proxy, root, opts, f"checkpoint-{n - 1}")
    # with the latest pointer (naming checkpoint-6): checkpoints/, the root itself, the
    # manifest-less checkpoint-7 (a higher step: it is read) and checkpoint-6's files;
    # GETs of the pointer, checkpoint-6's manifest and checkpoint-7's (404)
    assert len(listings) == 4
    assert sorted(unquote(r.path).rsplit("/", 2)[-2] for r in reads) == [
        "checkpoint-6",
        "checkpoint-7",
        "checkpoints",
    ]
    # without it, the listing: the same 2 listings again (first the pointer was looked
    # for), then every checkpoint's manifest
    Location.parse(f"{root}/checkpoints/{POINTER_NAME}", opts).remove()
    listings, reads = _discovery_requests(proxy, root, opts, f"checkpoint-{n - 1}")
    assert len(listings) == 2 + 4
    assert len(reads) == n + 1  # one manifest GET per candidate (the in-flight one: 404)
    assert all(r.method == "GET" and "checkpoint_manifest.json" in r.path for r in reads)


def _discovery_requests(
    proxy: FaultProxy, root: str, opts: dict[str, Any], latest: str
) -> tuple[list[RequestRecord], list[RequestRecord]]:
    """The listings and the reads of one ``find_latest_checkpoint`` (which must find
    ``latest``), with a cold listing cache."""
    Location.parse(root, opts).fs.invalidate_cache()
    proxy.reset_records()
    assert find_latest_checkpoint(root, storage_options=opts) == f"{root}/checkpoints/{latest}"
    records = proxy.records()
    return [r for r in records if _is_listing(r)], [r for r in records if not _is_listing(r)]


def _is_listing(r: RequestRecord) -> bool:
    return "list-type" in r.query or ("/o" in r.path and "prefix=" in r.query)


# ---- retention ------------------------------------------------------------------------------
@pytest.mark.parametrize("storage_root", ["s3", "gcs"], indirect=True)
def test_delete_goes_marker_manifest_then_batched_data(
    storage_root: StorageRoot, counted: tuple[FaultProxy, dict[str, Any]]
) -> None:
    """S3: marker PUT, manifest delete, one listing and one DeleteObjects for all the data,
    then the marker and the folder. GCS: the same order; gcsfs batches deletes (100 a
    request) on real GCS only, the emulator gets one DELETE per object."""
    proxy, opts = counted
    url = storage_root.join("run", "checkpoints", "checkpoint-1")
    sd = {f"t{i}": torch.randn(300) for i in range(40)}
    save_checkpoint(url, sd, safetensors=True, max_shard_size=3000, storage_options=opts)
    nfiles = len(list(Location.parse(url, opts).walk_files()))
    assert nfiles > 20
    Location.parse(url, opts).parent.join(POINTER_NAME).remove()  # tests/test_latest_pointer.py
    proxy.reset_records()
    delete_checkpoint(url, storage_options=opts)
    records = proxy.records()
    assert not Location.parse(url, opts).exists()
    # first the latest pointer is read (removed above: a 404), to drop it if it named this
    assert records[0].method == "GET" and POINTER_NAME in unquote(records[0].path)
    records = records[1:]
    writes = [r for r in records if r.method != "GET"]
    assert writes[0].method in ("PUT", "POST") and writes[0].nbytes  # the marker first
    if storage_root.backend == "s3":
        assert "ckptsvc-in-progress" in writes[0].path
        batches = [r for r in writes if r.method == "POST" and r.query == "delete"]
        data = max(batches, key=lambda r: r.nbytes)  # every data key in one DeleteObjects
        assert batches[0] is writes[1] and batches.index(data) == 1  # after the manifest
        assert len(batches) >= 3  # and the marker after the data (its own request)
        assert len(records) <= 10 < nfiles  # a fixed handful of requests, not one per file
    else:
        assert "checkpoint_manifest.json" in writes[1].path  # manifest before any data
        assert len(writes) <= 3 + nfiles  # marker, manifest, then each remaining object


@pytest.mark.parametrize("storage_root", ["s3", "gcs", "seaweedfs", "local"], indirect=True)
def test_crash_between_manifest_and_data_delete_is_collectable(
    storage_root: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = storage_root.join("run")
    opts = storage_root.storage_options
    for i in (1, 2):
        save_checkpoint(f"{root}/checkpoints/checkpoint-{i}", {"w": torch.full((8,), float(i))},
                        safetensors=True, storage_options=opts, step=i)  # fmt: skip
    victim = f"{root}/checkpoints/checkpoint-1"

    def crash_on_data(self: Location, **kw: Any) -> None:
        raise RuntimeError("crashed between manifest and data delete")

    monkeypatch.setattr(Location, "remove_children", crash_on_data)
    with pytest.raises(RuntimeError, match="crashed"):
        delete_checkpoint(victim, storage_options=opts)
    monkeypatch.undo()
    _assert_invisible_then_collected(root, victim, opts)


@pytest.mark.parametrize("storage_root", ["local", "s3", "gcs"], indirect=True)
def test_delete_removes_the_marker_last(
    storage_root: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash exactly when the marker's deletion is due: everything else is gone already and
    the directory is incomplete (marked), so it is never taken for a legacy checkpoint."""
    root = storage_root.join("run")
    opts = storage_root.storage_options
    for i in (1, 2):
        save_checkpoint(f"{root}/checkpoints/checkpoint-{i}", {"w": torch.full((8,), float(i))},
                        safetensors=True, max_shard_size=16, storage_options=opts, step=i)  # fmt: skip
    victim = Location.parse(f"{root}/checkpoints/checkpoint-1", opts)
    left: list[list[str]] = []

    real_remove = Location.remove

    def remove(self: Location, **kw: Any) -> None:
        if self.name == MARKER_NAME:
            left.append(sorted(c.name for c in victim.list_children()))
            raise RuntimeError("crash while deleting the marker")
        real_remove(self, **kw)

    monkeypatch.setattr(Location, "remove", remove)
    with pytest.raises(Exception, match="crash while deleting the marker"):
        delete_checkpoint(victim)
    monkeypatch.undo()
    assert left == [[MARKER_NAME]]  # the marker was the last thing standing
    _assert_invisible_then_collected(root, victim.url, opts)


@pytest.mark.multiproc
def test_kill9_between_manifest_and_data_delete(s3_root: StorageRoot) -> None:
    root = s3_root.join("run")
    opts = s3_root.storage_options
    for i in (1, 2):
        save_checkpoint(f"{root}/checkpoints/checkpoint-{i}", {"w": torch.full((8,), float(i))},
                        safetensors=True, storage_options=opts, step=i)  # fmt: skip
    victim = f"{root}/checkpoints/checkpoint-1"
    script = textwrap.dedent(
        f"""
        import os, signal
        from ckptsvc.ops.retention import delete_checkpoint
        from ckptsvc.storage import Location
        def remove_children(self, **kw):
            os.kill(os.getpid(), signal.SIGKILL)
        Location.remove_children = remove_children
        delete_checkpoint({victim!r}, storage_options={opts!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    _assert_invisible_then_collected(root, victim, opts)


def _assert_invisible_then_collected(root: str, victim: str, opts: dict[str, Any]) -> None:
    infos = {i.url: i for i in list_checkpoints(root, storage_options=opts)}
    assert infos[victim].status is CheckpointStatus.INCOMPLETE  # data there, manifest gone
    assert find_latest_checkpoint(root, storage_options=opts) == f"{root}/checkpoints/checkpoint-2"
    with pytest.raises(Exception):  # noqa: B017 - any refusal; never half a checkpoint
        load_checkpoint(victim, storage_options=opts)
    report = collect_garbage(root, storage_options=opts)
    assert victim in report.removed
    assert [i.url for i in list_checkpoints(root, storage_options=opts)] == [
        f"{root}/checkpoints/checkpoint-2"
    ]
    assert not Location.parse(victim, opts).exists()


@pytest.mark.parametrize("storage_root", ["s3", "gcs"], indirect=True)
def test_retention_in_the_background(storage_root: StorageRoot) -> None:
    root = storage_root.join("run")
    opts = storage_root.storage_options
    for i in range(5):
        save_checkpoint(f"{root}/checkpoints/checkpoint-{i}", {"w": torch.full((8,), float(i))},
                        safetensors=True, storage_options=opts, step=i)  # fmt: skip
    future = delete_oldest_checkpoints_in_background(root, 2, storage_options=opts)
    deleted = future.result(timeout=120)
    assert deleted == [f"{root}/checkpoints/checkpoint-{i}" for i in range(3)]
    left = [i.url for i in list_checkpoints(root, storage_options=opts)]
    assert left == [f"{root}/checkpoints/checkpoint-3", f"{root}/checkpoints/checkpoint-4"]


# ---- the retry bookkeeping of botocore ------------------------------------------------------
def test_botocore_retries_are_ckptsvcs_unless_configured(s3_root: StorageRoot) -> None:
    loc = s3_root.location()
    config = loc.fs.config_kwargs
    assert config["retries"]["total_max_attempts"] == 1
    mine = {**s3_root.storage_options, "config_kwargs": {"retries": {"max_attempts": 7}}}
    assert Location.parse(s3_root.url, mine).fs.config_kwargs["retries"]["max_attempts"] == 7
    assert "config_kwargs" not in loc.storage_options  # the user's options stay as given


def test_plan_reads_caps_views_per_range(tmp_path: Any) -> None:
    """Thousands of tiny tensors: ranges stay within preadv's buffer limit, bytes exact."""
    data = _payload(3000 * 8, seed=7)
    path = tmp_path / "tiny.bin"
    path.write_bytes(data)
    outs = [bytearray(8) for _ in range(3000)]
    extents = [(i * 8, memoryview(o)) for i, o in enumerate(outs)]
    assert all(
        len(r.views) <= 512 for r in plan_reads(extents, max_range_bytes=MiB, max_gap_bytes=0)
    )
    Location.parse(str(path)).read_scattered(extents)
    assert b"".join(outs) == data
