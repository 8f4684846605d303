"""``ckptsvc.metrics``: events from real save handles, listeners, the structured log line,
and the Prometheus exporter scraped over loopback HTTP."""

from __future__ import annotations

import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from ckptsvc import metrics
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.errors import LifecycleError, SaveFailedError
from ckptsvc.metrics import PrometheusExporter, SaveEvent, add_listener, emit, event_from_handle


def _event(step: int, *, ok: bool = True, nbytes: int = 1000, write_s: float = 0.5) -> SaveEvent:
    return SaveEvent(
        step=step,
        path=f"/run/checkpoints/checkpoint-{step}",
        ok=ok,
        nbytes=nbytes,
        blocking_s=0.002,
        queue_wait_s=0.01,
        write_s=write_s if ok else None,
        durable_s=0.7 if ok else None,
        retries=2,
        error_type=None if ok else "SaveFailedError",
        error=None if ok else "disk on fire",
        timestamp_s=1_700_000_000.0,
    )


def test_events_from_real_handles(tmp_path: Path) -> None:
    bad_root = tmp_path / "bad"
    blocker = bad_root / "checkpoints" / "checkpoint-4" / "w_state.safetensors"
    blocker.mkdir(parents=True)  # a directory where the writer must write the shard
    state = {"w": torch.arange(4096, dtype=torch.float32), "step": 3}
    with AsyncCheckpointer(tmp_path / "run") as ckpt:
        good = ckpt.save(3, state)
        good.wait(60)
        event = event_from_handle(good)
    assert event.ok and event.step == 3 and event.path == good.path
    assert event.nbytes == good.timings.nbytes == 4096 * 4
    assert event.blocking_s == good.timings.blocking_s > 0
    assert event.durable_s is not None and event.write_s is not None
    assert event.write_bytes_per_s is not None and event.write_bytes_per_s > 0
    assert event.error is None and event.to_dict()["blocking_ms"] == pytest.approx(
        event.blocking_s * 1000, abs=1e-3
    )
    assert event.nbytes_written == good.timings.nbytes_written
    assert event.nbytes_written is not None and event.nbytes_written > 4096 * 4  # + header
    assert event.nbytes_reused == 0 and event.pieces == 0 and event.snapshot_s is None

    with AsyncCheckpointer(bad_root) as bad_ckpt:
        bad = bad_ckpt.save(4, state)
        assert isinstance(bad.exception(60), SaveFailedError)
        failed = event_from_handle(bad)
    assert not failed.ok and failed.error_type == "SaveFailedError"
    assert failed.error and "w_state.safetensors" in failed.error
    assert failed.write_bytes_per_s is None


def test_event_from_handle_refuses_a_save_in_flight() -> None:
    from ckptsvc.engine.async_checkpointer import SaveHandle, SaveTimings

    pending = SaveHandle(step=1, path="/x", timings=SaveTimings(1, 0.0, 0.0, 0.0), started=0.0)
    with pytest.raises(LifecycleError, match="still in flight"):
        event_from_handle(pending)


def test_listeners_log_line_and_isolation(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, int]] = []

    def broken(event: SaveEvent) -> None:
        raise RuntimeError("listener bug")

    handles = [
        add_listener(lambda e: seen.append(("first", e.step))),
        add_listener(broken),
        add_listener(lambda e: seen.append(("third", e.step))),
    ]
    try:
        with caplog.at_level(logging.INFO, logger="ckptsvc.metrics"):
            emit(_event(7))
            emit(_event(8, ok=False))
    finally:
        for h in handles:
            h.remove()
    assert seen == [("first", 7), ("third", 7), ("first", 8), ("third", 8)]
    lines = [r for r in caplog.records if hasattr(r, "ckptsvc_save")]
    assert [r.levelno for r in lines] == [logging.INFO, logging.WARNING]
    first = getattr(lines[0], "ckptsvc_save")  # noqa: B009 - set through logging's extra=
    assert first["step"] == 7 and first["retries"] == 2
    assert "blocking_ms=2.0" in lines[0].getMessage()
    assert "FAILED" in lines[1].getMessage() and "disk on fire" in lines[1].getMessage()
    assert any("listener" in r.getMessage() and r.exc_info for r in caplog.records)

    emit(_event(9))  # removed: nobody hears it
    assert seen[-1] == ("third", 8)
    with pytest.raises(TypeError):
        add_listener("not callable")  # type: ignore[arg-type]


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" in s.labels:
                continue
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_prometheus_exporter_over_http() -> None:
    pytest.importorskip("prometheus_client")
    exporter = PrometheusExporter().attach()
    try:
        port = exporter.start_http_server(0)
        emit(_event(10, nbytes=4000, write_s=0.5))
        emit(_event(20, nbytes=6000, write_s=0.25))
        emit(_event(21, ok=False))
        got = _scrape(port)
    finally:
        exporter.close()
    assert got["ckptsvc_saves_total{outcome=durable}"] == 2
    assert got["ckptsvc_saves_total{outcome=failed}"] == 1
    assert got["ckptsvc_saved_bytes_total"] == 10_000
    assert got["ckptsvc_save_retries_total"] == 6
    assert got["ckptsvc_save_failures_total{error_type=SaveFailedError}"] == 1
    assert got["ckptsvc_save_blocking_seconds_count"] == 3
    assert got["ckptsvc_save_write_seconds_count"] == 2
    assert got["ckptsvc_save_write_seconds_sum"] == pytest.approx(0.75)
    assert got["ckptsvc_save_write_throughput_bytes_per_second_sum"] == pytest.approx(
        4000 / 0.5 + 6000 / 0.25
    )
    assert got["ckptsvc_last_durable_step"] == 20
    assert got["ckptsvc_last_durable_timestamp_seconds"] == 1_700_000_000.0

    emit(_event(30))  # detached: no change, and the server is gone
    assert exporter.saves.labels(outcome="durable")._value.get() == 2
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_exporter_names_the_extra_when_prometheus_client_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"ckptsvc\[prometheus\]"):
        PrometheusExporter()


def test_module_imports_no_torch() -> None:
    import subprocess

    code = "import sys, ckptsvc.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    assert metrics.__all__  # the module is importable on its own
