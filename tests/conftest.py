"""Shared pytest fixtures: real object-store servers and one root URL per test per backend.

How to use them in a test file
------------------------------
Run a test on every backend (local disk, memory://, S3 on moto, GCS emulator, SeaweedFS)::

    from conftest import StorageRoot             # for type hints (tests/ is on sys.path)

    def test_roundtrip(storage_root: StorageRoot) -> None:   # one run per backend
        url = storage_root.join("ckpt")          # URL string under a fresh, empty root
        save_checkpoint(url, model, storage_options=storage_root.storage_options)
        loc = storage_root.location("ckpt")      # the same as a ckptsvc.storage.Location

``storage_root_fast`` is the same on local + memory + S3 (moto) only, for heavier tests;
``s3_root`` is a single S3 (moto) root. Pick other subsets by indirect parametrization::

    @pytest.mark.parametrize("storage_root", ["local", "s3"], indirect=True)
    def test_x(storage_root: StorageRoot) -> None: ...

Each value is a frozen :class:`StorageRoot`: ``.url`` a fresh, empty, unique root (a plain
local path, ``memory://ckptsvc-test-<hex>/<test>``, ``s3://<fresh bucket>/<test>``,
``gs://<fresh bucket>/<test>``), ``.storage_options`` the dict to hand to fsspec /
``Location.parse`` / ckptsvc's public API (plain data, picklable, so a spawned writer
process can rebuild the filesystem), ``.backend`` the param name, ``.bucket`` the bucket
(remote backends), ``.server`` the :class:`servers.Server` (remote backends;
``.server.boto3_client()`` for S3 assertions such as listing multipart uploads),
``.remote``, and ``.multiprocess`` (False for memory://: its files live in one process).

Tests on remote roots carry the ``cloud`` marker (``-m "not cloud"`` runs the rest).
The servers are the session fixtures ``moto_server``, ``seaweedfs_server`` (checks
signatures: wrong keys give 403) and ``gcs_server``, started lazily on free 127.0.0.1
ports and stopped at session end. A server that cannot start skips its tests with the
reason, except under ``CI=true``: then they fail, so CI never passes by skipping.
Buckets are emptied and listing caches of the (shared, instance-cached) fsspec
filesystems invalidated after each test.

One node writer per test, checked for leaks
-------------------------------------------
``node`` gives a test a node id of its own (``CKPTSVC_NODE_ID``, so its own node writer
and its own shared-memory arenas; the writer lingers 1 s and can open ``faulty://``).
``checkpointer`` is a factory on top of it: it makes ``AsyncCheckpointer`` instances on
that node and closes those still open at teardown::

    def test_x(checkpointer: Callable[..., AsyncCheckpointer], tmp_path: Path) -> None:
        ckpt = checkpointer(tmp_path, max_shard_size=4096)   # AsyncCheckpointer's arguments

    pytestmark = pytest.mark.usefixtures("node")   # or a whole module, with its own objects

At teardown :func:`node_leaks` must find nothing, or the test fails: no shared-memory
segment ``/dev/shm/ckptsvc-<node>-*`` left (they are removed), no ``ckptsvc*`` thread
started by the test still alive, no in-progress claim the test took still held, and the
node's writer idle (no trainer connection, no job): it is then stopped with SIGTERM and
must exit, instead of waiting out its death grace and linger (~4 s a test); one still
serving a connection is killed and reported. Tests that start their own writer processes
or ranks use other node ids and check what they need.
"""

from __future__ import annotations

import contextlib
import gc
import os

# gcsfs reads this at import time; its default probes bucket types over gRPC with a 60 s
# timeout per bucket, which an emulator never answers. Set before anything imports gcsfs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec import AbstractFileSystem
from hypothesis import settings
from servers import (  # tests/ is on sys.path (rootdir conftest, no __init__.py)
    Server,
    ServerStartError,
    start_gcs,
    start_moto,
    start_seaweedfs,
)

from ckptsvc import AsyncCheckpointer
from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.storage import Location
from ckptsvc.workers import claim as claims_keeper
from ckptsvc.workers.claim import claim_checkpoint
from ckptsvc.workers.client import writer_socket_path

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")

