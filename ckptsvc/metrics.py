"""Per-save events: a callback API, a structured log line, and a Prometheus exporter.

Every finished asynchronous save (durable or failed) becomes one frozen :class:`SaveEvent`.
The engine calls ``emit(event_from_handle(handle))`` once the handle is complete (client
reader or commit thread); :func:`emit`:

1. logs one line on the ``ckptsvc.metrics`` logger (INFO when durable, WARNING when
   failed) with the event as a dict in ``record.ckptsvc_save`` (``extra=``), so JSON log
   formatters get every field;
2. calls every listener registered with :func:`add_listener`, in registration order, on
   the emitting thread. A listener that raises is logged and skipped: metrics never fail
   a save or block its handle. Listeners must be quick (hand work to a queue otherwise).

:class:`PrometheusExporter` (optional extra ``ckptsvc[prometheus]``) is such a listener:
counters and histograms in a registry, served by :meth:`PrometheusExporter.start_http_server`.

This module imports neither torch nor prometheus_client at import time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from ckptsvc.errors import LifecycleError

__all__ = [
    "Listener",
    "PrometheusExporter",
    "SaveEvent",
    "add_listener",
    "emit",
    "event_from_handle",
]

logger = logging.getLogger(__name__)

Listener = Callable[["SaveEvent"], None]


@dataclass(frozen=True)
class SaveEvent:
    """One finished save. Times in seconds; writer-side times are ``None`` when the save
    failed before the writer reported them.

    ``blocking_s``: the training thread's cost (``save`` call); ``arena_wait_s`` part of it
    waiting for a free staging arena (back-pressure); ``queue_wait_s``: job received by the
    writer until its first shard started; ``write_s``: streaming until every shard was
    durable; ``commit_s``: the manifest; ``durable_s``: ``save`` called until committed.
    ``retries``: storage requests retried. ``error_type``/``error``: why it failed.
    Issue 9's figures: ``nbytes_written`` / ``nbytes_reused`` (incremental saves: bytes
    written vs. linked or copied server-side), ``snapshot_s`` / ``fence_wait_s``
    (overlapped saves), ``pieces`` (a state larger than the memory budget, streamed).
    """

    step: int
    path: str
    ok: bool
    nbytes: int
    blocking_s: float
    arena_wait_s: float = 0.0
    copy_s: float = 0.0
    queue_wait_s: float | None = None
    write_s: float | None = None
    commit_s: float | None = None
    durable_s: float | None = None
    retries: int = 0
    error_type: str | None = None
    error: str | None = None
    timestamp_s: float = 0.0
    nbytes_written: int | None = None
    nbytes_reused: int | None = None
    snapshot_s: float | None = None
    fence_wait_s: float = 0.0
    pieces: int = 0

    @property
    def blocking_ms(self) -> float:
        return self.blocking_s * 1000.0

    @property
    def write_bytes_per_s(self) -> float | None:
        """Streaming throughput: bytes over ``write_s`` (``None`` without a write time)."""
        if not self.ok or not self.write_s or self.write_s <= 0:
            return None
        return self.nbytes / self.write_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocking_ms"] = round(self.blocking_ms, 3)
        d["write_bytes_per_s"] = self.write_bytes_per_s
        return d


class _Timings(Protocol):
    """What :func:`event_from_handle` reads of ``SaveTimings`` (read-only)."""

    @property
    def nbytes(self) -> int: ...
    @property
    def blocking_s(self) -> float: ...
    @property
    def arena_wait_s(self) -> float: ...
    @property
    def copy_s(self) -> float: ...
    @property
    def queue_wait_s(self) -> float | None: ...
    @property
    def write_s(self) -> float | None: ...
    @property
    def commit_s(self) -> float | None: ...
    @property
    def durable_s(self) -> float | None: ...


class _Handle(Protocol):
    """What :func:`event_from_handle` reads of a ``SaveHandle``."""

    step: int
    path: str

    @property
    def timings(self) -> _Timings: ...
    @property
    def failure(self) -> BaseException | None: ...
    def done(self) -> bool: ...


def event_from_handle(handle: _Handle) -> SaveEvent:
    """The event of a *completed* ``SaveHandle`` (``ValueError`` if it is still in flight).

    ``retries`` comes from ``timings.retries`` when the engine records it, else 0.
    """
    if not handle.done():
        raise LifecycleError(
            f"save of step {handle.step} to {handle.path} is still in flight: wait for it first"
        )
    t = handle.timings
    error = handle.failure  # never marks the failure observed: wait_all must still raise it
    return SaveEvent(
        step=handle.step,
        path=handle.path,
        ok=error is None,
        nbytes=t.nbytes,
        blocking_s=t.blocking_s,
        arena_wait_s=t.arena_wait_s,
        copy_s=t.copy_s,
        queue_wait_s=t.queue_wait_s,
        write_s=t.write_s,
        commit_s=t.commit_s,
        durable_s=t.durable_s,
        retries=int(getattr(t, "retries", 0) or 0),  # recorded by engines that count them
        error_type=None if error is None else type(error).__name__,
        error=None if error is None else str(error),
        timestamp_s=time.time(),
        nbytes_written=getattr(t, "nbytes_written", None),
        nbytes_reused=getattr(t, "nbytes_reused", None),
        snapshot_s=getattr(t, "snapshot_s", None),
        fence_wait_s=float(getattr(t, "fence_wait_s", 0.0) or 0.0),
        pieces=int(getattr(t, "pieces", 0) or 0),
    )


# ---- listeners ---------------------------------------------------------------------------------

_listeners: list[Listener] = []
_lock = threading.Lock()


class ListenerHandle:
    """Returned by :func:`add_listener`; ``remove()`` (or calling it) unregisters."""

    def __init__(self, fn: Listener) -> None:
        self._fn = fn

    def remove(self) -> None:
        with _lock:
            if self._fn in _listeners:
                _listeners.remove(self._fn)

    def __call__(self) -> None:
        self.remove()


def add_listener(fn: Listener) -> ListenerHandle:
    """Call ``fn(event)`` for every finished save of this process, until removed."""
    if not callable(fn):
        raise TypeError(f"listener must be callable, not {type(fn).__name__}")
    with _lock:
        _listeners.append(fn)
    return ListenerHandle(fn)


def emit(event: SaveEvent) -> None:
    """Log ``event`` and hand it to every listener (see the module docstring)."""
    if event.ok:
        logger.info(
            "save step=%s ok nbytes=%d blocking_ms=%.1f queue_wait_s=%s write_s=%s "
            "durable_s=%s retries=%d path=%s",
            event.step,
            event.nbytes,
            event.blocking_ms,
            _fmt(event.queue_wait_s),
            _fmt(event.write_s),
            _fmt(event.durable_s),
            event.retries,
            event.path,
            extra={"ckptsvc_save": event.to_dict()},
        )
    else:
        logger.warning(
            "save step=%s FAILED nbytes=%d blocking_ms=%.1f retries=%d path=%s error=%s: %s",
            event.step,
            event.nbytes,
            event.blocking_ms,
            event.retries,
            event.path,
            event.error_type,
            event.error,
            extra={"ckptsvc_save": event.to_dict()},
        )
    with _lock:
        listeners = list(_listeners)
    for fn in listeners:
        try:
            fn(event)
        except Exception:
            logger.exception("metrics listener %r failed on the event of step %s", fn, event.step)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ---- Prometheus --------------------------------------------------------------------------------

#: histogram buckets (seconds): 1 ms .. 30 min
_TIME_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
#: throughput buckets (bytes per second): 1 MB/s .. 20 GB/s
_RATE_BUCKETS = (1e6, 1e7, 5e7, 1e8, 2.5e8, 5e8, 1e9, 2e9, 5e9, 1e10, 2e10)


class PrometheusExporter:
    """Prometheus counters and histograms of saves (needs ``pip install 'ckptsvc[prometheus]'``).

    Call order (any thread, once each):

    1. ``PrometheusExporter(registry=None, namespace="ckptsvc")`` creates the metrics in
       ``registry`` (default: a private ``CollectorRegistry``; pass
       ``prometheus_client.REGISTRY`` to join the process-wide one);
    2. :meth:`attach` registers it as a listener (the emitting thread updates the metrics);
    3. :meth:`start_http_server` serves ``/metrics`` (a daemon thread of prometheus_client);
    4. :meth:`close` detaches and stops the server.

    Metrics (``<namespace>_`` prefix): ``saves_total{outcome}``, ``saved_bytes_total``,
    ``save_retries_total``, ``save_failures_total{error_type}``, histograms
    ``save_blocking_seconds``, ``save_queue_wait_seconds``, ``save_write_seconds``,
    ``save_durable_seconds``, ``save_write_throughput_bytes_per_second``, and gauges
    ``last_durable_step``, ``last_durable_timestamp_seconds``.
    """

    def __init__(self, *, registry: Any = None, namespace: str = "ckptsvc") -> None:
        try:
            import prometheus_client as prom
        except ImportError as e:
            raise ImportError(
                "PrometheusExporter needs prometheus_client: pip install 'ckptsvc[prometheus]'"
            ) from e
        self.registry = prom.CollectorRegistry() if registry is None else registry
        kw: dict[str, Any] = {"namespace": namespace, "registry": self.registry}
        self.saves = prom.Counter("saves", "Finished saves by outcome", ["outcome"], **kw)
        self.saved_bytes = prom.Counter("saved_bytes", "Tensor bytes of durable saves", **kw)
        self.retries = prom.Counter("save_retries", "Storage requests retried by saves", **kw)
        self.failures = prom.Counter(
            "save_failures", "Failed saves by error type", ["error_type"], **kw
        )

        def hist(name: str, doc: str, buckets: tuple[float, ...] = _TIME_BUCKETS_S) -> Any:
            return prom.Histogram(name, doc, buckets=buckets, **kw)

        self.blocking = hist("save_blocking_seconds", "Training-thread time of save()")
        self.queue_wait = hist("save_queue_wait_seconds", "Writer queue wait before streaming")
        self.write = hist("save_write_seconds", "Streaming until every shard was durable")
        self.durable = hist("save_durable_seconds", "save() called until committed")
        self.throughput = hist(
            "save_write_throughput_bytes_per_second", "Bytes over write time", _RATE_BUCKETS
        )
        self.last_step = prom.Gauge("last_durable_step", "Step of the newest durable save", **kw)
        self.last_time = prom.Gauge(
            "last_durable_timestamp_seconds", "Unix time of the newest durable save", **kw
        )
        self._remove: ListenerHandle | None = None
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    def observe(self, event: SaveEvent) -> None:
        """Update the metrics with one event (the listener)."""
        self.saves.labels(outcome="durable" if event.ok else "failed").inc()
        self.retries.inc(event.retries)
        self.blocking.observe(event.blocking_s)
        if event.queue_wait_s is not None:
            self.queue_wait.observe(event.queue_wait_s)
        if not event.ok:
            self.failures.labels(error_type=event.error_type or "unknown").inc()
            return
        self.saved_bytes.inc(event.nbytes)
        if event.write_s is not None:
            self.write.observe(event.write_s)
        if event.durable_s is not None:
            self.durable.observe(event.durable_s)
        rate = event.write_bytes_per_s
        if rate is not None:
            self.throughput.observe(rate)
        self.last_step.set(event.step)
        self.last_time.set(event.timestamp_s or time.time())

    def attach(self) -> PrometheusExporter:
        """Start observing every emitted event (idempotent); returns ``self``."""
        if self._remove is None:
            self._remove = add_listener(self.observe)
        return self

    def start_http_server(self, port: int = 0, *, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` (0: a free port); return the port."""
        import prometheus_client as prom

        if self._server is not None:
            raise LifecycleError(
                f"the metrics server is already running ({self._server.server_address})"
            )
        self._server, self._server_thread = prom.start_http_server(
            port, addr=addr, registry=self.registry
        )
        bound: int = self._server.server_address[1]
        logger.info("serving ckptsvc metrics on http://%s:%d/metrics", addr, bound)
        return bound

    def close(self) -> None:
        """Detach from the events and stop the HTTP server (if started)."""
        if self._remove is not None:
            self._remove.remove()
            self._remove = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(timeout=5)
            self._server = self._server_thread = None

    def __enter__(self) -> PrometheusExporter:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.close()
