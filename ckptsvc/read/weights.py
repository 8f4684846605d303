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

from ckptsvc.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidStateError,
    StateMismatchError,
    StorageNotFoundError,
)
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.format.json_doc import read_json_doc
from ckptsvc.format.layout import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from ckptsvc.format.manifest import Manifest, check_relpath
from ckptsvc.gc_pause import with_gc_paused
from ckptsvc.read.device_read import read_to_device
from ckptsvc.read.discovery import (
    CheckpointStatus,
    checkpoint_info,
    read_manifest,
    refuse_unloadable,
    require_checkpoint_path,
)
from ckptsvc.read.documents import model_param_sharing
from ckptsvc.read.loading import (
    check_inside,
    read_checked_doc,
    read_safetensors_header,
    read_torch_file,
)
from ckptsvc.read.shard_read import ShardRead, read_shard
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
    checked: set[str] = set()  # a few distinct files for many keys: each checked once
    for key, fname in doc["weight_map"].items():
        if type(fname) is str and fname in checked:
            continue
        checked.add(check_relpath(fname, where=f"{loc.url} (key {key!r})"))
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


def _staging_device(device: str, destinations: Mapping[str, Tensor] | None) -> torch.device:
    """Where a shard's bytes go: ``device``, or the one CUDA device a module to fill in
    place lives on (read through pinned staging, not through pageable host memory)."""
    target = torch.device(device)
    if target.type != "cuda" and destinations:
        devices = {v.device for v in destinations.values()}
        if len(devices) == 1 and next(iter(devices)).type == "cuda":
            return next(iter(devices))
    return target


def _read_file(
    ckpt: Location,
    fname: str,
    *,
    safetensors: bool,
    names: set[str] | None,
    device: str,
    expected: Manifest | None,
    destinations: Mapping[str, Tensor] | None = None,
) -> ShardRead:
    """Tensors ``names`` (all if ``None``) of one file. Every name asked for must be there
    (a stale index is corruption). When the manifest lists the file, its size is checked,
    and its CRC-32C too, beside the read (bytes not asked for are read as well: a partial
    read is checked against the covering file). ``destinations``: tensors to fill in
    place (:func:`~ckptsvc.read.shard_read.read_shard`)."""
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
        if safetensors and _staging_device(device, destinations).type == "cuda":
            layout, file_nbytes = read_safetensors_header(loc)
            check_size(file_nbytes)
            entries = [e for e in layout.entries if names is None or e.name in names]
            if names is not None and len(entries) != len(names):
                read_shard(loc, layout, file_nbytes=file_nbytes, names=names)  # names what lacks
            tensors = read_to_device(
                loc, layout, device=_staging_device(device, destinations), file_nbytes=file_nbytes,
                entries=entries, destinations=destinations,
                expected_crc32c=record.crc32c if record is not None else None,
            )  # fmt: skip
            return ShardRead(
                tensors,
                frozenset(k for k, v in tensors.items() if (destinations or {}).get(k) is v),
            )
        if safetensors:
            layout, file_nbytes = read_safetensors_header(loc)  # one size request per file
            check_size(file_nbytes)
            got = read_shard(
                loc, layout, file_nbytes=file_nbytes, names=names, destinations=destinations,
                expected_crc32c=record.crc32c if record is not None else None,
            )  # fmt: skip
        else:
            if record is not None:
                raw = loc.read_bytes()
                check_size(len(raw))
                if crc32c_hex(raw) != record.crc32c:
                    raise CorruptCheckpointError(
                        f"{loc.url}: CRC-32C differs from the manifest's {record.crc32c}"
                    )
            sd = read_torch_file(loc, device="cpu")
            if names is not None:
                absent = sorted(names - set(sd))
                if absent:
                    raise CorruptCheckpointError(
                        f"{loc.url}: the index maps {absent[:5]} to this file, which does not "
                        "hold them (stale or mismatched index)"
                    )
                sd = {k: v for k, v in sd.items() if k in names}
            got = ShardRead(sd, frozenset())
    except StorageNotFoundError as e:
        raise CorruptCheckpointError(f"{loc.url}: shard listed in the index is missing") from e
    if torch.device(device).type == "cpu":
        return got
    return ShardRead(
        {k: v if k in got.in_place else v.to(device) for k, v in got.tensors.items()},
        got.in_place,
    )


@with_gc_paused
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
    return _load_shards(
        ckpt, shard_index, module, manifest=read_manifest(ckpt), device=device,
        safetensors=safetensors, strict=strict, assign=assign, debug=debug, keys=keys,
    )  # fmt: skip


