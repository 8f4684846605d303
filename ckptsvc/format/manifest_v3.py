"""Manifest format 3: one JSON document a rank can read in part (issue 16).

A manifest of a job in which more than one rank wrote ``per_rank`` instances grows with
the job: each rank's instance and files. Format 3 lays that document out so that rank
``r`` reads only what does not grow with the job (the *head*) and its own *region*, with
ranged reads, while the file stays one valid JSON object any JSON reader parses whole:

1. the first line, exactly :data:`LINE_NBYTES` bytes (space-padded)::

       {"ckptsvc_layout": "v3 H=<12 digits> T=<12 digits> N=<8 digits>",

   ``H``: the head's length in bytes (it starts right after this line); ``T``: the offset
   of the table's first digit; ``N``: the number of regions (the job's world size);
2. the head: the top-level members ``checkpoint_path`` ... ``metadata`` (ckptsvc's part
   with the files no region holds and ``components``: every component record with its
   rank lists as ``"a..b"`` ranges and only the instances no region holds), each member on
   one line ending with ``,``;
3. ``"ckptsvc_regions"``: a list of N objects, region ``r`` holding rank ``r``'s own
   ``per_rank`` instances and the files only they name (with size and CRC-32C);
4. ``"ckptsvc_table"``: one string of N entries of :data:`ENTRY_DIGITS` digits, entry
   ``r`` = the offset (12 digits) and length (12 digits) of region ``r`` in the file;
5. ``"components"``: Forgather's component records (its eight keys, full rank lists; the
   ``metadata`` without ckptsvc's part), last, for readers that know only Forgather.

This module turns the v1-style manifest document (what ``Manifest.to_json`` builds for
formats 1 and 2) into these bytes and back: :func:`encode`, :func:`decode` (a document
parsed whole), and :func:`parse_layout_line` / :func:`parse_head` / :func:`merge_region`
for a reader of one rank's view (``ckptsvc.read.manifest_view``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ckptsvc.errors import CorruptCheckpointError
from ckptsvc.format.json_doc import parse_json_doc

__all__ = [
    "ENTRY_DIGITS",
    "LAYOUT_KEY",
    "LINE_NBYTES",
    "V3_FORMAT_VERSION",
    "Layout",
    "decode",
    "decode_ranges",
    "encode",
    "encode_ranges",
    "finish",
    "merge_region",
    "parse_head",
    "parse_layout_line",
    "region_rank",
    "regions_in",
]

V3_FORMAT_VERSION = 3
LAYOUT_KEY = "ckptsvc_layout"
REGIONS_KEY = "ckptsvc_regions"
TABLE_KEY = "ckptsvc_table"
#: the first line's length, newline included
LINE_NBYTES = 66
#: one table entry: offset and length of a region, 12 digits each
ENTRY_DIGITS = 24
_NUM = 12
#: the largest job a v3 manifest describes (N has 8 digits)
MAX_RANKS = 10**8 - 1
_OURS = "ckptsvc"
_HEAD_MEMBERS = (
    "checkpoint_path",
    "world_size",
    "timestamp",
    "training_args_hash",
    "forgather_version",
    "pytorch_version",
    "metadata",
)
_LINE_RE = re.compile(rb'\{"ckptsvc_layout": "v3 H=(\d{12}) T=(\d{12}) N=(\d{8})", *\n')
_RANGE_RE = re.compile(r"(\d{1,9})\.\.(\d{1,9})")


@dataclass(frozen=True)
class Layout:
    """What the first line says: the head's length, the table's offset, the regions."""

    head_nbytes: int
    table_offset: int
    ranks: int

    @property
    def head_start(self) -> int:
        return LINE_NBYTES

    def entry_range(self, rank: int) -> tuple[int, int]:
        """Bytes ``[start, end)`` of rank ``rank``'s table entry."""
        start = self.table_offset + ENTRY_DIGITS * rank
        return start, start + ENTRY_DIGITS


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def encode_ranges(ranks: Iterable[int]) -> list[str]:
    """``[0, 1, 2, 5]`` -> ``["0..2", "5..5"]`` (runs of consecutive ranks, in order)."""
    out: list[str] = []
    start = prev = None
    for r in ranks:
        if prev is not None and r == prev + 1:
            prev = r
            continue
        if start is not None:
            out.append(f"{start}..{prev}")
        start = prev = r
    if start is not None:
        out.append(f"{start}..{prev}")
    return out


