"""Retries against real faults: a fault-injecting HTTP proxy in front of the real emulators.

``ckptsvc.testing.fault_proxy.FaultProxy`` sits between s3fs/gcsfs and moto / SeaweedFS /
the GCS emulator on loopback and, by a seeded schedule, answers 500 / 503 SlowDown /
403, resets connections before answering or halfway through a body, and holds answers
longer than the client's read timeout. Saves and loads must succeed through transient
faults, retrying only the requests that failed; permanent errors must fail at once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import StorageRoot

from ckptsvc.errors import StoragePermissionError, StorageTransientError
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.sharded_checkpoint import load_checkpoint, save_checkpoint
from ckptsvc.storage import Location
from ckptsvc.testing.fault_proxy import FaultPlan, FaultProxy, RequestRecord

MiB = 2**20
PART = 5 * MiB


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small parts (several per shard), quick backoff, small read ranges (several GETs)."""
    monkeypatch.setenv("CKPTSVC_PART_SIZE_BYTES", str(PART))
    monkeypatch.setenv("CKPTSVC_UPLOAD_PARTS_IN_FLIGHT", "2")
    monkeypatch.setenv("CKPTSVC_RETRY_BASE_S", "0.05")
    monkeypatch.setenv("CKPTSVC_RETRY_ATTEMPTS", "8")
    monkeypatch.setenv("CKPTSVC_READ_CHUNK_BYTES", str(4 * MiB))


@pytest.fixture
def proxy(storage_root: StorageRoot) -> Iterator[FaultProxy]:
    if storage_root.server is None:
        pytest.skip("needs a server")
    with FaultProxy(storage_root.server.endpoint_url) as p:
        yield p


def _via(root: StorageRoot, proxy: FaultProxy, *, read_timeout_s: float = 1.0) -> dict[str, Any]:
    """The root's storage options, pointed at the proxy, with short client timeouts."""
    opts = dict(root.storage_options)
    if root.server is not None and root.server.kind == "gcs":
        return {**opts, "endpoint_url": proxy.endpoint_url, "requests_timeout": 10}
    return {
        **opts,
        "client_kwargs": {**opts["client_kwargs"], "endpoint_url": proxy.endpoint_url},
        "config_kwargs": {"read_timeout": read_timeout_s, "connect_timeout": 2},
    }


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big.weight": torch.randn(3 * MiB, generator=g),  # 12 MiB: a three-part upload
        "mid.weight": torch.randn(MiB // 2, generator=g),
        **{f"small{i}.bias": torch.randn(1000 + i, generator=g) for i in range(6)},
    }


def _repeats_only_faulted(records: list[RequestRecord]) -> None:
    """Every data request (one with a body, or a ranged read) sent more than once was
    faulted each time but the last: retries re-send exactly the request that failed,
    never the whole file or checkpoint. (Metadata reads such as HEAD may repeat.)"""
    # (the safetensors header probe, bytes=0-..., may be read once per caller that parses it)
    records = [r for r in records if r.nbytes or (r.range and not r.range.startswith("bytes=0-"))]
    sent = Counter(r.key for r in records)
    faulted = Counter(r.key for r in records if r.fault)
    over = {k: n for k, n in sent.items() if n > faulted[k] + 1}
    assert not over, f"requests re-sent without having failed: {over}"


def _multipart_uploads(root: StorageRoot) -> list[dict[str, Any]]:
    if root.server is None or root.server.kind != "s3":
        return []
    client = root.server.boto3_client()
    return list(client.list_multipart_uploads(Bucket=root.bucket).get("Uploads", []))


@pytest.mark.parametrize("storage_root", ["s3", "seaweedfs"], indirect=True)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_save_and_load_survive_transient_faults(
    storage_root: StorageRoot, proxy: FaultProxy, seed: int
) -> None:
    opts = _via(storage_root, proxy)
    url = storage_root.join("run", "checkpoints", "checkpoint-1")
    sd = _state(seed)
    proxy.set_plan(FaultPlan(seed=seed, rate=0.25, stall_s=1.5))
    save_checkpoint(url, sd, safetensors=True, max_shard_size=8 * MiB, storage_options=opts)
    saved = proxy.records()
    proxy.reset_records()
    loaded = load_checkpoint(url, storage_options=opts)
    read = proxy.records()
    proxy.set_plan(FaultPlan())  # the checks below go through untouched

    assert loaded is not None and set(loaded) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    report = verify_checkpoint(url, storage_options=storage_root.storage_options)
    assert report.ok, report.problems
    assert _multipart_uploads(storage_root) == []

    for phase in (saved, read):
        assert sum(1 for r in phase if r.fault) >= 2, "the schedule must actually hurt"
        _repeats_only_faulted(phase)
    kinds = {r.fault for r in saved + read if r.fault}
    assert len(kinds) >= 3, kinds
    assert any(r.method in ("PUT", "POST") and r.fault for r in saved)
    assert any(r.method == "GET" and r.fault for r in read)


