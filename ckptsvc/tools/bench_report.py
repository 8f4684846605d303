"""Results of ``ckptsvc bench``: rows, the issue's target ratios, table and JSON.

:class:`Row` aggregates one method's samples; :func:`evaluate_targets` turns rows into
PASS/FAIL lines; :func:`format_table` (plain text), :func:`print_rich` (when ``rich`` is
installed and the output is a terminal) and :func:`document` (``--json``) present them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

__all__ = [
    "Row",
    "Target",
    "budget_target",
    "document",
    "evaluate_targets",
    "format_table",
    "incremental_target",
    "median_rep",
    "print_rich",
    "report_rows",
    "write_json",
]

GiB = 1 << 30


@dataclass(frozen=True)
class Row:
    """Aggregated result of one method: the fastest rep for floors, median times over the
    reps for the others; the max peak RSS."""

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


def median_rep(row: Row, attr: str = "durable_s") -> float:
    """A floor's median rep (its row shows the fastest): the like-for-like figure a target
    against the best floor compares a method's median with (on a noisy disk the fastest
    rep against a median is unfair). A row without samples: its own figure."""
    reps = [float(s[attr]) for s in row.samples if s.get(attr) is not None]
    return statistics.median(reps) if reps else float(getattr(row, attr) or 0.0)


def evaluate_targets(rows: Sequence[Row]) -> list[Target]:
    """The issue's targets as ratios of this run's rows ("n/a" where a row is missing)."""
    ok = {r.method: r for r in rows if r.status == "ok"}

    def v(method: str, attr: str = "durable_s") -> float:
        return float(getattr(ok[method], attr))

    def arena_nbytes() -> float:
        return float(ok["ckptsvc_async"].extras.get("arena_nbytes") or ok["ckptsvc_async"].nbytes)

    def floor_median(method: str) -> float:
        return median_rep(ok[method])

    def extra(method: str, key: str) -> float:
        return float(ok[method].extras[key])

    def warmup_ratio() -> float:  # both per GiB: the warm-up over the arena, memcpy the state
        r = ok["ckptsvc_async_reserved"]
        per_gib = extra("ckptsvc_async_reserved", "warmup_s") / (r.extras["arena_nbytes"] / GiB)
        return per_gib / (v("memcpy") / (ok["memcpy"].nbytes / GiB))

    raws = [m for m in ("raw_write", "raw_write_direct") if m in ok]
    best_raw = min(raws, key=floor_median, default="raw_write")

    def after_copy(method: str) -> float:  # the writer's part: durable minus the blocking copy
        return v(method) - v(method, "blocking_s")

    def raw_note(method: str, part: Callable[[str], float]) -> str:
        """Which floor was best (by median rep), and the ratio against its fastest rep."""
        note = f"best raw write: {best_raw}, median rep"
        if method in ok and best_raw in ok and v(best_raw) > 0:
            note += f"; vs its fastest rep {part(method) / v(best_raw):.2f}"
        return note

    arena_note = "arena = /dev/shm segments mapped by the trainer"
    if "ckptsvc_async" in ok and not ok["ckptsvc_async"].extras.get("arena_nbytes"):
        arena_note = "no /dev/shm segment seen: state bytes used as arena size"
    specs: list[tuple[str, str, str, float, tuple[str, ...], Callable[[], float], str]] = [
        ("async blocking vs memcpy floor", "ckptsvc_async.blocking / memcpy", "<=", 1.25,
         ("ckptsvc_async", "memcpy"), lambda: v("ckptsvc_async", "blocking_s") / v("memcpy"), ""),
        ("first async save vs memcpy floor", "ckptsvc_async.first blocking / memcpy", "<=", 1.25,
         ("ckptsvc_async", "memcpy"), lambda: extra("ckptsvc_async", "first_blocking_s") / v("memcpy"), ""),
        ("first async save after reserve() vs memcpy floor",
         "ckptsvc_async_reserved.first blocking / memcpy", "<=", 1.25, ("ckptsvc_async_reserved", "memcpy"),
         lambda: extra("ckptsvc_async_reserved", "first_blocking_s") / v("memcpy"), "the warm-up ran before, in the background"),
        ("arena warm-up vs memcpy floor, per GiB", "warm-up s/GiB / memcpy s/GiB", "<=", 1.0,
         ("ckptsvc_async_reserved", "memcpy"), warmup_ratio, "issue 15: at the floor, or off the first save (row above)"),
        ("async durable vs memcpy + raw write", "ckptsvc_async.durable / (memcpy + raw_write)", "<=", 1.15,
         ("ckptsvc_async", "memcpy", "raw_write"), lambda: v("ckptsvc_async") / (v("memcpy") + v("raw_write")), ""),
        ("DCP async blocking vs ckptsvc async", "dcp_async.blocking / ckptsvc_async.blocking", ">=", 3.0,
         ("dcp_async", "ckptsvc_async"), lambda: v("dcp_async", "blocking_s") / v("ckptsvc_async", "blocking_s"), ""),
        ("sync save throughput vs raw write", "ckptsvc_save.GB/s / raw_write.GB/s", ">=", 0.9,
         ("ckptsvc_save", "raw_write"), lambda: v("raw_write") / v("ckptsvc_save"), ""),
        ("sync save faster than torch.save", "ckptsvc_save.GB/s / torch_save.GB/s", ">=", 1.0,
         ("ckptsvc_save", "torch_save"), lambda: v("torch_save") / v("ckptsvc_save"), ""),
        *_load_targets(ok, v, floor_median),
        ("local durable (sync save) vs best raw write", "ckptsvc_save.durable / best raw write", "<=", 1.05,
         ("ckptsvc_save", best_raw), lambda: v("ckptsvc_save") / floor_median(best_raw),
         raw_note("ckptsvc_save", v)),
        ("local durable (async, after the copy) vs best raw write",
         "(ckptsvc_async.durable - blocking) / best raw write", "<=", 1.05,
         ("ckptsvc_async", best_raw), lambda: after_copy("ckptsvc_async") / floor_median(best_raw),
         raw_note("ckptsvc_async", after_copy)),
        ("async peak extra RSS vs arena size", "ckptsvc_async.RSS+ / arena bytes", "<=", 1.10,
         ("ckptsvc_async",), lambda: v("ckptsvc_async", "rss_extra_bytes") / arena_nbytes(), arena_note),
        # DCP through ckptsvc's StorageWriter is no slower than through DCP's own writer
        # (async blocking is DCP's stager copy for both: within noise of each other)
        ("DCP async_save blocking, ckptsvc vs FileSystemWriter",
         "ckptsvc_dcp_async.blocking / dcp_async.blocking", "<=", 1.10, ("ckptsvc_dcp_async", "dcp_async"),
         lambda: v("ckptsvc_dcp_async", "blocking_s") / v("dcp_async", "blocking_s"), ""),
        ("DCP async_save durable, ckptsvc vs FileSystemWriter",
         "ckptsvc_dcp_async.durable / dcp_async.durable", "<=", 1.0, ("ckptsvc_dcp_async", "dcp_async"),
         lambda: v("ckptsvc_dcp_async") / v("dcp_async"), ""),
        ("DCP save durable, ckptsvc vs FileSystemWriter", "ckptsvc_dcp_save.durable / dcp_save.durable",
         "<=", 1.0, ("ckptsvc_dcp_save", "dcp_save"), lambda: v("ckptsvc_dcp_save") / v("dcp_save"), ""),
    ]  # fmt: skip
    targets = []
    for name, formula, op, threshold, needs, compute, note in specs:
        missing = [m for m in needs if m not in ok]
        if missing:
            targets.append(
                Target(name, formula, op, threshold, None, "n/a", f"missing {', '.join(missing)}")
            )
            continue
        try:
            value = compute()
        except ZeroDivisionError:
            targets.append(Target(name, formula, op, threshold, None, "n/a", "a denominator is 0"))
            continue
        passed = value <= threshold if op == "<=" else value >= threshold
        targets.append(
            Target(name, formula, op, threshold, value, "PASS" if passed else "FAIL", note)
        )
    return targets


#: the read floors a load is held to: the best of them (buffered, O_DIRECT, mapped, or s3fs's
#: single-object and multi-object gets on an object store)
READ_FLOORS = ("raw_read", "raw_read_direct", "raw_read_mapped", "raw_read_objects")


def _load_targets(
    ok: dict[str, Row], v: Callable[[str], float], floor_median: Callable[[str], float]
) -> list[tuple[str, str, str, float, tuple[str, ...], Callable[[], float], str]]:
    """Issue 15's load targets: ckptsvc's load (median) at >= 0.9x the best read floor of
    this run (its median rep: like with like), and faster than ``safetensors.load_file``."""
    floors = [m for m in READ_FLOORS if m in ok]
    best = min(floors, key=floor_median, default="raw_read")
    note = f"best read floor: {best}, median rep" + (
        f" (of {', '.join(floors)})" if len(floors) > 1 else ""
    )
    if best in ok and "ckptsvc_load" in ok and v("ckptsvc_load") > 0:
        note += f"; vs its fastest rep {v(best) / v('ckptsvc_load'):.2f}"
    return [
        ("load throughput vs best raw read", "ckptsvc_load.GB/s / best raw read.GB/s", ">=", 0.9,
         ("ckptsvc_load", best), lambda: floor_median(best) / v("ckptsvc_load"), note),
        ("load faster than safetensors", "ckptsvc_load.GB/s / safetensors_load.GB/s", ">=", 1.0,
         ("ckptsvc_load", "safetensors_load"),
         lambda: v("safetensors_load") / v("ckptsvc_load"), ""),
    ]  # fmt: skip


def _ratio_target(
    row: Row, *, name: str, formula: str, threshold: float, key: str, note: str
) -> Target:
    """A ``<=`` target on the ratio ``row.extras[key]`` of a single-row bench mode."""
    ratio = row.extras.get(key) if row.status == "ok" else None
    if ratio is None:
        return Target(name, formula, "<=", threshold, None, "n/a", row.reason or "no ratio")
    verdict = "PASS" if ratio <= threshold else "FAIL"
    return Target(name, formula, "<=", threshold, float(ratio), verdict, note)


def incremental_target(row: Row) -> Target:
    """Issue 9's incremental-save target for the row of ``bench --incremental``: the
    second save of a 90%-frozen model writes <= 15% of the bytes a full save writes."""
    frozen = row.extras.get("frozen_fraction")
    return _ratio_target(
        row,
        name="incremental save bytes vs full save",
        formula="incremental.written / full.written",
        threshold=0.15,
        key="written_ratio",
        note=f"{frozen:.0%} of the bytes frozen" if frozen is not None else "",
    )


def budget_target(row: Row) -> Target:
    """Issue 9's memory-budget target for the row of ``bench --budget``: with a budget of
    0.25x the state, the save's peak extra memory (trainer RSS growth, ring included, plus
    the writer's private growth) stays within the budget + 10%."""
    return _ratio_target(
        row,
        name="budget 0.25x: peak extra / budget",
        formula="ckptsvc_budget.extra / memory_budget_bytes",
        threshold=1.10,
        key="ratio",
        note=f"{row.extras.get('streamed_pieces')} pieces, peak from {row.extras.get('peak_from')}",
    )