def _in_place_targets(module: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries of ``module.state_dict()`` that are the module's own parameters and
    buffers (not copies made by a hook), for a module without load hooks: where a load may
    write the bytes straight in. Empty when any submodule has a load_state_dict hook."""
    for m in module.modules():
        if m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks:
            return {}
    own = {
        (t.device, t.untyped_storage().data_ptr())
        for t in (*module.parameters(), *module.buffers())
    }
    return {k: v for k, v in state.items() if (v.device, v.untyped_storage().data_ptr()) in own}


def _load_shards(
    ckpt: Location,
    shard_index: ShardIndex,
    module: nn.Module | None,
    *,
    manifest: Manifest | None,
    device: str,
    safetensors: bool,
    strict: bool,
    assign: bool,
    debug: bool,
    keys: set[str] | None,
) -> set[str] | dict[str, Tensor]:
    """:func:`load_sharded_checkpoint` with the manifest already read."""
    weight_map: dict[str, str] = shard_index["weight_map"]
    sharing: SharingMetadataT = shard_index.get("metadata", {}).get("param_sharing") or []
    if module is None:
        aliases = stored_aliases(sharing, weight_map)
        wanted = set(weight_map) | set(aliases) if keys is None else set(keys)
        need = {aliases.get(k, k) for k in wanted} & set(weight_map)
        by_file: dict[str, set[str]] = {}
        for k in need:
            by_file.setdefault(weight_map[k], set()).add(k)
        result: dict[str, Tensor] = {}
        for fname in sorted(by_file):
            result.update(
                _read_file(
                    ckpt, fname, safetensors=safetensors, names=by_file[fname], device=device,
                    expected=manifest,
                ).tensors
            )  # fmt: skip
        for k in sorted(wanted):
            if k not in result and aliases.get(k) in result:
                result[k] = result[aliases[k]]
        return {k: result[k] for k in sorted(result) if k in wanted}

    state = module.state_dict()
    module_keys = set(state)
    groups = sharing + [g for g in create_sharing_metadata(module) if g not in sharing]
    tied_aliases = set(stored_aliases(groups, weight_map))
    missing = sorted(module_keys - set(weight_map) - tied_aliases)
    if strict and missing:
        raise StateMismatchError(
            f"{ckpt.url}: the checkpoint has no entry for {len(missing)} module keys, e.g. {missing[:8]}"
        )
    targets = {} if assign else _in_place_targets(module, state)
    unloaded = module_keys - tied_aliases
    wanted_keys = module_keys & set(weight_map)
    by_file = {}
    for k in wanted_keys:
        by_file.setdefault(weight_map[k], set()).add(k)
    for fname in sorted(by_file):
        got = _read_file(
            ckpt, fname, safetensors=safetensors, names=by_file[fname], device=device,
            expected=manifest, destinations=targets,
        )  # fmt: skip
        if debug:
            logger.debug(
                "loaded %d tensors from %s (%d in place)",
                len(got.tensors),
                fname,
                len(got.in_place),
            )
        rest = {k: v for k, v in got.tensors.items() if k not in got.in_place}
        unexpected: set[str] = set()
        if rest:
            unexpected = set(
                module.load_state_dict(rest, strict=False, assign=assign).unexpected_keys
            )
        unloaded -= set(got.tensors) - unexpected
    if groups:
        retie_parameters(module, groups)
    if unloaded:
        msg = f"{ckpt.url}: these module keys were not found in the shards: {sorted(unloaded)[:8]}"
        if strict:
            raise StateMismatchError(msg)
        logger.warning("%s", msg)
    return unloaded


@with_gc_paused
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
    Tied groups come from the index (``metadata.param_sharing``), or, for a single
    ``model.safetensors`` saved by ckptsvc, from the model's document (in its header).

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
    elif meta.safetensors:  # one file: its header names the tensors (read once, below)
        loc = ckpt.join(meta.file_name)
        check_inside(ckpt, loc)
        try:
            layout, _ = read_safetensors_header(loc)
        except StorageNotFoundError as e:
            raise CorruptCheckpointError(f"{loc.url}: weights file is missing") from e
        sharing = model_param_sharing(
            ckpt, info.manifest, file_name=meta.file_name, layout=layout
        )  # the tied groups an index would list (ckptsvc writes one file without an index)
        index = {
            "metadata": {"param_sharing": sharing} if sharing else {},
            "weight_map": dict.fromkeys(layout.by_name, meta.file_name),
        }
    else:
        sd = _read_file(
            ckpt, meta.file_name, safetensors=False, names=None, device=device,
            expected=info.manifest,
        ).tensors  # fmt: skip
        index = {"metadata": {}, "weight_map": dict.fromkeys(sd, meta.file_name)}
    result = _load_shards(
        ckpt, index, module, manifest=info.manifest, device=device,
        safetensors=meta.safetensors, strict=strict, assign=assign, debug=False, keys=keys,
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