def decode_ranges(value: Any, *, ranks: int, where: str, what: str) -> list[int]:
    """The ranks of ``["a..b", ...]``; each range inside ``0..ranks-1`` and at most
    ``ranks`` numbers in all (a hostile range cannot expand without bound)."""
    if not isinstance(value, list):
        raise CorruptCheckpointError(f"{where}: manifest {what} is not a list of rank ranges")
    out: list[int] = []
    for item in value:
        m = _RANGE_RE.fullmatch(item) if isinstance(item, str) else None
        if m is None:
            raise CorruptCheckpointError(
                f"{where}: manifest {what}: {item!r} is not a range 'a..b'"
            )
        a, b = int(m.group(1)), int(m.group(2))
        if not a <= b < ranks or len(out) + b - a + 1 > ranks:
            raise CorruptCheckpointError(
                f"{where}: manifest {what}: range {item!r} lies outside the job's {ranks} ranks"
            )
        out.extend(range(a, b + 1))
    return out


def region_rank(component: Mapping[str, Any], instance: Any, *, ranks: int) -> int | None:
    """The region holding ``instance`` of ``component``: its rank for a ``per_rank``
    instance of one rank of the job, else ``None`` (the head)."""
    if component.get("sharing_pattern") != "per_rank" or not isinstance(instance, dict):
        return None
    owners = instance.get("ranks")
    if isinstance(owners, list) and len(owners) == 1 and type(owners[0]) is int:
        r = owners[0]
        return r if 0 <= r < ranks else None
    return None


def _instances(component: Mapping[str, Any]) -> dict[str, Any]:
    meta = component.get("metadata")
    ours = meta.get(_OURS) if isinstance(meta, dict) else None
    inst = ours.get("instances") if isinstance(ours, dict) else None
    return inst if isinstance(inst, dict) else {}


def regions_in(components: Iterable[Mapping[str, Any]], *, ranks: int) -> set[int]:
    """The ranks that own a region (``per_rank`` instances) among ``components`` (v1-style
    records): format 3 is written when there are two or more."""
    return {
        r
        for c in components
        for inst in _instances(c).values()
        if (r := region_rank(c, inst, ranks=ranks)) is not None
    }


def encode(doc: Mapping[str, Any]) -> bytes:
    """The v3 bytes of a v1-style manifest document (see the module docstring)."""
    n = int(doc["world_size"])
    if not 1 <= n <= MAX_RANKS:
        raise ValueError(f"a v3 manifest describes 1..{MAX_RANKS} ranks, not {n}")
    meta = dict(doc["metadata"])
    ours = dict(meta[_OURS])
    files: dict[str, Any] = dict(ours.get("files") or {})
    regions: list[dict[str, Any]] = [{"rank": r, "instances": {}, "files": {}} for r in range(n)]
    owners: dict[str, set[int | None]] = {}
    head_components: dict[str, Any] = {}
    forgather: dict[str, Any] = {}
    for key, c in doc["components"].items():
        head_inst: dict[str, Any] = {}
        for suffix, inst in _instances(c).items():
            r = region_rank(c, inst, ranks=n)
            if r is None:
                head_inst[suffix] = inst
            else:
                regions[r]["instances"].setdefault(key, {})[suffix] = inst
            named = [*(inst.get("files") or ()), inst.get("doc")] if isinstance(inst, dict) else []
            for name in named:
                if isinstance(name, str):
                    owners.setdefault(name, set()).add(r)
        rec = dict(c)
        rec["ranks"] = encode_ranges(c["ranks"])
        if c.get("replicated_across") is not None:
            rec["replicated_across"] = encode_ranges(c["replicated_across"])
        c_meta = dict(c.get("metadata") or {})
        if isinstance(c_meta.get(_OURS), dict):
            c_meta[_OURS] = {**c_meta[_OURS], "instances": head_inst}
        rec["metadata"] = c_meta
        head_components[key] = rec
        fg = dict(c)
        fg["metadata"] = {k: v for k, v in (c.get("metadata") or {}).items() if k != _OURS}
        forgather[key] = fg
    head_files: dict[str, Any] = {}
    for path, info in files.items():
        who = owners.get(path, {None})
        r = next(iter(who)) if len(who) == 1 else None
        if r is None:
            head_files[path] = info
        else:
            regions[r]["files"][path] = info
    ours["files"] = head_files
    ours["components"] = head_components
    meta[_OURS] = ours
    head_doc = {k: doc.get(k) for k in _HEAD_MEMBERS}
    head_doc["metadata"] = meta
    head = "".join(f"{json.dumps(k)}: {_compact(v)},\n" for k, v in head_doc.items()).encode()
    parts = [f'"{REGIONS_KEY}": [\n'.encode()]
    pos = LINE_NBYTES + len(head) + len(parts[0])
    table: list[str] = []
    for r, region in enumerate(regions):
        raw = _compact(region).encode()
        table.append(f"{pos:0{_NUM}d}{len(raw):0{_NUM}d}")
        sep = b",\n" if r < n - 1 else b"\n"
        parts.append(raw + sep)
        pos += len(raw) + len(sep)
    opening = f'],\n"{TABLE_KEY}": "'.encode()
    parts.append(opening)
    table_offset = pos + len(opening)
    parts.append("".join(table).encode() + b'",\n')
    parts.append(f'"components": {_compact(forgather)}\n}}\n'.encode())
    line = f'{{"{LAYOUT_KEY}": "{_layout_text(Layout(len(head), table_offset, n))}",'
    first = (line.ljust(LINE_NBYTES - 1) + "\n").encode()
    if len(first) != LINE_NBYTES:
        raise ValueError(f"v3 layout line is {len(first)} bytes, not {LINE_NBYTES}")
    return first + head + b"".join(parts)


