"""The Forgather-compatible synchronous checkpoint API, over any fsspec URL.

Same names, signatures and defaults as ``forgather.ml.sharded_checkpoint``; code written
against Forgather runs unchanged after swapping the import. Differences, all fixes:

- saves follow the commit protocol: marker, shards, index, manifest last; a crash
  never leaves something :func:`find_latest_checkpoint` returns;
- shard sizes count tensor bytes, not whole storages;
- tied-parameter names are ordered deterministically;
- the caller's ``metadata`` dict is never mutated;
- errors are :class:`~ckptsvc.errors.CheckpointError` leaves that name the path and key
  (and still subclass the builtins Forgather raised, e.g. ``FileNotFoundError``);
- every function also takes a URL and a keyword-only ``storage_options``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import IO, Any, TypeAlias, cast

import torch
from torch import Tensor, nn

from ckptsvc import knobs
from ckptsvc.commit.target import SaveTarget, check_step, write_claimed
from ckptsvc.errors import (
    CheckpointNotFoundError,
    CommitConflictError,
    ConfigError,
    CorruptCheckpointError,
    InvalidStateError,
    StateMismatchError,
    StorageNotFoundError,
)
from ckptsvc.format.checksum import Crc32c, crc32c_hex
from ckptsvc.format.json_doc import read_json_doc
from ckptsvc.format.layout import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    assign_shards,
    encode_index,
    index_file_name,
    make_index,
)
from ckptsvc.format.manifest import ComponentRecord, FileRecord, Manifest, check_relpath
from ckptsvc.format.safetensors_stream import (
    ShardLayout,
    dtype_from_torch,
    plan_shard,
    tensor_bytes,
)
from ckptsvc.ops.retention import maybe_delete_oldest_checkpoint
from ckptsvc.read.discovery import (
    CheckpointStatus,
    checkpoint_info,
    next_checkpoint_path,
    read_manifest,
    refuse_unloadable,
    validate_checkpoint,
)
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.loading import (
    check_inside,
    read_checked_doc,
    read_safetensors,
    read_safetensors_header,
    read_torch_file,
)
from ckptsvc.stage.tied_params import (
    create_sharing_metadata,
    get_all_fqns,
    id_to_fqn,
    make_cannonical_names,
    map_cannonical_names,
    retie_parameters,
    shared_tensor_groups,
    stored_aliases,
)
from ckptsvc.storage import Location
from ckptsvc.workers.commit import commit_checkpoint, publish_file
from ckptsvc.workers.protocol import WriterOptions
from ckptsvc.workers.shard_writer import ChecksummedWriter, write_shard

__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "CheckpointMeta",
    "ShardIndex",
    "create_pretrained_symlinks",
    "create_sharing_metadata",
    "find_latest_checkpoint",
    "get_all_fqns",
    "get_checkpoint_metadata",
    "id_to_fqn",
    "index_file_name",
    "load_checkpoint",
    "load_checkpoint_metrics",
    "load_shard_index",
    "load_sharded_checkpoint",
    "make_cannonical_names",
    "make_shard_index",
    "map_cannonical_names",
    "maybe_delete_oldest_checkpoint",
    "next_checkpoint_path",
    "retie_parameters",
    "save_checkpoint",
    "save_checkpoint_metrics",
    "save_shard_index",
    "save_sharded_checkpoint",
    "validate_checkpoint",
    "validate_output_dir",
]

logger = logging.getLogger(__name__)

ShardIndex: TypeAlias = dict[str, Any]
SharingMetadataT: TypeAlias = list[list[str]]
StateDictLike: TypeAlias = nn.Module | Mapping[str, Tensor]
METRICS_NAME = "eval_metrics.json"


@dataclass
class CheckpointMeta:
    """Forgather's description of a checkpoint's weight files."""

    file_name: str  # the index if there is one, else the weights file
    is_index: bool
    safetensors: bool


def _state_dict(source: StateDictLike) -> dict[str, Tensor]:
    sd = dict(source.state_dict()) if isinstance(source, nn.Module) else dict(source)
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise InvalidStateError(f"state dict entry {k!r} is {type(v).__name__}, not a tensor")
        if v.device.type == "meta":
            raise InvalidStateError(f"tensor {k!r} is on the meta device and has no data to save")
    return sd


def _dedupe_tied(sd: dict[str, Tensor], sharing: SharingMetadataT) -> dict[str, Tensor]:
    """Drop aliases of tied groups (their canonical name keeps the single copy)."""
    aliases = map_cannonical_names(make_cannonical_names(sd.keys(), sharing))
    return {k: v for k, v in sd.items() if k not in aliases}


# ---------------------------------------------------------------- index


def make_shard_index(
    state_dictionaries: list[dict[str, Tensor]],
    metadata: dict[str, Any] | None = None,
    safetensors: bool = False,
    max_shard_size: int = 2**32,
    param_sharing_metadata: SharingMetadataT | None = None,
) -> ShardIndex:
    """Build an HF index: each state dict gets its own shards, cut at ``max_shard_size``
    tensor bytes. Tensors may be on the meta device (only shapes are used)."""
    groups = [
        [(k, t.numel() * t.element_size()) for k, t in sd.items()] for sd in state_dictionaries
    ]
    weight_map = assign_shards(groups, max_shard_size=max_shard_size, safetensors=safetensors)
    total = sum(n for g in groups for _, n in g)
    return make_index(
        weight_map, total_size=total, metadata=metadata, param_sharing=param_sharing_metadata
    )


def save_shard_index(
    shard_index: ShardIndex,
    output_dir: str,
    index_name: str,
    *,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write an index file atomically (``safetensors`` is accepted and ignored, as in Forgather)."""
    loc = Location.parse(output_dir, storage_options)
    loc.makedirs()
    loc.join(index_name).publish(encode_index(shard_index))


