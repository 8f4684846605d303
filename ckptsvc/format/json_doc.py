"""The one reader of a checkpoint's JSON documents (manifest, index, state skeletons, headers).

Every document a checkpoint holds is untrusted input: it may be a FIFO, a directory, a
symlink to ``/dev/zero``, hundreds of megabytes, nested ten thousand levels deep, or carry
an integer of a million digits. :func:`read_json_doc` reads one with a bounded read
(``CKPTSVC_MAX_JSON_BYTES``; locally with ``O_NONBLOCK`` and only from a regular file) and
:func:`parse_json_doc` parses bytes with bounded integers and depth and without
``NaN``/``Infinity``. Every failure is a :class:`CorruptCheckpointError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from typing import Any

from ckptsvc import knobs
from ckptsvc.errors import CorruptCheckpointError, StorageNotFoundError
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.storage import Location

__all__ = [
    "MAX_INT_DIGITS",
    "MAX_JSON_DEPTH",
    "check_doc_against_manifest",
    "open_regular_file",
    "parse_json_doc",
    "read_doc_bytes",
    "read_json_doc",
]

logger = logging.getLogger(__name__)

#: longest integer literal accepted (a signed 64-bit value has at most 20 characters)
MAX_INT_DIGITS = 1000  # what save() accepts (flatten: |v| < 10**1000)
_INT_BOUND = 10**MAX_INT_DIGITS  # integers accepted lie strictly between -bound and bound
#: deepest nesting of arrays/objects accepted; a state skeleton nests as deep as the saved
#: state, and Python's recursion limit (1000) already bounds what a save can write
MAX_JSON_DEPTH = 1000


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _BadValue(f"integer literal of {digits} digits (limit {MAX_INT_DIGITS})")
    return int(text)


def _parse_constant(text: str) -> Any:
    raise _BadValue(f"non-standard constant {text!r} (ckptsvc never writes NaN or Infinity)")


class _BadValue(ValueError):
    """A literal the bounded parser refuses (turned into CorruptCheckpointError)."""


def _check_depth(doc: Any, *, where: str, what: str) -> None:
    """Iterative walk: refuse nesting deeper than ``MAX_JSON_DEPTH`` and integers of more
    than ``MAX_INT_DIGITS`` digits."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children: Any = node.values() if isinstance(node, dict) else node
        if depth > MAX_JSON_DEPTH:
            raise CorruptCheckpointError(
                f"{where}: {what} nests deeper than {MAX_JSON_DEPTH} levels (damaged or hostile "
                "file); resume from another checkpoint"
            )
        for c in children:
            kind = type(c)
            if kind is dict or kind is list:
                stack.append((c, depth + 1))
            elif kind is int and not -_INT_BOUND < c < _INT_BOUND:
                digits = len(str(abs(c)))
                raise CorruptCheckpointError(
                    f"{where}: {what} is not acceptable JSON: integer literal of {digits} "
                    f"digits (limit {MAX_INT_DIGITS})"
                )


def parse_json_doc(
    raw: bytes | bytearray | memoryview, *, where: str, what: str, check_depth: bool = True
) -> Any:
    """Parse a checkpoint document: UTF-8, bounded integers and depth, no NaN/Infinity.

    ``where`` (the file's URL) and ``what`` ("manifest", "index", ...) name it in errors.
    The C decoder runs without per-value Python hooks (Python's own limit bounds the
    digits it converts); the nesting walk after it also refuses integers of more than
    ``MAX_INT_DIGITS`` digits. ``check_depth=False``: the caller validates the whole shape
    and every value of the document itself (a safetensors header), so the walk is skipped;
    the parse itself stays bounded by the interpreter's recursion limit.
    """
    try:
        data = bytes(raw)
        text = data.decode("utf-8")
        if b"NaN" in data or b"Infinity" in data:  # maybe a constant: the hooks decide
            doc = json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)
        else:
            doc = json.loads(text)
    except _BadValue as e:
        raise CorruptCheckpointError(f"{where}: {what} is not acceptable JSON: {e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{where}: {what} is not valid JSON ({e})") from e
    except RecursionError as e:
        raise CorruptCheckpointError(
            f"{where}: {what} nests too deeply to parse (damaged or hostile file)"
        ) from e
    except (ValueError, MemoryError, OverflowError) as e:
        if "integer string conversion" in str(e):  # Python's own digit limit (4300)
            raise CorruptCheckpointError(
                f"{where}: {what} is not acceptable JSON: integer literal of more than "
                f"{MAX_INT_DIGITS} digits ({e})"
            ) from e
        raise CorruptCheckpointError(f"{where}: {what} cannot be parsed ({e})") from e
    if check_depth:
        _check_depth([doc], where=where, what=what)
    return doc