def _layout_text(layout: Layout) -> str:
    return (
        f"v3 H={layout.head_nbytes:0{_NUM}d} T={layout.table_offset:0{_NUM}d} N={layout.ranks:08d}"
    )


def parse_layout_line(raw: bytes, *, where: str) -> Layout | None:
    """The layout of a v3 manifest from its first bytes; ``None`` when they are not a v3
    layout line (a v1/v2 manifest). A line that starts like one but does not parse is
    :class:`CorruptCheckpointError`."""
    if not raw.startswith(b'{"' + LAYOUT_KEY.encode()):
        return None
    m = _LINE_RE.fullmatch(raw[:LINE_NBYTES])
    if m is None:
        raise CorruptCheckpointError(
            f"{where}: manifest's v3 layout line is malformed (damaged file); resume from "
            "another checkpoint"
        )
    return _layout(int(m.group(1)), int(m.group(2)), int(m.group(3)), where=where)


def _layout(head: int, table: int, ranks: int, *, where: str) -> Layout:
    if head < 2 or table < LINE_NBYTES + head or not 1 <= ranks <= MAX_RANKS:
        raise CorruptCheckpointError(
            f"{where}: manifest's v3 layout (head {head} B, table at {table}, {ranks} ranks) "
            "is inconsistent (damaged file); resume from another checkpoint"
        )
    return Layout(head, table, ranks)


def parse_head(raw: bytes, *, layout: Layout, where: str) -> dict[str, Any]:
    """The head's members as one object (its bytes are ``"key": value,`` lines)."""
    body = raw.rstrip()
    if not body.endswith(b","):
        raise CorruptCheckpointError(f"{where}: manifest's v3 head does not end with ','")
    doc = parse_json_doc(b"{" + body[:-1] + b"}", where=where, what="manifest head")
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: manifest's v3 head is not a JSON object")
    return _expand_head(doc, layout=layout, where=where)


def _expand_head(doc: dict[str, Any], *, layout: Layout, where: str) -> dict[str, Any]:
    """The head as a v1-style document without the regions: ranges decoded."""
    if doc.get("world_size") != layout.ranks:
        raise CorruptCheckpointError(
            f"{where}: manifest world_size {doc.get('world_size')!r} differs from its v3 "
            f"layout's {layout.ranks} regions (damaged file)"
        )
    meta = doc.get("metadata")
    ours = meta.get(_OURS) if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(ours, dict):
        raise CorruptCheckpointError(f"{where}: manifest's v3 head has no ckptsvc metadata")
    comps, files = ours.get("components"), ours.get("files")
    if not isinstance(comps, dict) or not isinstance(files, dict):
        raise CorruptCheckpointError(
            f"{where}: manifest's v3 head has no component records or file list"
        )
    out = {k: doc.get(k) for k in _HEAD_MEMBERS}
    rest = {k: v for k, v in ours.items() if k != "components"}
    rest["files"] = dict(files)
    out["metadata"] = {**meta, _OURS: rest}
    components: dict[str, Any] = {}
    for key, rec in comps.items():
        if not isinstance(rec, dict):
            raise CorruptCheckpointError(f"{where}: manifest component {key!r} is malformed")
        rec = dict(rec)
        n = layout.ranks
        rec["ranks"] = decode_ranges(rec.get("ranks"), ranks=n, where=where, what=f"{key}.ranks")
        if rec.get("replicated_across") is not None:
            rec["replicated_across"] = decode_ranges(
                rec["replicated_across"], ranks=n, where=where, what=f"{key}.replicated_across"
            )
        c_meta = rec.get("metadata")
        if isinstance(c_meta, dict) and isinstance(c_meta.get(_OURS), dict):
            c_ours = dict(c_meta[_OURS])
            instances = c_ours.get("instances") or {}
            if not isinstance(instances, dict):
                raise CorruptCheckpointError(f"{where}: manifest component {key!r} is malformed")
            c_ours["instances"] = dict(instances)
            rec["metadata"] = {**c_meta, _OURS: c_ours}
        components[key] = rec
    out["components"] = components
    return out


