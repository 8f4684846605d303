"""A fault-injecting HTTP proxy to put in front of a real object store (or emulator).

Point the client's endpoint at the proxy and it forwards every request to the real
server, except that a seeded schedule answers some of them with a fault::

    proxy = FaultProxy("http://127.0.0.1:9000", FaultPlan(seed=7, rate=0.2)).start()
    opts = {"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": proxy.endpoint_url}}
    ...  # run saves and loads through ckptsvc with storage_options=opts
    proxy.stats()  # requests seen and faults injected, by kind
    proxy.stop()

Fault kinds: ``"500"`` (InternalError), ``"503"`` (SlowDown / backendError), ``"403"``
(AccessDenied: permanent), ``"drop"`` (the request is read, then the connection is
reset without an answer), ``"stall"`` (the request is forwarded at once but its answer is held
for ``stall_s``: a slow server; a client with a shorter read timeout gives up although the
server did the work), ``"cut"`` (the server carries the request out, then the connection is reset
halfway through the answer's body, or before an answer without a body). Error bodies follow S3's XML or GCS's JSON (``flavor``).

Threads: one accepts connections, one per client connection relays (HTTP/1.1
keep-alive, ``Content-Length`` and chunked bodies, ``Expect: 100-continue``). Redirect
``Location`` headers that name the upstream are rewritten to the proxy, so GCS resumable
upload sessions stay behind it. Meant for tests on loopback, not for production traffic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import re
import socket
import struct
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlsplit

__all__ = ["FAULT_KINDS", "FaultPlan", "FaultProxy", "FaultStats", "RequestRecord"]

logger = logging.getLogger(__name__)

FAULT_KINDS = ("500", "503", "403", "drop", "stall", "cut")
_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error."),
    "503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "403": (403, "Forbidden", "AccessDenied", "Access Denied"),
}
_MAX_HEAD_BYTES = 64 * 1024
_RELAY_BYTES = 256 * 1024


@dataclass(frozen=True)
class FaultPlan:
    """Which requests get which faults.

    A request is *eligible* when ``match`` (a regex) finds ``"METHOD /path?query"``;
    each eligible request is faulted with probability ``rate``, the kind drawn from
    ``kinds``, from a ``random.Random(seed)`` stream. The same request (method, path,
    query, Range) is faulted at most ``max_per_request`` times, so bounded retries always
    get through (``None``: no limit, e.g. for a permanent 403); ``max_faults`` caps the
    total.
    """

    seed: int = 0
    rate: float = 0.0
    kinds: tuple[str, ...] = ("500", "503", "drop", "stall", "cut")
    match: str = ""
    stall_s: float = 3.0
    max_per_request: int | None = 2
    max_faults: int | None = None
    flavor: str = "s3"  # "s3" (XML errors) or "gcs" (JSON errors)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], not {self.rate}")


@dataclass(frozen=True)
class RequestRecord:
    """One request the proxy saw, and the fault it got (``""``: forwarded untouched).

    ``nbytes`` and ``body_crc32`` describe the request body, ``range`` its Range header:
    together with method, path and query they tell a re-sent request from a new one.
    """

    method: str
    path: str
    query: str
    fault: str
    range: str = ""
    nbytes: int = 0
    body_crc32: int = 0

    @property
    def key(self) -> tuple[str, str, str, str, int, int]:
        """Identity of the request: equal keys mean the same request sent again."""
        return (self.method, self.path, self.query, self.range, self.nbytes, self.body_crc32)


@dataclass(frozen=True)
class FaultStats:
    requests: dict[str, int] = field(default_factory=dict)  # by method
    faults: dict[str, int] = field(default_factory=dict)  # by kind

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return None


class FaultProxy:
    """The proxy (see the module docstring). Call order, all from the test's thread:

    1. ``FaultProxy(upstream_url, plan).start()`` binds a free loopback port;
    2. clients use ``endpoint_url``; ``set_plan`` switches faults on and off meanwhile;
    3. ``records()`` / ``stats()`` report what happened; ``reset_records()`` starts over;
    4. ``pause()`` / ``resume()`` make an outage (connections refused in between);
    5. ``stop()`` closes the listener and every connection.
    """

    def __init__(
        self, upstream_url: str, plan: FaultPlan | None = None, *, host: str = "127.0.0.1"
    ) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, not {upstream_url!r}")
        self.upstream_url = upstream_url.rstrip("/")
        self._upstream = (parts.hostname, parts.port)
        self._host = host
        self._plan = plan or FaultPlan()
        self._rng = random.Random(self._plan.seed)
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._per_request: Counter[tuple[str, str, str, str, int, int]] = Counter()
        self._nfaults = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self.endpoint_url = ""

    # ---- control ---------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, 0))
        listener.listen(128)
        self._listener = listener
        self.endpoint_url = f"http://{self._host}:{listener.getsockname()[1]}"
        threading.Thread(
            target=self._accept_loop, args=(listener,), name="fault-proxy-accept", daemon=True
        ).start()
        return self

    def set_plan(self, plan: FaultPlan) -> None:
        """Use ``plan`` from now on (its seed restarts the random stream)."""
        with self._lock:
            self._plan = plan
            self._rng = random.Random(plan.seed)
            self._per_request.clear()
            self._nfaults = 0

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def reset_records(self) -> None:
        with self._lock:
            self._records.clear()

    def stats(self) -> FaultStats:
        with self._lock:
            requests = Counter(r.method for r in self._records)
            faults = Counter(r.fault for r in self._records if r.fault)
        return FaultStats(dict(requests), dict(faults))

    def pause(self) -> None:
        """An outage: stop listening and reset every open connection, so clients get
        "connection refused" until :meth:`resume` (the port stays reserved for it)."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns = list(self._conns)
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
            listener.close()
        for c in conns:
            _close(c)

    def resume(self) -> None:
        """End an outage started by :meth:`pause`: listen again on the same port."""
        if self._listener is not None or not self.endpoint_url:
            return
        port = urlsplit(self.endpoint_url).port
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, port))
        listener.listen(128)
        with self._lock:
            self._listener = listener
        threading.Thread(
            target=self._accept_loop, args=(listener,), name="fault-proxy-accept", daemon=True
        ).start()

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _close(c)

    def __enter__(self) -> FaultProxy:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- serving ---------------------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(client)
            threading.Thread(
                target=self._serve, args=(client,), name="fault-proxy-conn", daemon=True
            ).start()

    def _decide(self, req: _Request, body: bytes) -> str:
        split = urlsplit(req.target)
        seen = RequestRecord(
            req.method,
            split.path,
            split.query,
            "",
            range=req.header("Range") or "",
            nbytes=len(body),
            body_crc32=zlib.crc32(body),
        )
        with self._lock:
            plan = self._plan
            fault = ""
            if (
                plan.rate > 0
                and (not plan.match or re.search(plan.match, f"{req.method} {req.target}"))
                and (plan.max_faults is None or self._nfaults < plan.max_faults)
                and (
                    plan.max_per_request is None
                    or self._per_request[seen.key] < plan.max_per_request
                )
                and self._rng.random() < plan.rate
            ):
                fault = self._rng.choice(plan.kinds)
                self._per_request[seen.key] += 1
                self._nfaults += 1
            self._records.append(dataclasses.replace(seen, fault=fault))
        if fault:
            logger.info("fault proxy: %s %s -> %s", req.method, req.target, fault)
        return fault

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        up_file: BinaryIO | None = None
        rfile = client.makefile("rb")
        try:
            while not self._stopping.is_set():
                req = _read_head(rfile)
                if req is None:
                    return
                if (req.header("Expect") or "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(rfile, req)
                fault = self._decide(req, body)
                plan = self._plan
                if fault == "drop":
                    _reset(client)
                    return
                if fault in _ERRORS:
                    client.sendall(
                        _error_response(fault, plan.flavor, head_only=req.method == "HEAD")
                    )
                    continue
                if upstream is None or up_file is None:
                    upstream = socket.create_connection(self._upstream, timeout=300)
                    up_file = upstream.makefile("rb")
                    with self._lock:
                        self._conns.add(upstream)
                upstream.sendall(_encode_head(req, drop=("expect",)) + body)
                keep_alive = self._relay(
                    req,
                    up_file,
                    client,
                    cut=fault == "cut",
                    hold_s=plan.stall_s if fault == "stall" else 0.0,
                )
                if not keep_alive:
                    return
        except (OSError, ValueError) as e:
            logger.debug("fault proxy connection ended: %s", e)
        finally:
            rfile.close()
            _close(client)
            if upstream is not None:
                _close(upstream)
            with self._lock:
                self._conns.discard(client)
                if upstream is not None:
                    self._conns.discard(upstream)

    def _relay(
        self, req: _Request, up: BinaryIO, client: socket.socket, *, cut: bool, hold_s: float
    ) -> bool:
        """Forward one response (after ``hold_s``); False when the connection must end."""
        status_line = up.readline(_MAX_HEAD_BYTES)
        if not status_line:
            raise ValueError("upstream closed the connection")
        headers = _read_header_lines(up)
        if hold_s and self._stopping.wait(hold_s):
            raise ValueError("proxy stopping")
        status = int(status_line.split()[1])
        head = [status_line.rstrip(b"\r\n").decode("latin-1")]
        length: int | None = None
        chunked = False
        close = False
        for k, v in headers:
            low = k.lower()
            if low == "location" and v.startswith(self.upstream_url):
                v = self.endpoint_url + v[len(self.upstream_url) :]
            if low == "content-length":
                length = int(v)
            elif low == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
            elif low == "connection" and v.lower() == "close":
                close = True
            head.append(f"{k}: {v}")
        no_body = req.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        if cut and (no_body or length == 0):  # nothing to cut: lose the whole answer
            _reset(client)
            return False
        client.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if no_body:
            return not close
        if chunked:
            data = _read_chunked_raw(up)
            if cut:
                client.sendall(data[: max(1, len(data) // 2)])
                _reset(client)
                return False
            client.sendall(data)
            return not close
        if length is None:  # body until the server closes
            while chunk := up.read(_RELAY_BYTES):
                client.sendall(chunk)
            return False
        limit = length // 2 if cut else length
        left = length
        sent = 0
        while left:
            chunk = up.read(min(left, _RELAY_BYTES))
            if not chunk:
                raise ValueError("upstream ended the body early")
            left -= len(chunk)
            if cut and sent + len(chunk) > limit:
                client.sendall(chunk[: limit - sent])
                _reset(client)
                return False
            client.sendall(chunk)
            sent += len(chunk)
        return not close


# ---- HTTP/1.1 framing --------------------------------------------------------------------
def _read_header_lines(f: BinaryIO) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    total = 0
    while True:
        line = f.readline(_MAX_HEAD_BYTES)
        total += len(line)
        if total > _MAX_HEAD_BYTES:
            raise ValueError("HTTP head too large")
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))


def _read_head(f: BinaryIO) -> _Request | None:
    line = f.readline(_MAX_HEAD_BYTES)
    while line in (b"\r\n", b"\n"):
        line = f.readline(_MAX_HEAD_BYTES)
    if not line:
        return None
    method, target, version = line.decode("latin-1").split()
    return _Request(method, target, version, _read_header_lines(f))


def _read_body(f: BinaryIO, req: _Request) -> bytes:
    if "chunked" in (req.header("Transfer-Encoding") or "").lower():
        return _read_chunked_raw(f)
    n = int(req.header("Content-Length") or 0)
    data = f.read(n) if n else b""
    if len(data) != n:
        raise ValueError("client ended the body early")
    return data


def _read_chunked_raw(f: BinaryIO) -> bytes:
    """A chunked body with its framing, as received (forwarded unchanged)."""
    out = bytearray()
    while True:
        size_line = f.readline(_MAX_HEAD_BYTES)
        if not size_line:
            raise ValueError("chunked body ended early")
        out += size_line
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while True:  # trailers, then the blank line
                trailer = f.readline(_MAX_HEAD_BYTES)
                out += trailer
                if trailer in (b"\r\n", b"\n", b""):
                    return bytes(out)
        out += f.read(size + 2)


def _encode_head(req: _Request, *, drop: tuple[str, ...]) -> bytes:
    lines = [f"{req.method} {req.target} {req.version}"]
    lines += [f"{k}: {v}" for k, v in req.headers if k.lower() not in drop]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error_response(kind: str, flavor: str, *, head_only: bool) -> bytes:
    status, reason, code, message = _ERRORS[kind]
    if flavor == "gcs":
        reason_word = {"500": "backendError", "503": "rateLimitExceeded", "403": "forbidden"}[kind]
        doc = {"error": {"code": status, "message": message, "errors": [{"reason": reason_word}]}}
        body, ctype = json.dumps(doc).encode(), "application/json"
    else:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            "<RequestId>ckptsvc-fault-proxy</RequestId></Error>"
        ).encode()
        ctype = "application/xml"
    if head_only:
        body = b""
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset', not a clean EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