def load_shard_index(
    output_dir: str, index_name: str, *, storage_options: dict[str, Any] | None = None
) -> ShardIndex:
    """Read and validate an index: every file in ``weight_map`` must stay inside the checkpoint."""
    ckpt = Location.parse(output_dir, storage_options)
    return _load_index(ckpt, index_name, manifest=None)


def _load_index(ckpt: Location, index_name: str, *, manifest: Manifest | None) -> ShardIndex:
    """Read (bounded), check against ``manifest`` when given (size and CRC-32C), validate."""
    loc = ckpt.join(check_relpath(index_name, where=ckpt.url))
    doc = read_checked_doc(ckpt, index_name, manifest=manifest, what="index")
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise CorruptCheckpointError(f"{loc.url}: index has no 'weight_map' object")
    for key, fname in doc["weight_map"].items():
        check_relpath(fname, where=f"{loc.url} (key {key!r})")
    meta = doc.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{loc.url}: index 'metadata' is not an object")
    sharing = meta.get("param_sharing")
    if sharing is not None and not (
        isinstance(sharing, list)
        and all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in sharing)
    ):
        raise CorruptCheckpointError(
            f"{loc.url}: index 'metadata.param_sharing' must be a list of lists of names"
        )
    return doc


# ---------------------------------------------------------------- save


def _write_file(
    ckpt: Location, fname: str, part: Mapping[str, Tensor], *, safetensors: bool
) -> FileRecord:
    """Write one shard file (safetensors streamed by our encoder, or ``torch.save``)."""
    loc = ckpt.join(check_relpath(fname, where=ckpt.url))
    if safetensors:
        specs = ((k, dtype_from_torch(t.dtype, name=k), tuple(t.shape)) for k, t in part.items())
        layout = plan_shard(specs, metadata={"format": "pt"})
        chunks = (tensor_bytes(part[e.name]) for e in layout.entries)
        return write_shard(loc, layout, chunks, rel_path=fname)
    out = ChecksummedWriter(loc, rel_path=fname)
    try:
        torch.save({k: v.detach().cpu() for k, v in part.items()}, cast("IO[bytes]", out))
        return out.finish()
    except BaseException:
        out.abort()
        raise