def merge_region(doc: dict[str, Any], region: Any, *, rank: int, where: str) -> None:
    """Add rank ``rank``'s region (parsed) to ``doc`` (from :func:`parse_head`), in place."""
    if (
        not isinstance(region, dict)
        or region.get("rank") != rank
        or not isinstance(region.get("instances"), dict)
        or not isinstance(region.get("files"), dict)
    ):
        raise CorruptCheckpointError(
            f"{where}: manifest region of rank {rank} is malformed (damaged file); resume "
            "from another checkpoint"
        )
    files = doc["metadata"][_OURS]["files"]
    for path, info in region["files"].items():
        if path in files:
            raise CorruptCheckpointError(f"{where}: manifest lists {path!r} twice")
        files[path] = info
    for key, insts in region["instances"].items():
        rec = doc["components"].get(key)
        c_meta = rec.get("metadata") if isinstance(rec, dict) else None
        c_ours = c_meta.get(_OURS) if isinstance(c_meta, dict) else None
        if not isinstance(c_ours, dict) or not isinstance(insts, dict):
            raise CorruptCheckpointError(
                f"{where}: manifest region of rank {rank} names component {key!r}, which the "
                "head does not describe"
            )
        c_ours["instances"].update(insts)


def decode(doc: Mapping[str, Any], *, raw: bytes, where: str) -> dict[str, Any]:
    """The v1-style document of a v3 manifest parsed whole (every region merged), after
    checking that its layout line and table point where a rank's view would read (``raw``:
    the file's bytes): a whole read (``verify``) finds what would break a view."""
    layout = parse_layout_line(raw, where=where)
    if layout is None or doc.get(LAYOUT_KEY) != _layout_text(layout):
        raise CorruptCheckpointError(f"{where}: manifest's v3 layout member is malformed")
    regions = doc.get(REGIONS_KEY)
    if not isinstance(regions, list) or len(regions) != layout.ranks:
        raise CorruptCheckpointError(
            f"{where}: manifest holds {len(regions) if isinstance(regions, list) else 'no'} "
            f"regions, its layout says {layout.ranks} (damaged file)"
        )
    _check_table(doc, raw, layout, regions, where=where)
    out = _expand_head({k: doc.get(k) for k in _HEAD_MEMBERS}, layout=layout, where=where)
    for r, region in enumerate(regions):
        merge_region(out, region, rank=r, where=where)
    return finish(out)


def finish(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its file records in path order (as ``Manifest.new`` lists them)."""
    ours = doc["metadata"][_OURS]
    ours["files"] = {p: ours["files"][p] for p in sorted(ours["files"])}
    return doc


def _check_table(
    doc: Mapping[str, Any], raw: bytes, layout: Layout, regions: list[Any], *, where: str
) -> None:
    """Refuse a v3 file whose head length, table or table entries do not point at its
    head and regions (the view reader trusts them)."""
    table = doc.get(TABLE_KEY)
    n = layout.ranks
    head = raw[LINE_NBYTES : LINE_NBYTES + layout.head_nbytes]
    ok = (
        isinstance(table, str)
        and len(table) == ENTRY_DIGITS * n
        and table.isdigit()
        and table.isascii()
        and raw[layout.table_offset : layout.table_offset + len(table)] == table.encode()
        and head.endswith(b",\n")
        and raw[LINE_NBYTES + layout.head_nbytes :].startswith(f'"{REGIONS_KEY}"'.encode())
    )
    for r in range(n if ok else 0):
        entry = table[ENTRY_DIGITS * r : ENTRY_DIGITS * (r + 1)]  # type: ignore[index]
        off, length = int(entry[:_NUM]), int(entry[_NUM:])
        if raw[off : off + length] != _compact(regions[r]).encode():
            ok = False
            break
    if not ok:
        raise CorruptCheckpointError(
            f"{where}: manifest's v3 table does not point at its head and regions (damaged "
            "file); resume from another checkpoint"
        )
