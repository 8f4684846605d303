"""Our own safetensors encoder and decoder, built for streaming.

File layout (the reference format, byte for byte compatible):

    [8-byte little-endian N][N bytes of JSON header, space-padded to a multiple of 8][data]

Shards with at least ``PAGE_ALIGN_MIN_DATA_BYTES`` of data pad the header further (spaces,
which every reader accepts) so that the data section starts at a 4 KiB boundary of the
file: the node writer then writes it with ``O_DIRECT`` straight from the page-aligned
staging arena, without a bounce copy, and memory-mapping readers get page-aligned tensors.

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the start of the data section) plus an optional
``"__metadata__": {str: str}``. Tensors are laid out without holes, ordered by dtype size
(largest first) and then by name, as the reference writer does, so every tensor is
naturally aligned.

Writing never goes through ``safetensors.save_file``: :func:`plan_shard` computes the
header once, and the caller streams the header and then each tensor's raw bytes from
wherever they live (the tensor itself, or a shared-memory staging arena).

Reading parses the header with a bounded read and validates it completely (lengths,
dtypes, shapes, overlapping or out-of-range offsets) before any tensor byte is touched.

Torch-free (the node writer imports it); the torch side is :mod:`ckptsvc.stage.tensors`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptsvc import knobs
from ckptsvc.errors import CorruptCheckpointError, InvalidStateError
from ckptsvc.format.json_doc import parse_json_doc
from ckptsvc.gc_pause import with_gc_paused

__all__ = [
    "DTYPE_SIZES",
    "ShardLayout",
    "TensorEntry",
    "parse_header",
    "plan_shard",
    "with_metadata",
]

#: safetensors dtype name -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "I64": 8, "U64": 8, "C64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
}  # fmt: skip

TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}  # fmt: skip

_LEN = struct.Struct("<Q")
#: most dimensions a stored tensor may have (torch allows 64)
MAX_NDIM = 64
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a shard: offsets are relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class ShardLayout:
    """A shard's header bytes and where each tensor lives in the file (immutable).

    Pickled (the node writer's jobs) as the header, metadata and data size only: the
    writer needs no entry, and 100,000 entries cost 0.4 s to pickle on the training thread.
    ``entries`` of such a copy are parsed from the header on first use.
    """

    __slots__ = ("_by_name", "_data_nbytes", "_entries", "header", "metadata")

    header: bytes
    metadata: Mapping[str, str] | None
    _entries: tuple[TensorEntry, ...] | None
    _data_nbytes: int | None
    _by_name: dict[str, TensorEntry] | None

    def __init__(
        self,
        header: bytes,
        entries: tuple[TensorEntry, ...] | None = None,
        metadata: Mapping[str, str] | None = None,
        data_nbytes: int | None = None,
    ) -> None:
        if entries is None and data_nbytes is None:
            raise ValueError("ShardLayout needs its entries or its data size")
        object.__setattr__(self, "header", header)
        object.__setattr__(self, "metadata", metadata)
        object.__setattr__(self, "_entries", entries)
        if data_nbytes is None and entries is not None:
            data_nbytes = entries[-1].end if entries else 0
        object.__setattr__(self, "_data_nbytes", data_nbytes)
        object.__setattr__(self, "_by_name", None)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ShardLayout is immutable (setting {name!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (ShardLayout, (self.header, None, self.metadata, self._data_nbytes))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardLayout):
            return NotImplemented
        return self.header == other.header and self.metadata == other.metadata

    def __hash__(self) -> int:
        return hash(self.header)

    def __repr__(self) -> str:
        return f"ShardLayout({len(self.header)}-byte header, {self.data_nbytes} data bytes)"

    @property
    def entries(self) -> tuple[TensorEntry, ...]:
        """Every tensor in data-offset order (parsed from the header if not kept)."""
        if self._entries is None:
            parsed = parse_header(self.header, file_nbytes=None, where="shard header")
            object.__setattr__(self, "_entries", parsed.entries)
        return self._entries or ()

    @property
    def data_offset(self) -> int:
        """Byte offset in the file where the data section (tensor 0) starts."""
        return len(self.header)

    @property
    def data_nbytes(self) -> int:
        return int(self._data_nbytes or 0)

    @property
    def file_nbytes(self) -> int:
        return self.data_offset + self.data_nbytes

    @property
    def by_name(self) -> dict[str, TensorEntry]:
        """Entries by tensor name (built on first use)."""
        if self._by_name is None:
            object.__setattr__(self, "_by_name", {e.name: e for e in self.entries})
        return self._by_name or {}

    def entry(self, name: str) -> TensorEntry:
        """The entry of tensor ``name``; ``KeyError`` if the shard has none."""
        return self.by_name[name]


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    out = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidStateError(
                f"safetensors __metadata__ must map str to str; got {k!r}: {type(v).__name__}"
            )
        out[k] = v
    return out


#: shards with at least this much data start it at a ``PAGE_ALIGN_BYTES`` file offset
PAGE_ALIGN_MIN_DATA_BYTES = 2**20
PAGE_ALIGN_BYTES = 4096


def plan_shard(
    specs: Iterable[tuple[str, str, Sequence[int]]],
    *,
    metadata: Mapping[str, str] | None = None,
) -> ShardLayout:
    """Lay out tensors given as ``(name, safetensors dtype, shape)`` and encode the header.

    Order: dtype size descending, then name (the reference writer's order). Raises
    :class:`InvalidStateError` for duplicate names, unknown dtypes or bad shapes.
    """
    items = []
    seen: set[str] = set()
    for name, dtype, shape in specs:
        if not isinstance(name, str) or not name or name == METADATA_KEY:
            raise InvalidStateError(f"invalid tensor name {name!r}")
        if name in seen:
            raise InvalidStateError(f"tensor name {name!r} appears twice in one shard")
        seen.add(name)
        if dtype not in DTYPE_SIZES:
            raise InvalidStateError(f"tensor {name!r}: dtype {dtype!r} has no safetensors form")
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise InvalidStateError(f"tensor {name!r}: negative dimension in shape {dims}")
        items.append((name, dtype, dims))
    items.sort(key=lambda it: (-DTYPE_SIZES[it[1]], it[0]))

    entries = []
    offset = 0
    for name, dtype, dims in items:
        nbytes = math.prod(dims) * DTYPE_SIZES[dtype]
        entries.append(TensorEntry(name, dtype, dims, offset, offset + nbytes))
        offset += nbytes

    meta = _check_metadata(metadata)
    doc: dict[str, Any] = {}
    if meta:
        doc[METADATA_KEY] = meta
    for e in entries:
        doc[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return ShardLayout(header=_padded(body, offset), entries=tuple(entries), metadata=meta)


def _padded(body: bytes, data_nbytes: int) -> bytes:
    """The length prefix + ``body`` space-padded so the data starts aligned."""
    align = PAGE_ALIGN_BYTES if data_nbytes >= PAGE_ALIGN_MIN_DATA_BYTES else 8
    body += b" " * (-(8 + len(body)) % align)
    return _LEN.pack(len(body)) + body


def _metadata_json(meta: Mapping[str, str]) -> bytes:
    return json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def with_metadata(layout: ShardLayout, metadata: Mapping[str, str]) -> ShardLayout:
    """``layout`` (made by :func:`plan_shard` with a non-empty ``metadata``) with
    ``__metadata__`` replaced by ``metadata``: the same tensors at the same data offsets,
    only the header's JSON changes (its length too). Costs O(header bytes), no per-tensor
    work: what a save does each time a document carried in the header changes."""
    meta = _check_metadata(metadata)
    if not layout.metadata or not meta:
        raise ValueError("with_metadata needs a layout and new metadata that both have some")
    head = b'{"' + METADATA_KEY.encode() + b'":' + _metadata_json(layout.metadata)
    body = layout.header[8:].rstrip(b" ")
    if not body.startswith(head):
        raise ValueError("with_metadata needs a header made by plan_shard")
    new_head = b'{"' + METADATA_KEY.encode() + b'":' + _metadata_json(meta)
    header = _padded(new_head + body[len(head) :], layout.data_nbytes)
    return ShardLayout(header=header, entries=layout._entries, metadata=meta,
                       data_nbytes=layout.data_nbytes)  # fmt: skip


def header_length(prefix: bytes, *, file_nbytes: int | None, where: str) -> int:
    """Validate the 8-byte prefix of a safetensors file and return the header length."""
    if len(prefix) < 8:
        raise CorruptCheckpointError(
            f"{where}: file is {len(prefix)} bytes, too short for safetensors"
        )
    (n,) = _LEN.unpack_from(prefix)
    limit = knobs.MAX_HEADER_BYTES.get()
    if n > limit:
        raise CorruptCheckpointError(
            f"{where}: safetensors header claims {n} bytes (limit {limit}; raise "
            f"CKPTSVC_MAX_HEADER_BYTES only if you trust the file)"
        )
    if file_nbytes is not None and 8 + n > file_nbytes:
        raise CorruptCheckpointError(
            f"{where}: header length {n} runs past the end of the {file_nbytes}-byte file"
        )
    return int(n)


def _entry_error(name: str, info: Any, where: str) -> CorruptCheckpointError:
    """What is wrong with one tensor entry of a header (the slow, precise check)."""
    key = f"{where}: tensor {name!r}"
    if not name or not isinstance(info, dict):
        return CorruptCheckpointError(f"{key}: entry is not an object")
    dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        return CorruptCheckpointError(f"{key}: unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d < 2**63 for d in shape)
        or math.prod(d for d in shape if d) >= 2**63
    ):
        return CorruptCheckpointError(f"{key}: bad shape {shape!r}")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(type(o) is int and o >= 0 for o in offs)
        or offs[0] > offs[1]
    ):
        return CorruptCheckpointError(f"{key}: bad data_offsets {offs!r}")
    return CorruptCheckpointError(
        f"{key}: data_offsets span {offs[1] - offs[0]} bytes but shape {shape} of "
        f"{dtype} needs {math.prod(shape) * DTYPE_SIZES[dtype]}"
    )


@with_gc_paused
def parse_header(raw: bytes, *, file_nbytes: int | None, where: str) -> ShardLayout:
    """Validate and decode ``raw`` = 8-byte prefix + JSON header of a safetensors file.

    ``file_nbytes`` (when known) bounds every offset. ``where`` names the file in errors.
    """
    n = header_length(raw[:8], file_nbytes=file_nbytes, where=where)
    if len(raw) < 8 + n:
        raise CorruptCheckpointError(f"{where}: header truncated ({len(raw) - 8} of {n} bytes)")

    doc = parse_json_doc(
        raw[8 : 8 + n], where=where, what="safetensors header", check_depth=False
    )  # the shape of every value is checked below
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: safetensors header is not a JSON object")

    meta = doc.pop(METADATA_KEY, None)
    if meta is not None and (
        not isinstance(meta, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise CorruptCheckpointError(f"{where}: __metadata__ must map strings to strings")

    entries = []
    in_order, last = True, (0, 0)
    sizes = DTYPE_SIZES
    prod = math.prod
    for name, info in doc.items():  # hot at 100k tensors: the checks of _entry_error, inlined
        try:
            dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
            begin, end = offs
            dims = tuple(shape)
            ok = (
                name
                and type(begin) is int
                and type(end) is int
                and 0 <= begin <= end
                and type(shape) is list
                and len(dims) <= MAX_NDIM
                and all(type(d) is int and 0 <= d < 2**63 for d in dims)
                and type(offs) is list
                and end - begin == prod(dims) * sizes[dtype]
                # torch's strides must fit in int64
                and (prod(d for d in dims if d) if 0 in dims else end - begin) < 2**63
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise _entry_error(name, info, where)
        entries.append(TensorEntry(name, dtype, dims, begin, end))
        in_order = in_order and (begin > last[0] or (begin == last[0] and end >= last[1]))
        last = (begin, end)

    if not in_order:  # files written by the reference writer are in offset order already
        entries.sort(key=lambda ent: (ent.begin, ent.end))
    cursor = 0
    for ent in entries:
        if ent.begin < cursor:
            raise CorruptCheckpointError(
                f"{where}: tensor {ent.name!r} overlaps the previous tensor"
            )
        cursor = ent.end
    data_nbytes = cursor
    if file_nbytes is not None and 8 + n + data_nbytes > file_nbytes:
        raise CorruptCheckpointError(
            f"{where}: tensors need {8 + n + data_nbytes} bytes but the file has {file_nbytes} "
            "(truncated shard?)"
        )
    return ShardLayout(header=bytes(raw[: 8 + n]), entries=tuple(entries), metadata=meta)


# ---- torch side ------------------------------------------------------------------------------