@pytest.mark.slow
def test_each_fault_kind_is_survived(s3_root: StorageRoot) -> None:
    """One kind at a time, every shard request faulted once."""
    assert s3_root.server is not None
    sd = _state(9)
    with FaultProxy(s3_root.server.endpoint_url) as p:
        opts = _via(s3_root, p, read_timeout_s=0.5)
        for i, kind in enumerate(("500", "503", "drop", "stall", "cut")):
            p.set_plan(
                FaultPlan(seed=i, rate=1.0, kinds=(kind,), match="safetensors", stall_s=1.0,
                          max_per_request=1)
            )  # fmt: skip
            url = s3_root.join(f"k{i}")
            save_checkpoint(url, sd, safetensors=True, storage_options=opts)
            out = load_checkpoint(url, storage_options=opts)
            assert out is not None and all(torch.equal(out[k], v) for k, v in sd.items())
            stats = p.stats()
            assert stats.faults.get(kind, 0) >= 3, (kind, stats)
            _repeats_only_faulted(p.records())
            p.reset_records()
    assert _multipart_uploads(s3_root) == []


@pytest.mark.slow
@pytest.mark.parametrize("storage_root", ["gcs"], indirect=True)
def test_gcs_save_and_load_survive_faults(storage_root: StorageRoot, proxy: FaultProxy) -> None:
    """gcsfs retries each request itself (1-2 s backoff per fault): few faults here, and
    only faults the server never sees (the emulator mishandles re-sent chunks, see
    ``ckptsvc.storage.resumable``)."""
    opts = _via(storage_root, proxy)
    url = storage_root.join("run", "checkpoints", "checkpoint-1")
    sd = _state(4)
    proxy.set_plan(
        FaultPlan(seed=4, rate=0.3, kinds=("500", "503", "drop"), max_faults=5,
                  flavor="gcs")
    )  # fmt: skip
    save_checkpoint(url, sd, safetensors=True, max_shard_size=8 * MiB, storage_options=opts)
    loaded = load_checkpoint(url, storage_options=opts)
    assert loaded is not None and all(torch.equal(loaded[k], v) for k, v in sd.items())
    assert proxy.stats().total_faults == 5
    assert verify_checkpoint(url, storage_options=storage_root.storage_options).ok


@pytest.mark.parametrize("storage_root", ["s3", "gcs"], indirect=True)
@pytest.mark.parametrize("op", ["save", "load", "list"])
def test_permanent_403_fails_fast(
    storage_root: StorageRoot, proxy: FaultProxy, op: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = storage_root.join("ckpt")
    save_checkpoint(url, _state(), safetensors=True, storage_options=storage_root.storage_options)
    flavor = "gcs" if storage_root.backend == "gcs" else "s3"
    proxy.set_plan(FaultPlan(rate=1.0, kinds=("403",), max_per_request=None, flavor=flavor))
    opts = _via(storage_root, proxy)
    caplog.set_level(logging.WARNING)
    with pytest.raises(StoragePermissionError) as info:
        if op == "save":
            save_checkpoint(url + "-2", _state(), safetensors=True, storage_options=opts)
        elif op == "load":
            load_checkpoint(url, storage_options=opts)
        else:
            Location.parse(url, opts).list_children()
    assert "credentials" in str(info.value)
    assert storage_root.bucket is not None and storage_root.bucket in str(info.value)
    # not retried: one request (gcsfs's info asks for the object, then for the prefix)
    most = 3 if flavor == "gcs" and op == "save" else 1
    assert proxy.stats().total_requests <= most, proxy.records()
    bucket = storage_root.bucket
    assert not [m for r in caplog.records if "retrying" in (m := r.getMessage()) and bucket in m]


def test_transient_errors_give_up_after_bounded_attempts(
    s3_root: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that keeps failing: exactly ``CKPTSVC_RETRY_ATTEMPTS`` requests, then a
    StorageTransientError naming the file (botocore's own retries are off)."""
    monkeypatch.setenv("CKPTSVC_RETRY_ATTEMPTS", "3")
    monkeypatch.setenv("CKPTSVC_RETRY_BASE_S", "0")
    assert s3_root.server is not None
    with FaultProxy(s3_root.server.endpoint_url) as p:
        p.set_plan(FaultPlan(rate=1.0, kinds=("500",), max_per_request=None))
        loc = Location.parse(s3_root.join("x.json"), _via(s3_root, p))
        with pytest.raises(StorageTransientError) as info:
            loc.publish(b"{}")
        assert loc.url in str(info.value)
        assert p.stats().requests == {"PUT": 3}


def test_proxy_passthrough_is_transparent(s3_root: StorageRoot) -> None:
    assert s3_root.server is not None
    with FaultProxy(s3_root.server.endpoint_url) as p:
        opts = _via(s3_root, p)
        url = s3_root.join("ckpt")
        sd = _state(5)
        save_checkpoint(url, sd, safetensors=True, storage_options=opts)
        out = load_checkpoint(url, storage_options=opts)
        assert out is not None and all(torch.equal(out[k], v) for k, v in sd.items())
        stats = p.stats()
        assert stats.total_faults == 0
        assert stats.requests.get("PUT", 0) >= 3 and stats.requests.get("GET", 0) >= 3
        data = [
            r for r in p.records() if r.nbytes or (r.range and not r.range.startswith("bytes=0-"))
        ]
        assert len({r.key for r in data}) == len(data)  # no data request repeated


def test_fault_plan_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FaultPlan(kinds=("explode",))
    with pytest.raises(ValueError, match="rate"):
        FaultPlan(rate=1.5)
    with pytest.raises(ValueError, match="http://host:port"):
        FaultProxy("https://example.com")
