"""Conformance suite for ``ckptsvc.storage``: the same behaviour on every backend.

Every test taking ``storage_root`` runs on local disk, memory://, S3 (moto), GCS (emulator)
and SeaweedFS (a real S3 implementation); see ``tests/conftest.py``.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from conftest import StorageRoot
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from servers import Server, ServerStartError

from ckptsvc.errors import (
    CheckpointError,
    CorruptCheckpointError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageTransientError,
)
from ckptsvc.storage import ChildInfo, Location, call_with_retries, classify, url_to_fs
from ckptsvc.storage.errors import is_transient

MiB = 2**20
S3_MIN_PART_BYTES = 5 * MiB


def _payload(nbytes: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def _multipart_uploads(root: StorageRoot) -> list[dict[str, Any]]:
    """Unfinished S3 multipart uploads in the root's bucket ([] on other backends)."""
    if root.server is None or root.server.kind != "s3":
        return []
    client = root.server.boto3_client()
    return list(client.list_multipart_uploads(Bucket=root.bucket).get("Uploads", []))


def _fresh(loc: Location) -> Location:
    """The same location seen through a filesystem without listing caches."""
    if loc.is_local:
        return loc
    loc.fs.invalidate_cache()
    return loc


# ---- publish / read ---------------------------------------------------------------------
def test_publish_then_read_back(storage_root: StorageRoot) -> None:
    loc = storage_root.location("dir", "sub", "manifest.json")
    loc.publish(b'{"v": 1}')
    assert loc.read_bytes() == b'{"v": 1}'
    assert loc.exists()
    assert loc.size() == 8


def test_publish_replaces_whole_content(storage_root: StorageRoot) -> None:
    loc = storage_root.location("index.json")
    loc.publish(b"x" * 1000)
    loc.publish(b"short")
    assert _fresh(loc).read_bytes() == b"short"
    assert loc.size() == 5


def test_publish_local_leaves_no_temp_files(tmp_path: Path) -> None:
    loc = Location.parse(tmp_path / "ckpt").join("checkpoint_manifest.json")
    loc.publish(b"one")
    loc.publish(b"two")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["checkpoint_manifest.json"]
    assert (tmp_path / "ckpt" / "checkpoint_manifest.json").read_bytes() == b"two"


def test_publish_local_failure_names_url_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "is_a_dir"
    (target / "child").mkdir(parents=True)
    loc = Location.parse(target)
    with pytest.raises(StorageError) as info:
        loc.publish(b"data")
    assert str(target) in str(info.value)
    assert os.listdir(tmp_path) == ["is_a_dir"]  # no stray temp file beside it
    assert os.listdir(target) == ["child"]


def test_publish_empty_file(storage_root: StorageRoot) -> None:
    loc = storage_root.location("empty.bin")
    loc.publish(b"")
    assert loc.exists()
    assert loc.size() == 0
    assert loc.read_bytes() == b""