ALL_BACKENDS = ("local", "memory", "s3", "gcs", "seaweedfs")
FAST_BACKENDS = ("local", "memory", "s3")
REMOTE_BACKENDS = frozenset({"s3", "gcs", "seaweedfs"})
SLOW_BACKENDS = frozenset({"gcs", "seaweedfs"})  # see pytest_collection_modifyitems


@dataclass(frozen=True)
class StorageRoot:
    """A fresh, empty root for one test on one backend (see the module docstring)."""

    backend: str
    url: str
    storage_options: dict[str, Any]
    bucket: str | None = None
    server: Server | None = field(default=None, repr=False, compare=False)

    @property
    def remote(self) -> bool:
        return self.backend in REMOTE_BACKENDS

    @property
    def multiprocess(self) -> bool:
        """False when other processes cannot see the files (memory://)."""
        return self.backend != "memory"

    def join(self, *parts: str) -> str:
        """The URL (or local path) of ``parts`` under the root."""
        return "/".join([self.url.rstrip("/"), *parts])

    def location(self, *parts: str) -> Location:
        loc = Location.parse(self.url, self.storage_options)
        return loc.join(*parts) if parts else loc

    def fs(self) -> AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs


def _params(backends: tuple[str, ...]) -> list[Any]:
    return [
        pytest.param(b, id=b, marks=[pytest.mark.cloud] if b in REMOTE_BACKENDS else [])
        for b in backends
    ]


def _start_or_skip(name: str, start: Callable[[], Server]) -> Server:
    try:
        return start()
    except (ServerStartError, OSError) as e:
        if IN_CI:
            pytest.fail(f"{name} could not start and CI=true forbids skipping: {e}", pytrace=False)
        pytest.skip(f"{name} could not start: {e}")


def unfinished_save(loc: Location) -> None:
    """Make ``loc`` hold a save that started and never committed: its claim (in-progress
    marker, naming this process) and no manifest (a committed one there is retired)."""
    loc.join(MANIFEST_NAME).remove(missing_ok=True)
    claim_checkpoint(loc).release()


SHM = "/dev/shm"
_LEAK_GRACE_S = 10.0  # how long teardown waits for threads and writers to finish


def shm_segments(node: str) -> list[str]:
    """The shared-memory segments of ``node`` in /dev/shm."""
    if not os.path.isdir(SHM):
        return []
    return sorted(n for n in os.listdir(SHM) if n.startswith(f"ckptsvc-{node}-"))


def node_writer_pids(node: str) -> list[int]:
    """Running node-writer processes of this user serving ``node`` (zombies excluded)."""
    pids = []
    want = [b"--node-id", node.encode()]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        i = next((k for k in range(len(args) - 1) if args[k : k + 2] == want), None)
        if i is not None and any(b"node_writer" in a for a in args[:i]):
            pids.append(int(entry))
    return pids


def _ckptsvc_threads() -> set[threading.Thread]:
    """Live ``ckptsvc*`` threads, but the process's claims keeper (one, started on first
    use, never stops; the claims it holds are checked instead)."""
    return {
        t
        for t in threading.enumerate()
        if t.name.startswith("ckptsvc") and t.name != "ckptsvc-claims" and t.is_alive()
    }


def _held_claims() -> set[str]:
    """URLs whose in-progress claim this process holds (and keeps refreshing)."""
    keeper = claims_keeper._KEEPER
    with keeper._lock:
        return set(keeper._held)


@dataclass
class LeakBaseline:
    """What existed before the test: threads and claims that are not its leaks."""

    threads: set[threading.Thread] = field(default_factory=_ckptsvc_threads)
    claims: set[str] = field(default_factory=_held_claims)