def _too_big(where: str, what: str, nbytes: int | str, cap: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where}: {what} is {nbytes} bytes, over the {cap}-byte limit (CKPTSVC_MAX_JSON_BYTES; "
        "raise it only if you trust the file)"
    )


def open_regular_file(path: str, *, where: str, what: str) -> tuple[int, int]:
    """Open a local checkpoint file for reading without blocking on a FIFO: its
    ``(fd, size)``, the caller closes ``fd``. :class:`StorageNotFoundError` when it does
    not exist, :class:`CorruptCheckpointError` when it is not a regular file (a directory,
    FIFO, device) or cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise StorageNotFoundError(f"{where}: no such file", url=where) from e
    except OSError as e:  # a directory opens fine on Linux; EACCES, ELOOP, ENXIO (socket) ...
        raise CorruptCheckpointError(f"{where}: {what} cannot be opened ({e})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a directory"
                if stat.S_ISDIR(st.st_mode)
                else "a FIFO"
                if stat.S_ISFIFO(st.st_mode)
                else "a device"
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "not a regular file"
            )
            raise CorruptCheckpointError(f"{where}: {what} is {kind}, not a regular file")
    except OSError as e:
        os.close(fd)
        raise CorruptCheckpointError(f"{where}: {what} cannot be stat'ed ({e})") from e
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _read_local(path: str, *, where: str, what: str, cap: int) -> bytes:
    fd, size = open_regular_file(path, where=where, what=what)
    try:
        if size > cap:
            raise _too_big(where, what, size, cap)
        chunks: list[bytes] = []
        total = 0
        while total <= cap:
            chunk = os.read(fd, min(cap + 1 - total, 16 * 2**20))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            raise _too_big(where, what, f"more than {cap}", cap)
        return b"".join(chunks)
    except OSError as e:
        raise CorruptCheckpointError(f"{where}: {what} cannot be read ({e})") from e
    finally:
        os.close(fd)


def read_doc_bytes(loc: Location, *, what: str) -> bytes:
    """The bytes of one document with a bounded read.

    Raises :class:`~ckptsvc.errors.StorageNotFoundError` if it does not exist,
    :class:`CorruptCheckpointError` if it is not a regular file or exceeds the cap.
    """
    cap = int(knobs.MAX_JSON_BYTES.get())
    if loc.is_local:
        return _read_local(loc.path, where=loc.url, what=what, cap=cap)
    # one ranged GET (discovery's cost: one request per manifest), at most cap + 1 bytes;
    # a missing object raises StorageNotFoundError
    raw = loc.read_range(0, cap + 1)
    if len(raw) > cap:
        raise _too_big(loc.url, what, f"more than {cap}", cap)
    return raw


def read_json_doc(loc: Location, *, what: str) -> Any:
    """Read (bounded) and parse (bounded) one JSON document of a checkpoint."""
    return parse_json_doc(read_doc_bytes(loc, what=what), where=loc.url, what=what)


def check_doc_against_manifest(
    raw: bytes, *, rel_path: str, url: str, manifest: Any, what: str
) -> None:
    """Refuse a document whose size or CRC-32C differs from the manifest's record.

    ``manifest`` is a :class:`~ckptsvc.format.manifest.Manifest` or ``None`` (nothing to check;
    likewise a Forgather manifest, which records no files). A file our manifest does not
    list is refused too: it is not part of that commit.
    """
    if manifest is None or not manifest.files:
        return  # no manifest, or one written by Forgather (no file records): nothing to check
    record = manifest.file(rel_path)
    if record is None:
        raise CorruptCheckpointError(
            f"{url}: {what} is not listed in the checkpoint's manifest (it belongs to another "
            "save); resume from an intact checkpoint"
        )
    if len(raw) != record.nbytes:
        raise CorruptCheckpointError(
            f"{url}: {what} is {len(raw)} bytes but the manifest records {record.nbytes} "
            "(replaced or truncated after the commit); resume from an intact checkpoint"
        )
    got = crc32c_hex(raw)
    if got != record.crc32c:
        raise CorruptCheckpointError(
            f"{url}: {what} CRC-32C is {got} but the manifest records {record.crc32c} (damaged "
            "or from another save); resume from an intact checkpoint"
        )
