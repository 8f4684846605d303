"""The save side of ``ckptsvc bench --storage``: s3fs moving the same bytes, and ckptsvc's
saves against the best of it.

The row ``s3fs_put`` runs only against an object store (``--storage s3://...``), in its
own worker like every other row (:mod:`ckptsvc.tools.bench_workloads` dispatches to it):
the state's bytes as one object, ``fs.pipe_file`` (s3fs's own upload: one PUT, or its
multipart upload for big objects). The same bytes as several objects put in parallel
are the floor ``raw_write_objects`` (:mod:`ckptsvc.tools.bench_reads`).

:func:`remote_save_targets` adds the issue's targets: ckptsvc's sync save and the async
save's write phase at >= 0.9 x the best of ``s3fs_put``, ``raw_write_objects`` and the
streaming upload (``raw_write``), all of the same bytes to the same server in one run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ckptsvc.tools.bench_probes import PeakRss, Unavailable
from ckptsvc.tools.bench_reads import Timed, state_bytes
from ckptsvc.tools.bench_report import Row, Target, median_rep

__all__ = [
    "REMOTE_SAVE_ARTIFACTS",
    "remote_save_targets",
    "s3fs_put",
]

#: each row's artifact under the scratch root
REMOTE_SAVE_ARTIFACTS = {"s3fs_put": "s3fs_put.bin"}
#: the threshold of both targets (ckptsvc's throughput / the best s3fs throughput)
_AT_LEAST = 0.9
_PUT_ROWS = ("raw_write", "raw_write_objects", "s3fs_put")


def s3fs_put(ctx: Any) -> tuple[PeakRss, Timed]:
    """The bytes as one object through s3fs's ``pipe_file`` (blocking = durable: the upload
    is complete when s3fs returns)."""
    if not ctx.cfg.remote:
        raise Unavailable("s3fs_put measures object stores (--storage) only")
    data = state_bytes(ctx)
    path = ctx.fs_path(REMOTE_SAVE_ARTIFACTS["s3fs_put"])
    with PeakRss() as rss:
        t0 = time.perf_counter()
        ctx.fs.pipe_file(path, data)
        took_s = time.perf_counter() - t0
    return rss, (took_s, took_s, {"objects": 1})


def remote_save_targets(rows: Sequence[Row]) -> list[Target]:
    """ckptsvc's saves against the best s3fs upload of the same bytes in this run
    (throughput ratios against the upload's median rep, >= 0.9 to pass); none unless an
    s3fs row ran (a remote run)."""
    ok = {r.method: r for r in rows if r.status == "ok" and r.durable_s}
    puts = [m for m in _PUT_ROWS if m in ok]
    if not any(m in ok for m in ("s3fs_put", "raw_write_objects")):
        return []  # not a remote run
    best = min(puts, key=lambda m: median_rep(ok[m]))  # like with like: median reps
    best_s = median_rep(ok[best])
    fastest_s = float(ok[best].durable_s or 0.0)
    note = f"best s3fs upload: {best} (median rep {best_s:.2f} s, fastest {fastest_s:.2f} s)"
    targets = []
    for name, formula, method, part in (
        ("remote sync save vs best s3fs upload", "best s3fs put.durable / ckptsvc_save.durable",
         "ckptsvc_save", lambda r: float(r.durable_s or 0.0)),
        ("remote async write phase vs best s3fs upload",
         "best s3fs put.durable / (ckptsvc_async.durable - blocking)", "ckptsvc_async",
         lambda r: float(r.durable_s or 0.0) - float(r.blocking_s or 0.0)),
    ):  # fmt: skip
        row = ok.get(method)
        if row is None or part(row) <= 0:
            targets.append(Target(name, formula, ">=", _AT_LEAST, None, "n/a", f"missing {method}"))
            continue
        value = best_s / part(row)
        verdict = "PASS" if value >= _AT_LEAST else "FAIL"
        targets.append(Target(name, formula, ">=", _AT_LEAST, value, verdict, note))
    return targets