def _connected_unix_sockets(pid: int) -> int:
    """How many connected, named Unix sockets ``pid`` holds: a node writer holds one per
    trainer connection (closed once the trainer is gone and its jobs ended)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    inodes = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    # an accepted connection carries the listener's path; socketpairs (asyncio) have none
    return sum(1 for row in rows if len(row) >= 8 and row[6] in inodes and row[5] == "03")


def node_leaks(node: str, before: LeakBaseline, *, grace_s: float = _LEAK_GRACE_S) -> list[str]:
    """What a test on ``node`` left behind once its checkpointers are closed, one line per
    leak (empty: nothing). Leaked segments are removed and leaked writers killed, so one
    leaking test does not fail the next.

    A closed trainer's writer is idle (no connection, no job) but would live on for the
    writer's death grace (3 s: is the trainer dying?) plus its linger; rather than wait,
    an idle writer is stopped with SIGTERM and must exit. A writer that still serves a
    connection after ``grace_s`` is a leak."""
    leaks = []
    left = shm_segments(node)  # the trainer unlinks its arenas in close(): no waiting
    for name in left:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM, name))
    if left:
        leaks.append(f"shared memory of node {node} left in {SHM}: {left}")
    claims = _held_claims() - before.claims
    if claims:
        leaks.append(f"in-progress claims still held: {sorted(claims)}")
    deadline = time.monotonic() + grace_s
    while True:  # threads that are ending and writers still closing a connection
        threads = sorted(t.name for t in _ckptsvc_threads() - before.threads)
        busy = [pid for pid in node_writer_pids(node) if _connected_unix_sockets(pid)]
        if (not threads and not busy) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if threads:
        leaks.append(f"ckptsvc threads still running: {threads}")
    for pid in node_writer_pids(node):
        if pid not in busy:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    while (writers := node_writer_pids(node)) and time.monotonic() < deadline + 1.0:
        time.sleep(0.02)
    if writers:
        for pid in writers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        leaks.append(f"node writers of node {node} still serving a connection: pids {writers}")
    return leaks


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A node id of this test alone (own node writer, own arenas); fails the test on a
    leak (see the module docstring and :func:`node_leaks`)."""
    name = f"n{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("CKPTSVC_NODE_ID", name)
    monkeypatch.setenv("CKPTSVC_WRITER_LINGER_S", "1")
    monkeypatch.setenv("CKPTSVC_WRITER_PRELOAD", "faulty_fs")
    before = LeakBaseline()
    yield name
    leaks = node_leaks(name, before)
    _remove_dead_socket(name)  # after the writer is gone: a probe would be a connection
    if leaks:
        pytest.fail("the test leaked:\n  " + "\n  ".join(leaks), pytrace=False)


def _remove_dead_socket(node: str) -> None:
    """A writer killed with SIGKILL leaves its socket file (the next start would remove it)."""
    path = writer_socket_path(node)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


