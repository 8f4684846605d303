"""Results of ``ckptsvc bench``: rows, the issue's target ratios, table and JSON.

:class:`Row` aggregates one method's samples; :func:`evaluate_targets` turns rows into
PASS/FAIL lines; :func:`format_table` (plain text), :func:`print_rich` (when ``rich`` is
installed and the output is a terminal) and :func:`document` (``--json``) present them.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

__all__ = ["Row", "Target", "document", "evaluate_targets", "format_table", "print_rich"]

GiB = 1 << 30


@dataclass(frozen=True)
class Row:
    """Aggregated result of one method: median times over the reps, max peak RSS."""

    method: str
    kind: str
    label: str
    status: str  # "ok" | "unavailable" | "error"
    reason: str = ""
    nbytes: int = 0
    blocking_s: float | None = None
    durable_s: float | None = None
    gb_per_s: float | None = None
    rss_extra_bytes: int | None = None
    child_rss_peak_bytes: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    samples: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Target:
    """One of the issue's targets, evaluated on the rows of this run."""

    name: str
    formula: str
    op: str  # "<=" | ">="
    threshold: float
    value: float | None
    verdict: str  # "PASS" | "FAIL" | "n/a"
    note: str = ""


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def evaluate_targets(rows: Sequence[Row]) -> list[Target]:
    """The issue's targets as ratios of this run's rows (n/a where a row is missing)."""
    ok = {r.method: r for r in rows if r.status == "ok"}

    def get(method: str, attr: str) -> float | None:
        row = ok.get(method)
        value = getattr(row, attr) if row is not None else None
        return float(value) if value is not None else None

    def target(
        name: str,
        formula: str,
        op: str,
        threshold: float,
        value: float | None,
        needs: Sequence[str],
        note: str = "",
    ) -> Target:
        missing = [m for m in needs if m not in ok]
        if value is None or missing:
            return Target(
                name,
                formula,
                op,
                threshold,
                None,
                "n/a",
                f"missing: {', '.join(missing)}" if missing else note,
            )
        passed = value <= threshold if op == "<=" else value >= threshold
        return Target(name, formula, op, threshold, value, "PASS" if passed else "FAIL", note)

    memcpy = get("memcpy", "blocking_s")
    raw_write = get("raw_write", "durable_s")
    floor_sum = memcpy + raw_write if memcpy is not None and raw_write is not None else None
    arena = ok["ckptsvc_async"].extras.get("arena_nbytes") if "ckptsvc_async" in ok else None
    arena_note = "arena = new /dev/shm bytes"
    if not arena and "ckptsvc_async" in ok:
        arena, arena_note = ok["ckptsvc_async"].nbytes, "no /dev/shm arena seen; using state bytes"
    return [
        target("async blocking vs memcpy floor", "ckptsvc_async.blocking / memcpy", "<=", 1.25,
               _ratio(get("ckptsvc_async", "blocking_s"), memcpy), ["ckptsvc_async", "memcpy"]),
        target("async durable vs memcpy + raw write", "ckptsvc_async.durable / (memcpy + raw_write.durable)", "<=", 1.15,
               _ratio(get("ckptsvc_async", "durable_s"), floor_sum), ["ckptsvc_async", "memcpy", "raw_write"]),
        target("DCP async blocking vs ckptsvc async", "dcp_async.blocking / ckptsvc_async.blocking", ">=", 3.0,
               _ratio(get("dcp_async", "blocking_s"), get("ckptsvc_async", "blocking_s")), ["dcp_async", "ckptsvc_async"]),
        target("sync save throughput vs raw write", "ckptsvc_save.GB/s / raw_write.GB/s", ">=", 0.9,
               _ratio(raw_write, get("ckptsvc_save", "durable_s")), ["ckptsvc_save", "raw_write"]),
        target("sync save faster than torch.save", "torch_save.durable / ckptsvc_save.durable", ">=", 1.0,
               _ratio(get("torch_save", "durable_s"), get("ckptsvc_save", "durable_s")), ["ckptsvc_save", "torch_save"]),
        target("load throughput vs raw read", "ckptsvc_load.GB/s / raw_read.GB/s", ">=", 0.9,
               _ratio(get("raw_read", "durable_s"), get("ckptsvc_load", "durable_s")), ["ckptsvc_load", "raw_read"]),
        target("async peak extra RSS vs arena size", "ckptsvc_async.rss_extra / arena bytes", "<=", 1.10,
               _ratio(get("ckptsvc_async", "rss_extra_bytes"), float(arena) if arena else None), ["ckptsvc_async"], arena_note),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- output
def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _notes(row: Row) -> str:
    if row.status != "ok":
        return f"{row.status}: {row.reason}"
    e, parts = row.extras, []
    if "heap_first_touch_s" in e:
        parts.append(
            f"fresh heap {e['heap_first_touch_s']:.3f} s, pre-touched shm {e['shm_pretouched_s']:.3f} s"
        )
    if "fsync_s" in e:
        parts.append(f"fsync {e['fsync_s']:.2f} s")
    if "mode" in e:
        parts.append(str(e["mode"]))
    if "first_blocking_s" in e:
        parts.append(f"first save {e['first_blocking_s']:.2f}/{e['first_durable_s']:.2f} s")
    if e.get("arena_nbytes"):
        parts.append(f"arena {e['arena_nbytes'] / GiB:.2f} GiB in {e['arena_count']} segment(s)")
    if e.get("shm_leaked_nbytes"):
        parts.append(f"LEAKED {e['shm_leaked_nbytes'] / GiB:.2f} GiB of /dev/shm")
    if e.get("cached_before_bytes") is not None:
        parts.append(f"{e['cached_before_bytes'] >> 20} MiB cached before")
    if row.reason:
        parts.append(row.reason)
    return "; ".join(parts)


_HEADER = ("method", "blocking s", "durable s", "GB/s", "RSS+ GiB", "child GiB", "notes")


def _cells(row: Row) -> tuple[str, ...]:
    def gib(v: int | None) -> float | None:
        return None if v is None else v / GiB

    return (
        row.label, _num(row.blocking_s, ".3f"), _num(row.durable_s, ".3f"), _num(row.gb_per_s, ".2f"),
        _num(gib(row.rss_extra_bytes), ".2f"), _num(gib(row.child_rss_peak_bytes), ".2f"), _notes(row),
    )  # fmt: skip


def _target_line(t: Target) -> tuple[str, str, str]:
    value = "-" if t.value is None else f"{t.value:.2f}"
    note = f" ({t.note})" if t.note else ""
    return (f"{t.name}: {t.formula} {t.op} {t.threshold:g}", f"{value}{note}", t.verdict)


def format_table(rows: Sequence[Row], targets: Sequence[Target], title: str) -> str:
    """Plain-text report: one line per method, then one per target."""
    table = [_HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADER) - 1)]
    out = [title, ""]
    for line in table:
        cols = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:-1], widths[1:], strict=True)
        ]
        out.append("  ".join([*cols, line[-1]]).rstrip())
    out += ["", "targets (ratios within this run):"]
    lines = [_target_line(t) for t in targets]
    width = max((len(a) for a, _, _ in lines), default=0)
    out += [f"  {a.ljust(width)}  {b:>8}  {c}" for a, b, c in lines]
    return "\n".join(out)


def print_rich(rows: Sequence[Row], targets: Sequence[Target], title: str) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(_HEADER):
        table.add_column(name, justify="left" if i in (0, len(_HEADER) - 1) else "right")
    for row in rows:
        table.add_row(*_cells(row))
    checks = Table(title="targets (ratios within this run)", title_justify="left")
    for name in ("target", "value", "verdict"):
        checks.add_column(name)
    for t in targets:
        a, b, c = _target_line(t)
        checks.add_row(a, b, {"PASS": "[green]PASS[/]", "FAIL": "[red]FAIL[/]"}.get(c, c))
    console = Console()
    console.print(table)
    console.print(checks)
    return True


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def document(
    config: dict[str, Any], rows: Sequence[Row], targets: Sequence[Target]
) -> dict[str, Any]:
    """The ``--json`` document: the run's ``config`` (plus host facts), rows and targets."""
    host = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "versions": {d: _version(d) for d in ("ckptsvc", "torch", "safetensors", "fsspec")},
    }
    return {
        "schema": "ckptsvc-bench/1",
        "config": {**config, **host},
        "rows": [asdict(r) for r in rows],
        "targets": [asdict(t) for t in targets],
    }
