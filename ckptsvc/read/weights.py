"""Reading model weights in any supported layout: :func:`load_checkpoint` (Forgather's
loader: sharded or single file, safetensors or torch, into a module or as tensors),
:func:`load_sharded_checkpoint`, the index and metrics files.

Every read is checked: the checkpoint must be loadable (:func:`~ckptsvc.read.discovery.
refuse_unloadable`), every shard matches its manifest record (size and CRC-32C, computed
while reading), and tied names come back as one tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from ckptsvc import knobs
from ckptsvc.errors import (
    CheckpointNotFoundError,
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
)
from ckptsvc.format.manifest import Manifest, check_relpath
from ckptsvc.format.safetensors_stream import ShardLayout
from ckptsvc.read.discovery import (
    CheckpointStatus,
    checkpoint_info,
    read_manifest,
    refuse_unloadable,
    require_checkpoint_path,
)
from ckptsvc.read.loading import (
    check_inside,
    read_checked_doc,
    read_safetensors,
    read_safetensors_header,
    read_torch_file,
)
from ckptsvc.stage.tensors import tensor_bytes
from ckptsvc.stage.tied_params import (
    create_sharing_metadata,
    retie_parameters,
    stored_aliases,
)
from ckptsvc.storage import Location

__all__ = [
    "METRICS_NAME",
    "CheckpointMeta",
    "ShardIndex",
    "SharingMetadataT",
    "StateDictLike",
    "get_checkpoint_metadata",
    "load_checkpoint",
    "load_checkpoint_metrics",
    "load_shard_index",
    "load_sharded_checkpoint",
    "state_dict_of",
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


def state_dict_of(source: StateDictLike) -> dict[str, Tensor]:
    sd = dict(source.state_dict()) if isinstance(source, nn.Module) else dict(source)
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise InvalidStateError(f"state dict entry {k!r} is {type(v).__name__}, not a tensor")
        if v.device.type == "meta":
            raise InvalidStateError(f"tensor {k!r} is on the meta device and has no data to save")
    return sd


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

    Raises :class:`CheckpointNotFoundError` if nothing is there (or ``model_dir`` is
    ``None``: no checkpoint found) and :class:`IncompleteCheckpointError` for a save that
    never committed.
    """
    require_checkpoint_path(model_dir, caller="load_checkpoint")
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