def write_json(doc: Any, path: str) -> None:
    """``--json PATH``: ``doc`` as JSON to ``PATH``, or to stdout for ``-``."""
    text = json.dumps(doc, indent=1)
    if path == "-":
        print(text)
        return
    with open(path, "w") as f:
        f.write(text + "\n")


def report_rows(
    rows: Sequence[Row], targets: Sequence[Target], title: str, json_path: str | None
) -> int:
    """Print (or write as JSON) a bench mode's rows and targets; the exit code: 0 when
    every row ran and every target passed."""
    if json_path:
        write_json(
            {"rows": [asdict(r) for r in rows], "targets": [asdict(t) for t in targets]}, json_path
        )
    else:
        print(format_table(rows, targets, title))
    ok = all(r.status == "ok" for r in rows) and all(t.verdict == "PASS" for t in targets)
    return 0 if ok else 1


# ---------------------------------------------------------------------------- output
def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


#: (extras keys that must all be present, how to show them) for the notes column
_NOTES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("heap_first_touch_s", "shm_pretouched_s"),
     "fresh heap {heap_first_touch_s:.3f} s, pre-touched shm {shm_pretouched_s:.3f} s"),
    (("streams",), "{streams} streams"),
    (("fsync_s",), "fsync {fsync_s:.2f} s"),
    (("mode",), "{mode}"),
    (("reserve_blocking_s", "warmup_s"), "reserve {reserve_blocking_s:.2f} s + {warmup_s:.2f} s in the background"),
    (("first_blocking_s", "first_durable_s"), "first save {first_blocking_s:.2f}/{first_durable_s:.2f} s"),
    (("arena_gib", "arena_count"), "arena {arena_gib:.2f} GiB in {arena_count} segment(s)"),
    (("leaked_gib",), "LEAKED {leaked_gib:.2f} GiB of /dev/shm"),
    (("cached_mib",), "{cached_mib} MiB cached before"),
)  # fmt: skip