@pytest.fixture
def checkpointer(node: str) -> Iterator[Callable[..., AsyncCheckpointer]]:
    """``checkpointer(root, **kwargs)``: an ``AsyncCheckpointer`` on the test's ``node``;
    the ones still open are closed at teardown, before ``node`` checks for leaks."""
    made: list[AsyncCheckpointer] = []

    def make(*args: Any, **kwargs: Any) -> AsyncCheckpointer:
        ckpt = AsyncCheckpointer(*args, **kwargs)
        made.append(ckpt)
        return ckpt

    yield make
    for ckpt in made:
        ckpt.close()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """moto's S3 server process on a free loopback port (any credentials are accepted)."""
    server = _start_or_skip("moto_server", lambda: start_moto(tmp_path_factory.mktemp("moto")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """SeaweedFS ``weed mini`` S3 gateway; checks signatures (see tests.servers S3_* keys)."""
    server = _start_or_skip(
        "seaweedfs", lambda: start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A GCS JSON-API emulator (fake-gcs-server, else gcp-storage-emulator)."""
    server = _start_or_skip("GCS emulator", lambda: start_gcs(tmp_path_factory.mktemp("gcs")))
    yield server
    server.stop()


def _slug(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40] or "t"


def _new_bucket(server: Server) -> str:
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    server.create_bucket(bucket)
    return bucket


def _empty_s3_bucket(server: Server, bucket: str) -> None:
    """Best effort: drop objects and unfinished uploads so a long session stays small."""
    with contextlib.suppress(Exception):
        client = server.boto3_client()
        for up in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=bucket)


def _make_root(request: pytest.FixtureRequest, backend: str) -> Iterator[StorageRoot]:
    slug = _slug(request)
    if backend == "local":
        tmp: Path = request.getfixturevalue("tmp_path")
        yield StorageRoot("local", str(tmp / "root"), {})
        return
    if backend == "memory":
        root = StorageRoot("memory", f"memory://ckptsvc-test-{uuid.uuid4().hex[:12]}/{slug}", {})
        yield root
        fs = root.fs()
        with contextlib.suppress(FileNotFoundError):
            fs.rm(root.url.removeprefix("memory://").split("/", 1)[0], recursive=True)
        return
    fixture = {"s3": "moto_server", "seaweedfs": "seaweedfs_server", "gcs": "gcs_server"}[backend]
    server: Server = request.getfixturevalue(fixture)
    if not server.alive():
        pytest.fail(f"{server.name} died earlier in this session; log tail:\n{server.log_tail()}")
    bucket = _new_bucket(server)
    scheme = "gs" if server.kind == "gcs" else "s3"
    root = StorageRoot(
        backend, f"{scheme}://{bucket}/{slug}", server.storage_options(), bucket, server
    )
    yield root
    fs = root.fs()
    fs.invalidate_cache()  # cached instances outlive the test; their listings must not
    if server.kind == "s3":
        _empty_s3_bucket(server, bucket)
    else:
        with contextlib.suppress(Exception):  # best effort, as for S3
            fs.rm(bucket, recursive=True)


@pytest.fixture(params=_params(ALL_BACKENDS))
def storage_root(request: pytest.FixtureRequest) -> Iterator[StorageRoot]:
    """A fresh root on every backend: local, memory, s3 (moto), gcs, seaweedfs."""
    yield from _make_root(request, request.param)


@pytest.fixture(params=_params(FAST_BACKENDS))
def storage_root_fast(request: pytest.FixtureRequest) -> Iterator[StorageRoot]:
    """A fresh root on local disk, memory:// and S3 (moto) only."""
    yield from _make_root(request, request.param)


@pytest.fixture
def s3_root(request: pytest.FixtureRequest) -> Iterator[StorageRoot]:
    """A fresh root in a fresh bucket on moto's S3 (no parametrization)."""
    yield from _make_root(request, "s3")


# Property tests without their own max_examples run the profile's: 200 examples in the full
# suite, 25 in the fast lane (-m "not slow"); HYPOTHESIS_PROFILE=full|fast picks one.
settings.register_profile("full", max_examples=200, deadline=None)
settings.register_profile("fast", max_examples=25, deadline=None)


def pytest_configure(config: pytest.Config) -> None:
    fast = "not slow" in (config.option.markexpr or "")
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("fast" if fast else "full"))
    if not os.environ.get("CKPTSVC_NODE_CACHE_DIR"):  # multi-rank S3 loads: not /dev/shm
        os.environ["CKPTSVC_NODE_CACHE_DIR"] = _NODE_CACHE_DIR


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_NODE_CACHE_DIR, ignore_errors=True)


# the node cache (read/node_cache.py) of this test session and its subprocesses
_NODE_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"ckptsvc-test-node-cache-{os.getpid()}")


def _root_backend(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)  # (indirect) parametrization of a root
    if callspec is None:
        return None
    for name in ("storage_root", "storage_root_fast"):
        if name in callspec.params:
            return str(callspec.params[name])
    return None


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests that use a server (fixture or remote root) ``cloud``; skip ``gpu`` without
    CUDA. The GCS and SeaweedFS variants of a test that also runs on local, memory or S3
    (moto) are ``slow``: the fast lane (``-m "not slow"``) runs each such test on the cheap
    backends; tests of only GCS or SeaweedFS stay in it."""
    servers = {"moto_server", "seaweedfs_server", "gcs_server", "s3_root"}
    cheap = {
        (str(item.path), getattr(item, "originalname", ""))
        for item in items
        if _root_backend(item) in FAST_BACKENDS
    }
    gpu_items = []
    for item in items:
        backend = _root_backend(item)
        if (
            backend in SLOW_BACKENDS
            and (str(item.path), getattr(item, "originalname", "")) in cheap
        ):
            item.add_marker(pytest.mark.slow)
        if servers & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cloud)
        callspec = getattr(item, "callspec", None)  # indirect parametrization of a root
        if callspec is not None and any(
            callspec.params.get(name) in REMOTE_BACKENDS
            for name in ("storage_root", "storage_root_fast")
        ):
            item.add_marker(pytest.mark.cloud)
        if item.get_closest_marker("gpu") is not None:
            gpu_items.append(item)
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(
                reason="needs a CUDA device (torch.cuda.is_available() is False)"
            )
            for item in gpu_items:
                item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection built (torch, transformers, test modules: ~10^6 objects)
    into the garbage collector's permanent generation: its full collections, automatic
    or a test's ``gc.collect()``, then only scan what the tests made (~0.3 s saved each)."""
    gc.collect()
    gc.freeze()
