"""What ``ckptsvc simulate`` (:mod:`ckptsvc.tools.simulate`) derives from its counts: the
bytes of metadata a resume read (from the request log of :mod:`ckptsvc.tools.simulate_probes`)
and the markdown table of the results."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ckptsvc.storage import Location
from ckptsvc.tools.simulate_probes import Request

__all__ = ["format_table", "got_nbytes", "metadata_bytes", "object_sizes"]


def metadata_bytes(
    loads: list[Request], sizes: dict[str, int], opts: dict[str, Any]
) -> tuple[int, int]:
    """Bytes of metadata the load read: every JSON object it fetched (the bytes of each
    GET: a ranged read counts its range, clipped to the object's size), and the header
    (length prefix + JSON, documents folded into it included) of every safetensors file
    whose head it read; and the JSON objects' bytes alone."""
    json_nbytes = 0
    total = 0
    headers: dict[str, int] = {}
    for x in loads:
        if x.method != "GET":
            continue
        if x.path.endswith(".json"):
            json_nbytes += got_nbytes(x.range, sizes.get(x.path, 0))
        elif x.path.endswith(".safetensors") and x.range.startswith("bytes=0-"):
            if x.path not in headers:
                bucket_key = x.path.lstrip("/")
                head = Location.parse(f"s3://{bucket_key}", opts).read_range(0, 8)
                headers[x.path] = 8 + int.from_bytes(head, "little")
            total += headers[x.path]
    return total + json_nbytes, json_nbytes


def got_nbytes(range_header: str, size: int) -> int:
    """Bytes a GET of an object of ``size`` bytes returned: its ``Range`` (``bytes=a-b``,
    ``bytes=a-``, ``bytes=-n``) clipped to the object, or the whole object."""
    spec = range_header.removeprefix("bytes=")
    if not range_header or "," in spec or "-" not in spec:
        return size
    first, _, last = spec.partition("-")
    try:
        if not first:
            return min(int(last), size)
        start = int(first)
        end = size - 1 if not last else min(int(last), size - 1)
    except ValueError:
        return size
    return max(0, end - start + 1)


def object_sizes(opts: dict[str, Any], root: str) -> dict[str, int]:
    """Every object under ``root`` by its request path (``/<bucket>/<key>``), with its size."""
    loc = Location.parse(root, opts)
    return {f"/{loc.path}/{rel}": n for rel, n in loc.walk_files()}


_COLUMNS = (
    ("ranks", "ranks"),
    ("nodes", "nodes"),
    ("rank0_store_ops", "rank-0 store ops/save"),
    ("store_ops_per_rank", "store ops/rank/save"),
    ("store_connects_per_save", "store connects/save (all ranks)"),
    ("wake_after_last_report_ms", "rank 0 wakes after last report (ms)"),
    ("outcome_after_last_report_ms", "outcome out after last report (ms)"),
    ("commit_after_last_report_ms", "rank 0's handle done after last report (ms)"),
    ("rank0_commit_cpu_ms", "rank-0 commit CPU (ms)"),
    ("decode_merge_ms", "decode + merge (ms)"),
    ("commit_storage_ms", "of which storage requests (ms)"),
    ("requests_per_save", "requests/save"),
    ("writes_per_save", "writes/save"),
    ("max_writes_one_prefix", "max writes one prefix"),
    ("discovery_requests", "discovery requests/job"),
    ("load_requests", "load requests"),
    ("load_requests_per_rank", "load requests/rank"),
    ("replicated_shard_gets", "replicated shard GETs/job"),
    ("metadata_bytes_per_rank", "metadata B read/rank"),
    ("json_bytes_per_rank", "of which JSON B/rank"),
)


def _cell(value: object) -> str:
    """A table cell: floats without decimals, or with one when below 10 (0.5 connects)."""
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def format_table(results: list[Any]) -> str:
    """A markdown table of ``results`` (:class:`~ckptsvc.tools.simulate.SimResult`, one row
    per job size)."""
    lines = [
        "| " + " | ".join(title for _, title in _COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    for res in results:
        d = asdict(res)
        cells = [_cell(d[k]) for k, _ in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