def _write_files(
    ckpt: Location,
    weight_map: Mapping[str, str],
    sd: Mapping[str, Tensor],
    *,
    safetensors: bool,
    io_threads: int,
) -> list[FileRecord]:
    """Write every file of ``weight_map`` that holds tensors of ``sd``, ``io_threads`` at a time."""
    by_file: dict[str, dict[str, Tensor]] = {}
    for k in weight_map:
        if k in sd:
            by_file.setdefault(weight_map[k], {})[k] = sd[k]
    threads = max(1, min(io_threads, len(by_file)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(
            pool.map(
                lambda item: _write_file(ckpt, item[0], item[1], safetensors=safetensors),
                by_file.items(),
            )
        )


def save_checkpoint(
    output_dir: str,
    module: StateDictLike,
    metadata: dict[str, Any] | None = None,
    safetensors: bool = False,
    max_shard_size: int = 2**31,
    debug: bool = False,
    include_param_sharing: bool = True,
    param_sharing_metadata: SharingMetadataT | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    step: int | None = None,
    overwrite: bool = True,
    extra_files: Mapping[str, bytes] | None = None,
    writer_options: WriterOptions | None = None,
) -> None:
    """Save a module or raw state dict as a sharded, committed checkpoint in ``output_dir``.

    ``writer_options`` (fsync, I/O threads, part size, retries, direct I/O; default
    :meth:`WriterOptions.resolve() <ckptsvc.WriterOptions.resolve>` now) apply as they do
    to an ``AsyncCheckpointer``'s saves, here in the calling process.

    ``extra_files`` (relative path -> bytes, e.g. ``config.json``) are written with the
    weights and listed in the manifest, so they are part of the checkpoint.

    Order: claim (exclusive in-progress marker), shard files, index, then
    ``checkpoint_manifest.json`` last (atomic). Tied parameters are stored once and listed
    in ``metadata.param_sharing``. The whole input is validated before a byte is written.
    A committed checkpoint already in ``output_dir`` is replaced (as Forgather does) only
    once the new one committed beside it; if the save fails, the old one is untouched.
    With ``overwrite=False`` a committed ``output_dir`` is a
    :class:`~ckptsvc.errors.CommitConflictError`. Another save in progress to
    ``output_dir`` is always one.
    """
    if step is not None:
        check_step(step)
    sd = _state_dict(module)
    if param_sharing_metadata is None and include_param_sharing:
        groups = create_sharing_metadata(module) if isinstance(module, nn.Module) else []
        groups += [g for g in shared_tensor_groups(sd) if g not in groups]
        param_sharing_metadata = sorted(groups)
    sharing = [list(g) for g in param_sharing_metadata or []]
    to_write = _dedupe_tied(sd, sharing)
    if safetensors:  # validate dtypes before moving a byte
        for k, t in to_write.items():
            dtype_from_torch(t.dtype, name=k)

    if debug:
        for k, t in to_write.items():
            logger.debug("%s: shape=%s dtype=%s", k, tuple(t.shape), t.dtype)
    sizes = [(k, t.numel() * t.element_size()) for k, t in to_write.items()]
    weight_map = assign_shards([sizes], max_shard_size=max_shard_size, safetensors=safetensors)

    options = writer_options or WriterOptions.resolve()
    write_claimed(
        Location.parse(output_dir, storage_options, settings=options.io_settings()),
        overwrite=overwrite,
        write=partial(
            _write_committed,
            weight_map=weight_map,
            to_write=to_write,
            sharing=sharing,
            metadata=metadata,
            step=step,
            safetensors=safetensors,
            extra_files=dict(extra_files or {}),
            io_threads=options.io_threads,
        ),
    )


def _write_committed(
    ckpt: Location,
    target: SaveTarget,
    *,
    weight_map: Mapping[str, str],
    to_write: Mapping[str, Tensor],
    sharing: list[list[str]],
    metadata: dict[str, Any] | None,
    step: int | None,
    safetensors: bool,
    extra_files: dict[str, bytes],
    io_threads: int,
) -> None:
    """``save_checkpoint``'s files, index and manifest in the claimed directory ``ckpt``."""
    records = _write_files(
        ckpt, weight_map, to_write, safetensors=safetensors, io_threads=io_threads
    )
    records += [publish_file(ckpt, name, data) for name, data in sorted(extra_files.items())]
    total = sum(t.numel() * t.element_size() for t in to_write.values())
    index = make_index(
        weight_map, total_size=total, metadata=metadata, param_sharing=sharing or None
    )
    index_name = index_file_name(safetensors)
    records.append(publish_file(ckpt, index_name, encode_index(index)))
    manifest = Manifest.new(
        checkpoint_path=Location.parse(target.path, ckpt.storage_options).url,
        world_size=1,
        step=step,
        files=records,
        components=(
            ComponentRecord(
                key="model",
                sharing_pattern="global",
                ranks=(0,),
                size_bytes=sum(r.nbytes for r in records),
                metadata={"files": sorted(r.path for r in records), "index": index_name},
            ),
        ),
        pytorch_version=torch.__version__,
    )
    commit_checkpoint(ckpt, manifest, claim_id=target.claim_id)


def save_sharded_checkpoint(
    output_dir: str,
    shard_index: ShardIndex,
    module: StateDictLike,
    safetensors: bool = False,
    debug: bool = False,
    *,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write only the shard files of ``shard_index`` that hold tensors of ``module``.

    For multi-process saves where each process owns some shards; it writes no manifest
    (commit the checkpoint separately once every process is done).
    """
    ckpt = Location.parse(output_dir, storage_options)
    ckpt.makedirs()
    sd = _state_dict(module)
    if debug:
        logger.debug(
            "saving %d of %d indexed tensors",
            len(set(sd) & set(shard_index["weight_map"])),
            len(shard_index["weight_map"]),
        )
    _write_files(
        ckpt,
        shard_index["weight_map"],
        sd,
        safetensors=safetensors,
        io_threads=knobs.IO_THREADS.get(),
    )


def validate_output_dir(
    output_dir: str, overwrite: bool = False, *, storage_options: dict[str, Any] | None = None
) -> None:
    """Raise :class:`CommitConflictError` if a checkpoint exists there and ``overwrite`` is False."""
    loc = Location.parse(output_dir, storage_options)
    if loc.exists() and not loc.isdir():
        raise CommitConflictError(f"{loc.url} exists and is not a directory")
    if get_checkpoint_metadata(output_dir, storage_options=storage_options) is not None:
        if not overwrite:
            raise CommitConflictError(
                f"a checkpoint already exists in {loc.url} and overwrite is False"
            )
        logger.warning("checkpoint exists in %s and may be overwritten", loc.url)


# ---------------------------------------------------------------- load


def get_checkpoint_metadata(
    path: str, *, storage_options: dict[str, Any] | None = None
) -> CheckpointMeta | None:
    """Weight-file layout in Forgather's detection order, or ``None``."""
    loc = Location.parse(path, storage_options)
    try:
        names = {c.name for c in loc.list_children()}
    except (StorageNotFoundError, NotADirectoryError):
        return None
    for fname, is_index, is_st in (
        (SAFE_WEIGHTS_INDEX_NAME, True, True),
        (WEIGHTS_INDEX_NAME, True, False),
        (WEIGHTS_NAME, False, False),
        (SAFE_WEIGHTS_NAME, False, True),
    ):
        if fname in names:
            return CheckpointMeta(fname, is_index, is_st)
    return None


def _file_crc(
    loc: Location, layout: ShardLayout, tensors: Mapping[str, Tensor], file_nbytes: int
) -> str:
    """CRC-32C of the whole safetensors file, in file order.

    The header and the tensors already read come from memory; every other byte (tensors
    not asked for by a partial load, gaps between tensors, a tail) is read from the file,
    so a partial load checks the covering file as a whole load does.
    """
    crc = Crc32c()
    crc.update(layout.header)
    cursor = len(layout.header)
    step = max(1, knobs.READ_CHUNK_BYTES.get())

    def read_up_to(end: int) -> None:
        nonlocal cursor
        while cursor < end:
            chunk = loc.read_range(cursor, min(end, cursor + step))
            if not chunk:
                raise CorruptCheckpointError(
                    f"{loc.url}: file ends at byte {cursor}, before {end} (truncated)"
                )
            crc.update(chunk)
            cursor += len(chunk)

    for e in layout.entries:  # sorted by offset, no overlaps (parse_header)
        if not e.nbytes or e.name not in tensors:
            continue
        start = layout.data_offset + e.begin
        read_up_to(start)
        crc.update(tensor_bytes(tensors[e.name]))
        cursor = start + e.nbytes
    read_up_to(file_nbytes)
    return crc.hexdigest()


def _read_file(
    ckpt: Location,
    fname: str,
    *,
    safetensors: bool,
    names: set[str] | None,
    device: str,
    expected: Manifest | None,
) -> dict[str, Tensor]:
    """Tensors ``names`` (all if ``None``) of one file. Every name asked for must be there
    (a stale index is corruption). When the manifest lists the file, its size is checked,
    and its CRC-32C too (bytes not asked for are read as well: a partial read is checked
    against the covering file)."""
    loc = ckpt.join(check_relpath(fname, where=ckpt.url))
    check_inside(ckpt, loc)
    record = expected.file(fname) if expected is not None else None

    def check_size(nbytes: int) -> None:
        if record is not None and nbytes != record.nbytes:
            raise CorruptCheckpointError(
                f"{loc.url}: size {nbytes} differs from the manifest's {record.nbytes} "
                "(truncated or replaced file)"
            )

    try:
        if safetensors:
            layout, file_nbytes = read_safetensors_header(loc)  # one size request per file
            check_size(file_nbytes)
            sd = read_safetensors(loc, names=names, device="cpu", layout=layout)
            if record is not None and _file_crc(loc, layout, sd, file_nbytes) != record.crc32c:
                raise CorruptCheckpointError(
                    f"{loc.url}: CRC-32C differs from the manifest's {record.crc32c} (the file "
                    "was damaged after it was written); resume from an older checkpoint"
                )
        else:
            if record is not None:
                raw = loc.read_bytes()
                check_size(len(raw))
                if crc32c_hex(raw) != record.crc32c:
                    raise CorruptCheckpointError(
                        f"{loc.url}: CRC-32C differs from the manifest's {record.crc32c}"
                    )
            sd = read_torch_file(loc, device="cpu")
    except StorageNotFoundError as e:
        raise CorruptCheckpointError(f"{loc.url}: shard listed in the index is missing") from e
    if names is not None:
        absent = sorted(names - set(sd))
        if absent:
            raise CorruptCheckpointError(
                f"{loc.url}: the index maps {absent[:5]} to this file, which does not hold them "
                "(stale or mismatched index)"
            )
        sd = {k: v for k, v in sd.items() if k in names}
    return sd if torch.device(device).type == "cpu" else {k: v.to(device) for k, v in sd.items()}


def load_sharded_checkpoint(
    model_dir: str,
    shard_index: ShardIndex,
    module: nn.Module | None = None,
    device: str = "cpu",
    safetensors: bool = False,
    strict: bool = True,
    assign: bool = False,
    debug: bool = False,
    keys: set[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> set[str] | dict[str, Tensor]:
    """Load the shards of ``shard_index``.

    With ``module``: load the tensors it has into it (the index may be a superset) and
    return the set of module keys that were not loaded; ``strict`` raises
    :class:`StateMismatchError` for those instead. Without: return the tensors (only
    ``keys`` when given), aliases of tied parameters included.
    """
    ckpt = Location.parse(model_dir, storage_options)
    manifest = read_manifest(ckpt)
    weight_map: dict[str, str] = shard_index["weight_map"]
    sharing: SharingMetadataT = shard_index.get("metadata", {}).get("param_sharing") or []
    if module is None:
        aliases = stored_aliases(sharing, weight_map)
        wanted = set(weight_map) | set(aliases) if keys is None else set(keys)
        need = {aliases.get(k, k) for k in wanted} & set(weight_map)
        result: dict[str, Tensor] = {}
        for fname in sorted({weight_map[k] for k in need}):
            here = {k for k in need if weight_map[k] == fname}
            result.update(
                _read_file(
                    ckpt,
                    fname,
                    safetensors=safetensors,
                    names=here,
                    device=device,
                    expected=manifest,
                )
            )
        for k in sorted(wanted):
            if k not in result and aliases.get(k) in result:
                result[k] = result[aliases[k]]
        return {k: result[k] for k in sorted(result) if k in wanted}

    module_keys = set(module.state_dict().keys())
    groups = sharing + [g for g in create_sharing_metadata(module) if g not in sharing]
    tied_aliases = set(stored_aliases(groups, weight_map))
    missing = sorted(module_keys - set(weight_map) - tied_aliases)
    if strict and missing:
        raise StateMismatchError(
            f"{ckpt.url}: the checkpoint has no entry for {len(missing)} module keys, e.g. {missing[:8]}"
        )
    unloaded = module_keys - tied_aliases
    wanted_keys = module_keys & set(weight_map)
    for fname in sorted({weight_map[k] for k in wanted_keys}):
        here = {k for k in wanted_keys if weight_map[k] == fname}
        part = _read_file(
            ckpt, fname, safetensors=safetensors, names=here, device=device, expected=manifest
        )
        if debug:
            logger.debug("loading %d tensors from %s", len(part), fname)
        result_keys = module.load_state_dict(part, strict=False, assign=assign)
        unloaded -= set(part) - set(result_keys.unexpected_keys)
    if groups:
        retie_parameters(module, groups)
    if unloaded:
        msg = f"{ckpt.url}: these module keys were not found in the shards: {sorted(unloaded)[:8]}"
        if strict:
            raise StateMismatchError(msg)
        logger.warning("%s", msg)
    return unloaded


def load_checkpoint(
    model_dir: str,
    module: nn.Module | None = None,
    device: str = "cpu",
    strict: bool = True,
    assign: bool = False,
    keys: set[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Tensor] | None:
    """Load a checkpoint of any supported layout (sharded or single file, safetensors or
    torch). With ``module``, load into it and return ``None``; else return the tensors.

    Raises :class:`CheckpointNotFoundError` if nothing is there and
    :class:`IncompleteCheckpointError` for a save that never committed.
    """
    ckpt = Location.parse(model_dir, storage_options)
    info = checkpoint_info(ckpt)
    if info.status is not CheckpointStatus.ABSENT:  # ABSENT: the error below names layouts
        refuse_unloadable(info, legacy_ok=True)
    meta = get_checkpoint_metadata(ckpt.url, storage_options=storage_options)
    if meta is None and info.manifest is not None and info.manifest.components:
        component_keys = sorted(c.key for c in info.manifest.components)
        raise CheckpointNotFoundError(
            f"{ckpt.url} holds state components {component_keys} saved by save_components, not an HF "
            "weights layout: restore it with ckptsvc.load_components(...), or write plain HF "
            "shards with `ckptsvc export-hf SRC DST`"
        )
    if meta is None:
        raise CheckpointNotFoundError(
            f"no checkpoint in {ckpt.url}: expected one of {SAFE_WEIGHTS_INDEX_NAME}, "
            f"{WEIGHTS_INDEX_NAME}, {WEIGHTS_NAME} or {SAFE_WEIGHTS_NAME}"
        )
    if meta.is_index:
        index = _load_index(ckpt, meta.file_name, manifest=info.manifest)
    else:
        sd = _read_file(
            ckpt,
            meta.file_name,
            safetensors=meta.safetensors,
            names=None,
            device=device,
            expected=info.manifest,
        )
        index = {"metadata": {}, "weight_map": dict.fromkeys(sd, meta.file_name)}
    result = load_sharded_checkpoint(
        ckpt.url, index, module, device=device, safetensors=meta.safetensors,
        strict=strict, assign=assign, keys=keys, storage_options=storage_options,
    )  # fmt: skip
    return None if module is not None else result  # type: ignore[return-value]


# ---------------------------------------------------------------- metrics and symlinks


def save_checkpoint_metrics(
    checkpoint_path: str,
    metrics: dict[str, float],
    *,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write ``eval_metrics.json`` into the checkpoint (atomically)."""
    loc = Location.parse(checkpoint_path, storage_options)
    loc.makedirs()
    loc.join(METRICS_NAME).publish(json.dumps(metrics, indent=2).encode())


def load_checkpoint_metrics(
    checkpoint_path: str, *, storage_options: dict[str, Any] | None = None
) -> dict[str, float] | None:
    """The checkpoint's ``eval_metrics.json``, or ``None``."""
    loc = Location.parse(checkpoint_path, storage_options).join(METRICS_NAME)
    try:
        data = read_json_doc(loc, what="metrics")
    except StorageNotFoundError:
        return None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{loc.url}: metrics file is not a JSON object")
    return data


def create_pretrained_symlinks(
    model_dir: str, force_overwrite: bool = False, dry_run: bool = False
) -> list[str]:
    """Symlink the latest checkpoint's weight files into ``model_dir`` (local disk only),
    so ``from_pretrained(model_dir)`` loads them. Returns the links (to be) created."""
    if "://" in model_dir and not model_dir.startswith("file://"):
        raise ConfigError(f"create_pretrained_symlinks needs a local directory, not {model_dir}")
    latest = find_latest_checkpoint(model_dir)
    if not latest:
        raise CheckpointNotFoundError(f"no complete checkpoint under {model_dir}")
    meta = get_checkpoint_metadata(latest)
    if meta is None:
        raise CheckpointNotFoundError(f"{latest} has no weight files")
    names = [meta.file_name]
    if meta.is_index:
        names += sorted(set(load_shard_index(latest, meta.file_name)["weight_map"].values()))
    links = []
    for name in names:
        link = os.path.join(model_dir, name)
        target = os.path.join(latest, name)
        if os.path.lexists(link) and not os.path.islink(link) and not force_overwrite:
            raise CommitConflictError(
                f"{link} exists and is not a symlink; pass force_overwrite=True"
            )
        links.append(link)
        if dry_run:
            logger.info("would link %s -> %s", link, target)
            continue
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(target, model_dir), link)
    return links
