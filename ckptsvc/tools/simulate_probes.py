"""The instruments of ``ckptsvc simulate`` (:mod:`ckptsvc.tools.simulate`): a counting
``Store``, a log of the S3 client's requests, and a ``moto_server`` to run against."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import torch.distributed as dist

from ckptsvc import hooks
from ckptsvc.storage import Location

__all__ = [
    "BUCKET",
    "CountingStore",
    "PhaseLog",
    "Request",
    "RequestLog",
    "create_bucket",
    "moto_server",
]

BUCKET = "ckptsvc-simulate"


class PhaseLog:
    """Rank 0's commit phases (the ``commit.phase`` hook point): wall and CPU time of its
    commit thread per phase, by step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        remove = hooks.install(
            "commit.phase", lambda **row: self.rows.append({**row, "at": time.monotonic()})
        )
        try:
            yield
        finally:
            remove()

    def wall_s(self, step: int, *phases: str) -> float:
        """Wall time of ``phases`` of the commit of ``step``."""
        return sum(r["wall_s"] for r in self.rows if r["step"] == step and r["phase"] in phases)

    def at(self, step: int, phase: str) -> float:
        """When (``time.monotonic``) rank 0 ended ``phase`` of the commit of ``step``."""
        return next(r["at"] for r in self.rows if r["step"] == step and r["phase"] == phase)

    def cpu_s(self, step: int) -> float:
        """CPU time of rank 0's commit thread from its wake to its outcome (``step``)."""
        return sum(r["cpu_s"] for r in self.rows if r["step"] == step and r["phase"] != "wake")


class CountingStore(dist.Store):
    """A ``Store`` that forwards to ``inner`` and counts every operation (one round trip
    each). :meth:`clone` opens a new connection of ``inner`` counted in the same ``ops``
    (called from Python, as :class:`~ckptsvc.commit.channels.StorePool` does; torch's C++
    side cannot call a Python ``clone``)."""

    def __init__(self, inner: Any, ops: Counter[str] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.ops: Counter[str] = Counter() if ops is None else ops

    def clone(self) -> CountingStore:
        self._n("connect")
        return CountingStore(self.inner.clone(), self.ops)

    def _n(self, op: str) -> None:
        self.ops[op] += 1

    def set(self, key: str, value: Any) -> None:
        self._n("set")
        self.inner.set(key, value)

    def get(self, key: str) -> bytes:
        self._n("get")
        return bytes(self.inner.get(key))

    def add(self, key: str, value: int) -> int:
        self._n("add")
        return int(self.inner.add(key, value))

    def check(self, keys: list[str]) -> bool:
        self._n("check")
        return bool(self.inner.check(keys))

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._n("wait")
        if timeout is None:
            self.inner.wait(keys)
        else:
            self.inner.wait(keys, timeout)

    def delete_key(self, key: str) -> bool:
        self._n("delete_key")
        return bool(self.inner.delete_key(key))

    def multi_get(self, keys: list[str]) -> list[bytes]:
        self._n("multi_get")
        return [bytes(v) for v in self.inner.multi_get(keys)]

    def multi_set(self, keys: list[str], values: list[Any]) -> None:
        self._n("multi_set")
        self.inner.multi_set(keys, values)

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        self._n("compare_set")
        return bytes(self.inner.compare_set(key, expected, desired))

    def num_keys(self) -> int:
        return int(self.inner.num_keys())

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)

    @property
    def timeout(self) -> timedelta:
        value: timedelta = self.inner.timeout
        return value


@dataclass(frozen=True)
class Request:
    """One HTTP request the S3 client sent (retries included)."""

    method: str
    path: str
    query: str
    range: str = ""  # the Range header ("bytes=0-65535"), "" for a whole object


class RequestLog:
    """Every request of this process's S3 client for ``opts`` that got an HTTP answer (a
    botocore ``needs-retry`` handler, which sees each attempt, on the one cached s3fs
    instance every ``Location`` of those options uses): retries after an error answer
    count, attempts that never reached the server (connect timeouts) do not."""

    def __init__(self, root: str, opts: dict[str, Any]) -> None:
        self._lock = threading.Lock()
        self._records: list[Request] = []
        fs = Location.parse(root, opts).fs
        fs.connect()
        fs.s3.meta.events.register("needs-retry.s3", self._seen)

    def _seen(self, response: Any = None, request_dict: Any = None, **_: Any) -> None:
        if response is None or request_dict is None:
            return None
        parts = urlsplit(str(request_dict.get("url", "")))
        with self._lock:
            headers = request_dict.get("headers") or {}
            self._records.append(
                Request(
                    str(request_dict.get("method", "")),
                    parts.path,
                    parts.query,
                    str(headers.get("Range", "")),
                )
            )
        return None  # no opinion on retrying

    def records(self) -> list[Request]:
        with self._lock:
            return list(self._records)

    def reset_records(self) -> None:
        with self._lock:
            self._records.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server(endpoint: str | None, workdir: str) -> Iterator[str]:
    """``endpoint``, or the URL of a fresh ``moto_server`` (stopped on exit)."""
    if endpoint:
        yield endpoint
        return
    port = _free_port()
    with open(os.path.join(workdir, "moto.log"), "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start (log in {workdir}/moto.log)")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def create_bucket(endpoint: str) -> None:
    """The simulation's bucket on ``endpoint`` (moto's test credentials)."""
    import boto3  # moto's own dependency: there wherever moto_server is

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=BUCKET)
