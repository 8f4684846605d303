"""One rank's view of a checkpoint's manifest: the head and that rank's region (issue 16).

A v3 manifest (``format/manifest_v3.py``) is laid out so that rank ``r`` reads a constant
number of bytes, whatever the job's size, with at most four ranged reads:

1. the first ``CKPTSVC_MANIFEST_HEAD_GUESS`` bytes (the layout line and, usually, the
   whole head);
2. the rest of the head, when it is longer than that;
3. entry ``r`` of the table (24 digits: offset and length of the region);
4. the region.

Reads that fall inside bytes already read cost nothing (a small manifest is one read).
A v1/v2 manifest is read whole (one read when it is shorter than the guess, else one
more for the rest). Every
offset and length is checked against the layout, the file's size (where it is known) and
``CKPTSVC_MAX_JSON_BYTES`` before it is read; anything out of range, a table entry that
is not digits, or a head or region that is not JSON is :class:`CorruptCheckpointError`
naming the file. Locally the manifest must be a regular file (opened ``O_NONBLOCK``).
"""

from __future__ import annotations

import logging
import os
from types import TracebackType

from ckptsvc import knobs
from ckptsvc.errors import CorruptCheckpointError
from ckptsvc.format import manifest_v3
from ckptsvc.format.json_doc import open_regular_file, parse_json_doc
from ckptsvc.format.manifest import MANIFEST_NAME, Manifest
from ckptsvc.storage import Location

__all__ = ["read_manifest_view"]

logger = logging.getLogger(__name__)


class _Source:
    """Ranged reads of one manifest: locally a regular file opened once (its size known),
    elsewhere ranged GETs (the size known only once a read comes back short)."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self.where = loc.url
        self.size: int | None = None
        self.reads = 0
        self.nbytes = 0
        self._fd: int | None = None
        if loc.is_local:
            self._open_local()

    def _open_local(self) -> None:
        self._fd, self.size = open_regular_file(self.loc.path, where=self.where, what="manifest")

    def __enter__(self) -> _Source:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``, possibly fewer at the end of the file."""
        if self.size is not None:
            end = min(end, self.size)
        if end <= start:
            return b""
        self.reads += 1
        if self._fd is not None:
            try:
                raw = os.pread(self._fd, end - start, start)
            except OSError as e:
                raise CorruptCheckpointError(f"{self.where}: manifest cannot be read ({e})") from e
        else:
            raw = self.loc.read_range(start, end)
            if len(raw) < end - start:
                self.size = start + len(raw)
        self.nbytes += len(raw)
        return raw

    def exact(self, start: int, end: int, *, what: str) -> bytes:
        """Bytes ``[start, end)``, all of them, else :class:`CorruptCheckpointError`."""
        if self.size is not None and end > self.size:
            raise CorruptCheckpointError(
                f"{self.where}: manifest's {what} (bytes {start}..{end}) lies past the end of "
                f"the file ({self.size} bytes; damaged or cut short); resume from another "
                "checkpoint"
            )
        raw = self.read(start, end)
        if len(raw) != end - start:
            raise CorruptCheckpointError(
                f"{self.where}: manifest's {what} (bytes {start}..{end}) lies past the end of "
                "the file (damaged or cut short); resume from another checkpoint"
            )
        return raw


def read_manifest_view(ckpt: Location, *, rank: int) -> Manifest | None:
    """Rank ``rank``'s view of the manifest of ``ckpt`` (``None`` when there is none).

    For a v3 manifest: the head and rank ``rank``'s region only (``view_rank`` set; a rank
    outside the saved job gets the head alone). For v1/v2: the whole manifest, as
    ``read_manifest`` gives it.
    """
    loc = ckpt.join(MANIFEST_NAME)
    cap = int(knobs.MAX_JSON_BYTES.get())
    guess = int(knobs.MANIFEST_HEAD_GUESS.get())
    with _Source(loc) as src:
        if src.size is not None and src.size > cap:
            raise CorruptCheckpointError(
                f"{loc.url}: manifest is {src.size} bytes, over the {cap}-byte limit "
                "(CKPTSVC_MAX_JSON_BYTES; raise it only if you trust the file)"
            )
        first = src.read(0, min(guess, cap + 1))
        layout = manifest_v3.parse_layout_line(first, where=loc.url)
        if layout is None:  # v1/v2: the whole file (the rest of it, if any, in one read)
            whole = first
            if src.size is None or src.size > len(first):
                whole += src.read(len(first), cap + 1)
            if len(whole) > cap:
                raise CorruptCheckpointError(
                    f"{loc.url}: manifest is more than {cap} bytes (CKPTSVC_MAX_JSON_BYTES; "
                    "raise it only if you trust the file)"
                )
            return Manifest.from_json(whole, where=loc.url)
        manifest = _view(src, first, layout, rank=rank, cap=cap)
    logger.debug(
        "%s: rank %d's view of the manifest: %d reads, %d bytes", loc.url, rank, src.reads,
        src.nbytes,
    )  # fmt: skip
    return manifest


def _view(
    src: _Source, first: bytes, layout: manifest_v3.Layout, *, rank: int, cap: int
) -> Manifest:
    where = src.where
    if layout.table_offset + manifest_v3.ENTRY_DIGITS * layout.ranks > cap or (
        src.size is not None
        and layout.table_offset + manifest_v3.ENTRY_DIGITS * layout.ranks > src.size
    ):
        raise CorruptCheckpointError(
            f"{where}: manifest's v3 table ({layout.ranks} entries at {layout.table_offset}) "
            "does not fit in the file (damaged or hostile file); resume from another checkpoint"
        )
    start, end = layout.head_start, layout.head_start + layout.head_nbytes
    head = first[start:end]
    if len(head) < end - start:
        head += src.exact(start + len(head), end, what="head")
    doc = manifest_v3.parse_head(head, layout=layout, where=where)
    if 0 <= rank < layout.ranks:
        e_start, e_end = layout.entry_range(rank)
        entry = _cached(first, e_start, e_end) or src.exact(e_start, e_end, what="table entry")
        if not entry.isdigit() or len(entry) != manifest_v3.ENTRY_DIGITS:
            raise CorruptCheckpointError(
                f"{where}: manifest's table entry of rank {rank} is not "
                f"{manifest_v3.ENTRY_DIGITS} digits (damaged file); resume from another "
                "checkpoint"
            )
        half = manifest_v3.ENTRY_DIGITS // 2
        offset, length = int(entry[:half]), int(entry[half:])
        if offset < end or length < 2 or length > cap or offset + length > layout.table_offset:
            raise CorruptCheckpointError(
                f"{where}: manifest's table places rank {rank}'s region at bytes "
                f"{offset}..{offset + length}, outside the regions (bytes {end}.."
                f"{layout.table_offset}; damaged file); resume from another checkpoint"
            )
        raw = _cached(first, offset, offset + length) or src.exact(
            offset, offset + length, what=f"region of rank {rank}"
        )
        region = parse_json_doc(raw, where=where, what=f"manifest region of rank {rank}")
        manifest_v3.merge_region(doc, region, rank=rank, where=where)
    return Manifest.from_doc(manifest_v3.finish(doc), where=where, view_rank=rank)


def _cached(first: bytes, start: int, end: int) -> bytes:
    """``first[start:end]`` when the first read already holds all of it, else ``b""``."""
    return first[start:end] if end <= len(first) else b""