def _notes(row: Row) -> str:
    if row.status != "ok":
        return f"{row.status}: {row.reason}"
    e = dict(row.extras)
    if e.get("arena_nbytes"):
        e["arena_gib"] = e["arena_nbytes"] / GiB
    if e.get("shm_leaked_nbytes"):
        e["leaked_gib"] = e["shm_leaked_nbytes"] / GiB
    if e.get("cached_before_bytes") is not None:
        e["cached_mib"] = int(e["cached_before_bytes"]) >> 20
    parts = [fmt.format(**e) for keys, fmt in _NOTES if all(e.get(k) is not None for k in keys)]
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


def _target_line(t: Target) -> tuple[str, str, str, str]:
    value = "-" if t.value is None else f"{t.value:.2f}"
    return (f"{t.formula} {t.op} {t.threshold:g}", value, t.verdict, t.note)


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
    out += [
        "",
        "floors: fastest rep; others: median of reps (a target against a best floor uses the"
        " floor's median rep). RSS+: peak over the RSS with the state built.",
        "",
        "targets (ratios within this run):",
    ]
    lines = [_target_line(t) for t in targets]
    width = max((len(a) for a, *_ in lines), default=0)
    out += [f"  {a.ljust(width)}  {b:>6}  {c:<4}  {d}".rstrip() for a, b, c, d in lines]
    return "\n".join(out)


def print_rich(rows: Sequence[Row], targets: Sequence[Target], title: str) -> bool:
    """The same report as rich tables on stdout; False (nothing printed) without rich."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        return False
    table = Table(title=escape(title), title_justify="left")
    for i, name in enumerate(_HEADER):
        table.add_column(name, justify="left" if i in (0, len(_HEADER) - 1) else "right")
    for row in rows:
        table.add_row(*(escape(c) for c in _cells(row)))
    checks = Table(title="targets (ratios within this run)", title_justify="left")
    for name in ("target", "value", "verdict", "note"):
        checks.add_column(name)
    for t in targets:
        a, b, c, d = _target_line(t)
        checks.add_row(
            escape(a), b, {"PASS": "[green]PASS[/]", "FAIL": "[red]FAIL[/]"}.get(c, c), escape(d)
        )
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