def test_read_range(storage_root: StorageRoot) -> None:
    data = _payload(10_000)
    loc = storage_root.location("blob.bin")
    loc.publish(data)
    assert loc.read_range(0, 8) == data[:8]
    assert loc.read_range(1234, 5678) == data[1234:5678]
    assert loc.read_range(9_990, 10_000) == data[9_990:]
    assert loc.read_range(9_995, 20_000) == data[9_995:]  # short read at end of file
    assert loc.read_range(50, 50) == b""


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_read_into_fills_buffer(storage_root: StorageRoot, dtype: type) -> None:
    data = _payload(4096 + 64)
    loc = storage_root.location("t.safetensors")
    loc.publish(data)
    out: np.ndarray[Any, Any] = np.zeros(4096 // np.dtype(dtype).itemsize, dtype=dtype)
    loc.read_into(64, out.data)
    assert out.tobytes() == data[64:]


def test_read_into_chunked_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _payload(100_000)
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setenv("CKPTSVC_READ_CHUNK_BYTES", "4096")  # many preadv calls
    out = bytearray(90_000)
    Location.parse(tmp_path / "f").read_into(7, memoryview(out))
    assert bytes(out) == data[7:90_007]


@pytest.mark.parametrize(
    "offset", [0, 90, 100, 150], ids=["overlap0", "overlap90", "at-eof", "past-eof"]
)
def test_read_into_truncated_file_is_corrupt(storage_root: StorageRoot, offset: int) -> None:
    loc = storage_root.location("short.bin")
    loc.publish(_payload(100))
    out = bytearray(64 if offset < 100 else 8)
    if offset == 0:
        out = bytearray(200)
    with pytest.raises(CorruptCheckpointError) as info:
        loc.read_into(offset, memoryview(out))
    assert loc.url in str(info.value)
    assert "truncated" in str(info.value)


# ---- streaming sinks --------------------------------------------------------------------
def _write_chunks(sink: Any, data: bytes, chunk_nbytes: int) -> None:
    view = memoryview(data)
    for i, start in enumerate(range(0, len(data), chunk_nbytes)):
        piece = view[start : start + chunk_nbytes]
        sink.write(piece if i % 2 else bytes(piece))  # both accepted types


def _sink_sizes(root: StorageRoot) -> tuple[int, int]:
    """(bytes to write, part size): several parts on object stores, small elsewhere."""
    if root.remote:
        return 2 * S3_MIN_PART_BYTES + 12345, S3_MIN_PART_BYTES
    return 300_000 + 7, S3_MIN_PART_BYTES


def test_sink_write_close(storage_root: StorageRoot) -> None:
    nbytes, part = _sink_sizes(storage_root)
    data = _payload(nbytes, seed=1)
    loc = storage_root.location("ckpt", "model-00001-of-00001.safetensors")
    sink = loc.open_sink(part_size_bytes=part)
    _write_chunks(sink, data, 1 * MiB + 3)
    sink.close()
    sink.close()  # idempotent
    assert _fresh(loc).size() == nbytes
    assert loc.read_bytes() == data
    assert _multipart_uploads(storage_root) == []


def test_sink_small_file_single_request(storage_root: StorageRoot) -> None:
    loc = storage_root.location("small.bin")
    sink = loc.open_sink()
    sink.write(b"abc")
    sink.write(memoryview(b"def"))
    sink.close()
    assert loc.read_bytes() == b"abcdef"


@pytest.mark.parametrize("when", ["before-any-part", "after-parts"])
def test_sink_abort_leaves_nothing(storage_root: StorageRoot, when: str) -> None:
    nbytes, part = _sink_sizes(storage_root)
    data = _payload(nbytes, seed=2)
    loc = storage_root.location("ckpt", "aborted.safetensors")
    sink = loc.open_sink(part_size_bytes=part)
    if when == "before-any-part":
        sink.write(data[:1000])
    else:
        _write_chunks(sink, data, 1 * MiB)
        if storage_root.backend in ("s3", "seaweedfs"):
            assert len(_multipart_uploads(storage_root)) == 1  # the test must see one to end
    sink.abort()
    del sink
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gc.collect()  # a discarded fsspec file must not upload itself from __del__
    assert not _fresh(loc).exists()
    assert _multipart_uploads(storage_root) == []
    names = [c.name for c in _list_or_empty(storage_root.location("ckpt"))]
    assert "aborted.safetensors" not in names


def _list_or_empty(loc: Location) -> list[ChildInfo]:
    try:
        return _fresh(loc).list_children()
    except StorageNotFoundError:
        return []


def test_sink_abort_after_close_is_harmless(storage_root: StorageRoot) -> None:
    loc = storage_root.location("kept.bin")
    sink = loc.open_sink()
    sink.write(b"payload")
    sink.close()
    sink.abort()  # e.g. an error handler that runs after a successful close
    assert _fresh(loc).read_bytes() == b"payload"


# ---- listing, stat, remove --------------------------------------------------------------
def _populate(root: StorageRoot) -> Location:
    base = root.location("run")
    base.join("a.bin").publish(b"a" * 10)
    base.join("b.json").publish(b"{}")
    base.join("checkpoint-1", "model.safetensors").publish(b"m" * 100)
    base.join("checkpoint-2", "deep", "x.bin").publish(b"x")
    return base


def test_list_children_dirs_and_files(storage_root: StorageRoot) -> None:
    base = _populate(storage_root)
    children = {c.name: c for c in _fresh(base).list_children()}
    assert set(children) == {"a.bin", "b.json", "checkpoint-1", "checkpoint-2"}
    assert {n for n, c in children.items() if c.is_dir} == {"checkpoint-1", "checkpoint-2"}
    assert children["a.bin"].nbytes == 10
    assert children["b.json"].nbytes == 2
    assert all(isinstance(c, ChildInfo) for c in children.values())
    for c in children.values():  # legacy-checkpoint discovery orders files by mtime
        if not c.is_dir:
            assert c.mtime is not None and abs(c.mtime - time.time()) < 86_400, c
    sub = {c.name: c for c in base.join("checkpoint-1").list_children()}
    assert set(sub) == {"model.safetensors"}
    assert not sub["model.safetensors"].is_dir


def test_list_children_is_one_listing(
    storage_root: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _populate(storage_root)
    calls: list[str] = []
    if base.is_local:
        real_scandir = os.scandir

        def scandir_spy(path: Any) -> Any:
            calls.append("scandir")
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir_spy)
        assert len(base.list_children()) == 4
        assert calls == ["scandir"]
        return
    fs = base.fs
    for name in ("ls", "info", "find", "cat_file", "exists", "isdir", "_ls", "_info", "_find"):
        if hasattr(fs, name):
            real: Callable[..., Any] = getattr(fs, name)

            def spy(*args: Any, _real: Callable[..., Any] = real, _n: str = name, **kw: Any) -> Any:
                calls.append(_n)
                return _real(*args, **kw)

            monkeypatch.setattr(fs, name, spy)
    assert len(base.list_children()) == 4
    assert calls.count("ls") == 1
    assert not {"info", "find", "cat_file", "_info", "_find"} & set(calls)


def test_list_children_missing_dir_is_not_found(storage_root: StorageRoot) -> None:
    loc = storage_root.location("nowhere")
    with pytest.raises(StorageNotFoundError) as info:
        loc.list_children()
    assert loc.url in str(info.value)


def test_exists_isdir_size(storage_root: StorageRoot) -> None:
    base = _populate(storage_root)
    f = base.join("a.bin")
    d = base.join("checkpoint-1")
    missing = base.join("missing.bin")
    assert f.exists() and not f.isdir()
    assert d.exists() and d.isdir()
    assert not missing.exists() and not missing.isdir()
    assert f.size() == 10
    with pytest.raises(StorageNotFoundError) as info:
        missing.size()
    assert missing.url in str(info.value)


def test_walk_files(storage_root: StorageRoot) -> None:
    base = _populate(storage_root)
    found = dict(_fresh(base).walk_files())
    assert found == {
        "a.bin": 10,
        "b.json": 2,
        "checkpoint-1/model.safetensors": 100,
        "checkpoint-2/deep/x.bin": 1,
    }


def test_remove_recursive(storage_root: StorageRoot) -> None:
    base = _populate(storage_root)
    ckpt = base.join("checkpoint-2")
    ckpt.remove(recursive=True)
    assert not _fresh(ckpt).exists()
    assert {c.name for c in base.list_children()} == {"a.bin", "b.json", "checkpoint-1"}
    base.join("a.bin").remove()
    assert not base.join("a.bin").exists()
    assert base.join("checkpoint-1", "model.safetensors").read_bytes() == b"m" * 100


def test_remove_children_keeps_the_named_ones(storage_root: StorageRoot) -> None:
    base = _populate(storage_root)
    base.remove_children(keep=("b.json", "no-such-name"))
    assert {c.name for c in _fresh(base).list_children()} == {"b.json"}
    assert base.join("b.json").read_bytes() == b"{}"
    base.remove_children()
    assert _list_or_empty(base) == []
    storage_root.location("never-made").remove_children()  # nothing there: fine


def test_remove_missing(storage_root: StorageRoot) -> None:
    loc = storage_root.location("never-written.bin")
    loc.remove()  # missing_ok=True by default
    loc.remove(recursive=True)
    with pytest.raises(StorageNotFoundError) as info:
        loc.remove(missing_ok=False)
    assert loc.url in str(info.value)


def test_makedirs_then_publish(storage_root: StorageRoot) -> None:
    d = storage_root.location("made", "here")
    d.makedirs()
    d.makedirs()  # exist_ok
    d.join("f").publish(b"1")
    assert d.join("f").read_bytes() == b"1"


# ---- errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["read_bytes", "read_range", "read_into", "size"])
def test_missing_file_is_storage_not_found(storage_root: StorageRoot, op: str) -> None:
    loc = storage_root.location("no", "such", "file.safetensors")
    call: dict[str, Callable[[], object]] = {
        "read_bytes": loc.read_bytes,
        "read_range": lambda: loc.read_range(0, 10),
        "read_into": lambda: loc.read_into(0, memoryview(bytearray(10))),
        "size": loc.size,
    }
    with pytest.raises(StorageNotFoundError) as info:
        call[op]()
    err = info.value
    assert isinstance(err, FileNotFoundError)
    assert isinstance(err, CheckpointError)
    assert loc.url in str(err)
    assert err.url == loc.url


@pytest.mark.parametrize("storage_root", ["s3", "gcs", "seaweedfs"], indirect=True)
def test_missing_bucket_is_not_found(storage_root: StorageRoot) -> None:
    scheme = storage_root.url.split("://")[0]
    loc = Location.parse(f"{scheme}://no-such-bucket-ckptsvc/x.bin", storage_root.storage_options)
    with pytest.raises(StorageNotFoundError) as info:
        loc.read_bytes()
    assert "no-such-bucket-ckptsvc" in str(info.value)


@pytest.mark.parametrize("storage_root", ["seaweedfs"], indirect=True)
@pytest.mark.parametrize("op", ["read", "write", "list"])
def test_bad_credentials_fail_fast_as_permission_error(
    storage_root: StorageRoot, op: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SeaweedFS checks signatures (moto does not): a wrong secret is permanent, not retried."""
    storage_root.location("obj.bin").publish(b"secret")
    bad = {**storage_root.storage_options, "secret": "wrong-secret", "skip_instance_cache": True}
    loc = Location.parse(storage_root.url, bad).join("obj.bin")
    call: dict[str, Callable[[], object]] = {
        "read": loc.read_bytes,
        "write": lambda: loc.publish(b"x"),
        "list": loc.parent.list_children,
    }
    caplog.set_level(logging.WARNING, logger="ckptsvc")
    with pytest.raises(StoragePermissionError) as info:
        call[op]()
    assert isinstance(info.value, PermissionError)
    assert storage_root.bucket is not None and storage_root.bucket in str(info.value)
    assert "credentials" in str(info.value)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_local_permission_denied(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root bypasses file permissions")
    f = tmp_path / "locked.bin"
    f.write_bytes(b"x")
    f.chmod(0)
    with pytest.raises(StoragePermissionError):
        Location.parse(f).read_bytes()


def test_storage_error_pickles_with_url() -> None:
    err = StorageNotFoundError("read s3://b/k: not found", url="s3://b/k")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is StorageNotFoundError
    assert back.url == "s3://b/k"
    assert str(back) == "read s3://b/k: not found"


@pytest.mark.parametrize(
    ("exc", "leaf"),
    [
        (FileNotFoundError(2, "No such file"), StorageNotFoundError),
        (PermissionError(13, "denied"), StoragePermissionError),
        (
            OSError("An error occurred (AccessDenied) when calling PutObject"),
            StoragePermissionError,
        ),
        (OSError("NoSuchBucket: the bucket does not exist"), StorageNotFoundError),
        (ConnectionResetError(104, "Connection reset by peer"), StorageTransientError),
        (OSError("503 SlowDown: please reduce your request rate"), StorageTransientError),
        (ValueError("something odd"), StorageError),
        # a port or a byte count holding "401"/"404" is no HTTP status; a timeout is transient
        (TimeoutError("connect to 127.0.0.1:34017 timed out"), StorageTransientError),
        (
            OSError("Connect timeout on endpoint URL: http://127.0.0.1:34017/"),
            StorageTransientError,
        ),
        (OSError("short write: 14041 of 40960 bytes"), StorageError),
        (OSError("An error occurred (403) when calling PutObject"), StoragePermissionError),
        (OSError("server answered 404"), StorageNotFoundError),
    ],
)
def test_classify(exc: BaseException, leaf: type[StorageError]) -> None:
    err = classify(exc, "s3://bucket/key", "read")
    assert type(err) is leaf
    assert "s3://bucket/key" in str(err)
    assert err.url == "s3://bucket/key"


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        # gcsfs's 403 names the object: a random bucket holding "504" is no 504 (this
        # retried a permanent 403 eight times in CI)
        (
            OSError("Forbidden: http://127.0.0.1:45583/b/t-b328a431eb504ad3/o/m Access Denied"),
            False,
        ),
        (OSError("not found: http://h:1/b/t-500a/o/x 404"), False),
        (OSError("server answered 503 Service Unavailable"), True),
        (OSError("HTTP 502: bad gateway"), True),
        (OSError("object t-a500b: short read"), False),
    ],
)
def test_retry_reads_a_status_in_the_text_only_as_a_whole_word(
    exc: BaseException, transient: bool
) -> None:
    assert is_transient(exc) is transient


# ---- naming -----------------------------------------------------------------------------
@pytest.mark.parametrize("part", ["..", "a/../b", "/etc", "", ".", "a//b", "a\\b", "nul\x00", "x/"])
def test_join_rejects_unsafe_parts(storage_root: StorageRoot, part: str) -> None:
    with pytest.raises(ValueError, match="unsafe path component"):
        storage_root.location().join(part)


def test_join_builds_child_urls(storage_root: StorageRoot) -> None:
    root = storage_root.location()
    child = root.join("checkpoints", "checkpoint-10/model.safetensors")
    assert (
        child.url == storage_root.url.rstrip("/") + "/checkpoints/checkpoint-10/model.safetensors"
    )
    assert child.name == "model.safetensors"
    assert child.parent.name == "checkpoint-10"
    assert child.parent.parent.parent.url == root.url
    assert str(child) == child.url
    assert child.storage_options == storage_root.storage_options


def test_url_to_fs_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for given in (str(tmp_path / "x"), tmp_path / "x", f"file://{tmp_path}/x"):
        fs, path = url_to_fs(given)
        assert isinstance(fs, LocalFileSystem)
        assert path == f"{tmp_path}/x"
    fs, path = url_to_fs("rel/dir")
    assert isinstance(fs, LocalFileSystem)
    assert os.path.abspath(path) == f"{tmp_path}/rel/dir"
    with pytest.raises(ValueError):
        url_to_fs("")


def test_location_parse_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = Location.parse("runs/a/")
    assert rel.is_local
    assert rel.path == f"{tmp_path}/runs/a"
    assert rel.url == f"{tmp_path}/runs/a"
    url = Location.parse(f"file://{tmp_path}/runs")
    assert url.is_local and url.path == f"{tmp_path}/runs"
    assert url.join("a").path == f"{tmp_path}/runs/a"
    assert Location.parse(url) is url


def test_url_to_fs_remote_protocols(storage_root: StorageRoot) -> None:
    fs, path = url_to_fs(storage_root.url, **storage_root.storage_options)
    expected = {
        "local": LocalFileSystem,
        "memory": MemoryFileSystem,
        "s3": fsspec.get_filesystem_class("s3"),
        "seaweedfs": fsspec.get_filesystem_class("s3"),
        "gcs": fsspec.get_filesystem_class("gs"),
    }[storage_root.backend]
    assert isinstance(fs, expected)
    assert path.rstrip("/").endswith(storage_root.url.split("://")[-1].rstrip("/").lstrip("/"))
    loc = storage_root.location()
    assert loc.url == storage_root.url
    assert loc.is_local == (storage_root.backend == "local")


def test_url_to_fs_offline_protocols() -> None:
    s3, s3_path = url_to_fs("s3://bucket/run/ckpt", anon=True)
    assert "s3" in s3.protocol and s3_path == "bucket/run/ckpt"
    gs, gs_path = url_to_fs("gs://bucket/run", token="anon")
    assert "gs" in gs.protocol and gs_path == "bucket/run"
    mem, mem_path = url_to_fs("memory://x/y")
    assert isinstance(mem, MemoryFileSystem) and mem_path == "/x/y"
    with pytest.raises(StorageError, match="nosuchproto://x"):
        url_to_fs("nosuchproto://x")


# ---- retries ----------------------------------------------------------------------------
class _Flaky:
    """A callable that raises each of ``errors`` once, then returns ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_retries_transient_then_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    fn = _Flaky(ConnectionResetError(104, "reset"), TimeoutError("read timed out"))
    caplog.set_level(logging.WARNING)
    assert call_with_retries(fn, url="s3://b/k", action="read", base_s=0.0) == "ok"
    assert fn.calls == 3
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


def test_retries_permanent_error_fails_at_once() -> None:
    fn = _Flaky(PermissionError(13, "AccessDenied"))
    with pytest.raises(StoragePermissionError) as info:
        call_with_retries(fn, url="s3://b/k", action="write", attempts=5, base_s=0.0)
    assert fn.calls == 1
    assert "s3://b/k" in str(info.value)
    assert isinstance(info.value.__cause__, PermissionError)


def test_retries_are_bounded_by_attempts() -> None:
    fn = _Flaky(*[ConnectionResetError(104, "reset")] * 10)
    with pytest.raises(StorageTransientError) as info:
        call_with_retries(fn, url="gs://b/k", action="read", attempts=4, base_s=0.0)
    assert fn.calls == 4
    assert "gs://b/k" in str(info.value)


def test_retries_are_bounded_by_time() -> None:
    fn = _Flaky(*[OSError("503 Service Unavailable")] * 10)
    with pytest.raises(StorageTransientError):
        call_with_retries(fn, url="s3://b/k", action="read", attempts=10, max_s=0.0, base_s=0.0)
    assert fn.calls == 1


def test_retries_pass_checkpoint_errors_through() -> None:
    fn = _Flaky(CorruptCheckpointError("bad header in s3://b/k"))
    with pytest.raises(CorruptCheckpointError):
        call_with_retries(fn, url="s3://b/k", action="read", base_s=0.0)
    assert fn.calls == 1


def test_retry_knobs_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTSVC_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("CKPTSVC_RETRY_BASE_S", "0")
    fn = _Flaky(*[ConnectionResetError(104, "reset")] * 5)
    with pytest.raises(StorageTransientError):
        call_with_retries(fn, url="s3://b/k", action="read")
    assert fn.calls == 2


class _FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def _default_retry_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ATTEMPTS", "MAX_S", "BASE_S", "MAX_DELAY_S"):
        monkeypatch.delenv(f"CKPTSVC_RETRY_{name}", raising=False)


@pytest.mark.parametrize("outage_s", [30.0, 60.0, 100.0])
@pytest.mark.parametrize("seed", range(20))
def test_default_retries_ride_out_an_outage(
    monkeypatch: pytest.MonkeyPatch, outage_s: float, seed: int
) -> None:
    """Connection refused on every try for ``outage_s`` seconds (fake time): with the
    default knobs the request goes through soon after the store is back."""
    import random

    from ckptsvc.storage.retry import RetryPolicy

    _default_retry_knobs(monkeypatch)
    random.seed(seed)
    t = _FakeTime()

    def fn() -> str:
        if t.now < outage_s:
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    policy = RetryPolicy.from_knobs(clock=t.clock)
    assert (
        call_with_retries(fn, url="s3://b/k", action="read", policy=policy, sleep=t.sleep) == "ok"
    )
    assert t.now < outage_s + policy.max_delay_s  # one capped delay after the outage at most
    assert max(t.sleeps) <= policy.max_delay_s == 5.0


def test_default_retries_are_bounded_by_the_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptsvc.storage.retry import RetryPolicy

    _default_retry_knobs(monkeypatch)
    t = _FakeTime()
    fn = _Flaky(*[OSError("503 Service Unavailable")] * 10_000)
    policy = RetryPolicy.from_knobs(clock=t.clock)
    with pytest.raises(StorageTransientError):
        call_with_retries(fn, url="s3://b/k", action="read", policy=policy, sleep=t.sleep)
    assert t.now == pytest.approx(policy.max_s) and policy.max_s == 120.0
    assert 24 < fn.calls < policy.attempts  # time governed, not the attempts backstop


@pytest.mark.parametrize(
    "error",
    [PermissionError(13, "AccessDenied"), FileNotFoundError(2, "NoSuchBucket: no such bucket")],
)
def test_default_retries_still_fail_fast_on_permanent_errors(
    monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    _default_retry_knobs(monkeypatch)
    t = _FakeTime()
    fn = _Flaky(error)
    with pytest.raises((StoragePermissionError, StorageNotFoundError)):
        call_with_retries(fn, url="s3://b/k", action="write", sleep=t.sleep)
    assert fn.calls == 1 and t.sleeps == []


def test_retry_delay_cap_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptsvc.storage.retry import RetryPolicy

    monkeypatch.setenv("CKPTSVC_RETRY_MAX_DELAY_S", "0.5")
    monkeypatch.setenv("CKPTSVC_RETRY_BASE_S", "10")
    policy = RetryPolicy.from_knobs()
    delays = [
        policy.delay_s(ConnectionResetError(104, "reset"), attempt=n, started_s=policy.clock())
        for n in range(1, 30)
    ]
    assert all(d is not None and 0 <= d <= 0.5 for d in delays)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_s3_save_with_default_retries_rides_out_an_endpoint_outage(
    s3_root: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real outage: the endpoint refuses connections for 8 s while a multipart save
    runs; with the default retry knobs the save finishes and loads back."""
    import threading

    import torch

    from ckptsvc.sharded_checkpoint import load_checkpoint, save_checkpoint
    from ckptsvc.testing.fault_proxy import FaultProxy

    _default_retry_knobs(monkeypatch)
    monkeypatch.setenv("CKPTSVC_PART_SIZE_BYTES", str(5 * 2**20))
    assert s3_root.server is not None
    sd = {"big": torch.arange(3 * 2**20, dtype=torch.float32), "small": torch.ones(8)}
    with FaultProxy(s3_root.server.endpoint_url) as proxy:
        opts = dict(s3_root.storage_options)
        opts["client_kwargs"] = {**opts["client_kwargs"], "endpoint_url": proxy.endpoint_url}
        opts["config_kwargs"] = {"connect_timeout": 2, "read_timeout": 10}
        path = s3_root.join("checkpoints", "checkpoint-1")
        resumed: list[float] = []

        def outage() -> None:
            deadline = time.monotonic() + 60
            while not any(r.method == "PUT" and "partNumber" in r.query for r in proxy.records()):
                assert time.monotonic() < deadline
                time.sleep(0.005)
            proxy.pause()  # mid-upload: parts, completion and manifest all hit the outage
            time.sleep(8.0)
            proxy.resume()
            resumed.append(time.monotonic())

        thread = threading.Thread(target=outage, daemon=True)
        thread.start()
        save_checkpoint(path, sd, safetensors=True, storage_options=opts)
        finished = time.monotonic()
        thread.join(timeout=60)
        assert resumed and finished > resumed[0]  # the save went on across the outage
        got = load_checkpoint(path, storage_options=opts)
    assert torch.equal(got["big"], sd["big"]) and torch.equal(got["small"], sd["small"])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_s3_upload_of_a_save_failed_by_an_outage_is_aborted_once_the_store_is_back(
    s3_root: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outage outlasts a short retry budget: the upload fails, and so does its abort.
    The sink keeps trying the abort in the background: nothing stays behind after."""
    import threading

    from ckptsvc.storage import multipart
    from ckptsvc.testing.fault_proxy import FaultProxy

    monkeypatch.setenv("CKPTSVC_RETRY_MAX_S", "1.0")
    monkeypatch.setenv("CKPTSVC_RETRY_MAX_DELAY_S", "0.2")
    monkeypatch.setattr(multipart, "_ABORT_LATER_PAUSE_S", 0.2)
    assert s3_root.server is not None
    client = s3_root.server.boto3_client()
    with FaultProxy(s3_root.server.endpoint_url) as proxy:
        opts = dict(s3_root.storage_options)
        opts["client_kwargs"] = {**opts["client_kwargs"], "endpoint_url": proxy.endpoint_url}
        opts["config_kwargs"] = {"connect_timeout": 1, "read_timeout": 5}
        loc = Location.parse(s3_root.join("checkpoints", "c-1", "big.bin"), opts)
        sink = multipart.S3MultipartSink(loc, part_size_bytes=5 * 2**20, parts_in_flight=2)
        sink.write(b"x" * (5 * 2**20 + 1))  # the upload exists, part 1 is on its way
        uploads = client.list_multipart_uploads(Bucket=s3_root.bucket).get("Uploads", [])
        assert len(uploads) == 1
        proxy.pause()
        with pytest.raises(StorageError):
            sink.close()  # the completion fails, then the abort
        assert client.list_multipart_uploads(Bucket=s3_root.bucket).get("Uploads")
        threading.Timer(2.0, proxy.resume).start()
        deadline = time.monotonic() + 60
        while client.list_multipart_uploads(Bucket=s3_root.bucket).get("Uploads"):
            assert time.monotonic() < deadline, "the failed save's upload is still there"
            time.sleep(0.2)


# ---- the test infrastructure itself -----------------------------------------------------
def test_unstartable_server_fails_in_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import conftest

    def cannot_start() -> Server:
        raise ServerStartError("weed: binary not found")

    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI=true forbids skipping"):
        conftest._start_or_skip("seaweedfs", cannot_start)
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="binary not found"):
        conftest._start_or_skip("seaweedfs", cannot_start)


def test_roots_are_fresh_and_distinct(
    storage_root: StorageRoot, request: pytest.FixtureRequest
) -> None:
    loc = storage_root.location()
    assert not loc.exists() or loc.list_children() == []
    assert storage_root.url.startswith(
        {"local": "/", "memory": "memory://", "s3": "s3://", "seaweedfs": "s3://", "gcs": "gs://"}[
            storage_root.backend
        ]
    )
    if storage_root.remote:
        assert storage_root.server is not None
        assert storage_root.server.endpoint_url.startswith("http://127.0.0.1:")
        assert request.node.get_closest_marker("cloud") is not None
    pickle.dumps(storage_root.storage_options)  # must reach a spawned writer process


@pytest.mark.parametrize("direct_io", ["off", "on"])
def test_local_sink_writes_a_new_inode_never_through_a_link(tmp_path: Path, direct_io: str) -> None:
    """A path that is a hard link (an incremental save shares shards between checkpoints)
    or a symlink is replaced, so writing it cannot change the other name's bytes."""
    from ckptsvc.storage.sinks import LocalSink

    shared = tmp_path / "checkpoint-1.safetensors"
    shared.write_bytes(b"old" * 4096)
    linked, symlinked = tmp_path / "checkpoint-2.safetensors", tmp_path / "sym.safetensors"
    os.link(shared, linked)
    symlinked.symlink_to(shared)
    for target in (linked, symlinked):
        sink = LocalSink(Location.parse(str(target)), fsync=True, direct_io=direct_io)
        sink.write(b"new" * 5000)
        sink.close()
        assert target.read_bytes() == b"new" * 5000 and not target.is_symlink()
    assert shared.read_bytes() == b"old" * 4096 and shared.stat().st_nlink == 1
