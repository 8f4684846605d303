"""``export_hf``: a checkpoint's weights as plain Hugging Face safetensors shards.

A checkpoint saved from FSDP2 / DTensor state stores each rank's local shards
(``model-rank<r>.safetensors``) with global offsets in the component document; HF tools
cannot read that. ``export_hf(src, dst)`` writes ``model-<i>-of-<n>.safetensors`` +
``model.safetensors.index.json`` to ``dst`` by byte-range copying: every output tensor is
assembled a band of rows at a time (``chunk_bytes``, default 64 MiB) from ranged reads of
the stored pieces and streamed into the output shard, so memory stays at one band however
large the model is. Unsharded checkpoints (HF shards already) are re-sharded the same way,
e.g. to another ``max_shard_size``. Sources and destinations are any path or fsspec URL.

Call order: read the manifest and the component document (or the HF index and shard
headers of a checkpoint without one); plan the output shards; stream each shard (header,
then each tensor band by band, CRC-32C on the way; durable on return); publish the index
last. The CLI is ``ckptsvc export-hf SRC DST`` (:func:`add_cli`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ckptsvc import knobs
from ckptsvc.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from ckptsvc.format.layout import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    TensorSpec,
    encode_index,
    make_index,
    plan_files,
    weight_map_of,
)
from ckptsvc.format.manifest import Manifest, check_relpath
from ckptsvc.format.safetensors_stream import DTYPE_SIZES, ShardLayout
from ckptsvc.read.discovery import checkpoint_info, refuse_unloadable
from ckptsvc.read.documents import model_param_sharing, read_document
from ckptsvc.read.loading import read_safetensors_header
from ckptsvc.read.regions import Piece, RegionReader
from ckptsvc.read.weights import load_shard_index
from ckptsvc.stage.parts import MODEL_KEY
from ckptsvc.storage import Location
from ckptsvc.workers.shard_writer import write_shard

__all__ = ["ExportResult", "add_cli", "export_hf"]

logger = logging.getLogger(__name__)

_DEFAULT_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class ExportResult:
    """What ``export_hf`` wrote: the shard files (in order), the index, and the byte count."""

    files: tuple[str, ...]
    index: str
    nbytes: int


@dataclass(frozen=True)
class _Stored:
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


def _from_document(
    src: Location, manifest: Manifest, component: str
) -> tuple[dict[str, _Stored], list[list[str]]] | None:
    rec = next((c for c in manifest.components if c.key == component), None)
    ours = rec.metadata.get("ckptsvc") if rec is not None else None
    if not isinstance(ours, dict) or "" not in (ours.get("instances") or {}):
        return None
    name = ours["instances"][""].get("doc")
    if not name:
        return None
    loc = src.join(check_relpath(name, where=src.url))
    try:  # a JSON file, or the header of the tensor file it is folded into
        doc = read_document(src, name, manifest=manifest)
        out: dict[str, _Stored] = {}
        for fqn, info in doc["tensors"].items():
            shape = tuple(int(x) for x in info["shape"])
            if "pieces" in info:
                pieces = tuple(Piece.from_dict(p, where=loc.url) for p in info["pieces"])
            else:
                pieces = (Piece(str(info["file"]), (0,) * len(shape), shape),)
            out[fqn] = _Stored(str(info["dtype"]), shape, pieces)
        sharing = [list(g) for g in doc.get("param_sharing") or []]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{loc.url}: malformed component document ({e})") from e
    return out, sharing


def _from_hf_index(src: Location) -> tuple[dict[str, _Stored], list[list[str]]]:
    if not src.join(SAFE_WEIGHTS_INDEX_NAME).exists():  # HF's one-file model: no index
        layout, _ = read_safetensors_header(src.join(SAFE_WEIGHTS_NAME))
        piece = {
            e.name: _Stored(
                e.dtype, e.shape, (Piece(SAFE_WEIGHTS_NAME, (0,) * len(e.shape), e.shape),)
            )
            for e in layout.entries
        }
        return piece, model_param_sharing(src, None, file_name=SAFE_WEIGHTS_NAME, layout=layout)
    index = load_shard_index(src.url, SAFE_WEIGHTS_INDEX_NAME, storage_options=src.storage_options)
    out: dict[str, _Stored] = {}
    for fname in sorted(set(index["weight_map"].values())):
        layout, _ = read_safetensors_header(src.join(fname))
        for e in layout.entries:
            out[e.name] = _Stored(e.dtype, e.shape, (Piece(fname, (0,) * len(e.shape), e.shape),))
    order = list(index["weight_map"])
    out = {k: out[k] for k in order if k in out}
    return out, [list(g) for g in index.get("metadata", {}).get("param_sharing") or []]


def _bands(reader_for: Any, name: str, stored: _Stored, chunk_bytes: int) -> Iterator[memoryview]:
    """The tensor's bytes in row-major order, one band of rows at a time."""
    shape = stored.shape
    if math.prod(shape) == 0:
        return
    if not shape:
        bands = [(0, 0)]
    else:
        row_nbytes = math.prod(shape[1:]) * DTYPE_SIZES[stored.dtype]
        rows = max(1, chunk_bytes // max(1, row_nbytes))
        bands = [(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]
    for a, b in bands:
        reader: RegionReader = reader_for()
        if shape:
            t = reader.want(
                name,
                stored.dtype,
                stored.pieces,
                (a, *(0,) * (len(shape) - 1)),
                (b - a, *shape[1:]),
            )
        else:
            t = reader.want(name, stored.dtype, stored.pieces, (), ())
        reader.run()
        import torch

        yield t.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def export_hf(
    src: str,
    dst: str,
    *,
    component: str = MODEL_KEY,
    max_shard_size: int | None = None,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
    metadata: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write ``component``'s tensors of checkpoint ``src`` to ``dst`` as HF shards + index.

    ``dst_storage_options`` default to ``storage_options``. Raises
    :class:`IncompleteCheckpointError` for a save that never committed and
    :class:`CheckpointNotFoundError` when ``src`` holds no such weights.
    """
    src_loc = Location.parse(src, storage_options)
    dst_opts = storage_options if dst_storage_options is None else dst_storage_options
    dst_loc = Location.parse(dst, dst_opts)
    info = checkpoint_info(src_loc)
    refuse_unloadable(info, legacy_ok=True, hint="export a complete one (`ckptsvc ls`)")
    found = _from_document(src_loc, info.manifest, component) if info.manifest else None
    if found is None:
        if component != MODEL_KEY:
            raise CheckpointNotFoundError(f"{src_loc.url} has no component {component!r} to export")
        found = _from_hf_index(src_loc)
    tensors, sharing = found
    specs = [TensorSpec(n, s.dtype, s.shape) for n, s in tensors.items()]
    plans = plan_files(specs, max_shard_size=knobs.MAX_SHARD_SIZE.get(max_shard_size))
    dst_loc.makedirs()
    manifest = info.manifest
    headers: dict[str, ShardLayout] = {}

    def reader() -> RegionReader:
        return RegionReader(src_loc, manifest=manifest, headers=headers)

    def chunks(layout: ShardLayout) -> Iterator[memoryview]:
        for e in layout.entries:
            yield from _bands(reader, e.name, tensors[e.name], chunk_bytes)

    written = 0
    for plan in plans:
        rec = write_shard(
            dst_loc.join(plan.file_name), plan.layout, chunks(plan.layout), rel_path=plan.file_name
        )
        written += rec.nbytes
        logger.info("exported %s (%d bytes)", dst_loc.join(plan.file_name).url, rec.nbytes)
    index = make_index(
        weight_map_of(plans),
        total_size=sum(s.nbytes for s in specs),
        metadata=dict(metadata or {}),
        param_sharing=sharing or None,
    )
    data = encode_index(index)
    dst_loc.join(SAFE_WEIGHTS_INDEX_NAME).publish(data)
    return ExportResult(
        tuple(p.file_name for p in plans), SAFE_WEIGHTS_INDEX_NAME, written + len(data)
    )


def add_cli(subparsers: Any) -> None:
    """Register ``export-hf SRC DST`` on the ``ckptsvc`` command line (``fn`` convention)."""
    p = subparsers.add_parser(
        "export-hf",
        help="write a checkpoint's (sharded) weights as plain Hugging Face safetensors shards",
        description=export_hf.__doc__,
    )
    p.add_argument("src", help="checkpoint directory (path or URL)")
    p.add_argument("dst", help="output directory (path or URL)")
    p.add_argument("--component", default=MODEL_KEY)
    p.add_argument("--max-shard-size", type=int, default=None, help="bytes per output shard")
    p.add_argument("--storage-options", default=None, help="JSON fsspec options for SRC and DST")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_export_hf)


def _cmd_export_hf(args: argparse.Namespace) -> int:
    try:
        opts = json.loads(args.storage_options) if args.storage_options else None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--storage-options is not valid JSON: {e}") from e
    if opts is not None and not isinstance(opts, dict):
        raise ConfigError("--storage-options must be a JSON object")
    result = export_hf(
        args.src, args.dst, component=args.component, max_shard_size=args.max_shard_size,
        storage_options=opts,
    )  # fmt: skip
    if args.json:
        print(
            json.dumps(
                {"files": list(result.files), "index": result.index, "nbytes": result.nbytes}
            )
        )
    else:
        print(
            f"wrote {len(result.files)} shard(s) and {result.index} to {args.dst} ({result.nbytes} bytes)"
        )
    return 0
