"""The synchronous save: :func:`save_checkpoint` (Forgather's signature) writes a state
dict or module as HF shards + index + manifest from the calling thread, through the same
claim / shard writer / commit as the async engine (call order: claim the directory,
stream every shard with its CRC-32C, publish the index and extra files, the manifest last,
then swap a replacement in). Also the index, metrics and symlink
helpers of Forgather's API.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import IO, Any, cast

import torch
from torch import Tensor, nn

from ckptsvc import knobs
from ckptsvc.commit.target import SaveTarget, check_step, write_claimed
from ckptsvc.errors import (
    CheckpointNotFoundError,
    CommitConflictError,
    ConfigError,
)
from ckptsvc.format.layout import (
    assign_shards,
    encode_index,
    index_file_name,
    make_index,
)
from ckptsvc.format.manifest import ComponentRecord, FileRecord, Manifest, check_relpath
from ckptsvc.format.safetensors_stream import plan_shard
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.weights import (
    METRICS_NAME,
    ShardIndex,
    SharingMetadataT,
    StateDictLike,
    get_checkpoint_metadata,
    load_shard_index,
    state_dict_of,
)
from ckptsvc.stage.tensors import dtype_from_torch, tensor_bytes
from ckptsvc.stage.tied_params import (
    create_sharing_metadata,
    make_cannonical_names,
    map_cannonical_names,
    shared_tensor_groups,
)
from ckptsvc.storage import Location
from ckptsvc.workers.commit import commit_checkpoint, publish_file
from ckptsvc.workers.latest_pointer import advance_pointer
from ckptsvc.workers.protocol import WriterOptions
from ckptsvc.workers.shard_writer import ChecksummedWriter, write_shard

__all__ = [
    "create_pretrained_symlinks",
    "make_shard_index",
    "save_checkpoint",
    "save_checkpoint_metrics",
    "save_shard_index",
    "save_sharded_checkpoint",
    "validate_output_dir",
]

logger = logging.getLogger(__name__)


def _dedupe_tied(sd: dict[str, Tensor], sharing: SharingMetadataT) -> dict[str, Tensor]:
    """Drop aliases of tied groups (their canonical name keeps the single copy)."""
    aliases = map_cannonical_names(make_cannonical_names(sd.keys(), sharing))
    return {k: v for k, v in sd.items() if k not in aliases}


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


def _write_file(
    ckpt: Location, fname: str, part: Mapping[str, Tensor], *, safetensors: bool
) -> FileRecord:
    """Write one shard file (safetensors streamed by our encoder, or ``torch.save``)."""
    loc = ckpt.join(check_relpath(fname, where=ckpt.url))
    if safetensors:
        specs = ((k, dtype_from_torch(t.dtype, name=k), tuple(t.shape)) for k, t in part.items())
        layout = plan_shard(specs, metadata={"format": "pt"})
        # Not written in place: an O_DIRECT write from the caller's heap pages (scattered
        # in physical memory) can take the device several times the requests of one from
        # the process's bounce slots (huge pages, storage/bounce.py); on the development
        # VM the copy made the save 0.93x the floor instead of 1.2-1.4x (design.md 13).
        # An object store's parts are views of the tensors (stable_source): the caller is
        # blocked until the upload ends, and a copy into fresh part buffers only cost time.
        chunks = (tensor_bytes(part[e.name]) for e in layout.entries)
        return write_shard(loc, layout, chunks, rel_path=fname, stable_source=not loc.is_local)
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
    sd = state_dict_of(module)
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
        # huge-page bounce slots: every byte is copied into them (see _write_file)
        Location.parse(
            output_dir,
            storage_options,
            settings=dataclasses.replace(options.io_settings(), huge_bounce_slots=True),
        ),
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
    """``save_checkpoint``'s files, index and manifest in the claimed directory ``ckpt``.

    The small files (``extra_files``, the index) depend on no shard byte: they are
    published on a side thread while the shards stream, so their fsyncs are off the
    critical path; the manifest waits for both."""
    total = sum(t.numel() * t.element_size() for t in to_write.values())
    index = make_index(
        weight_map, total_size=total, metadata=metadata, param_sharing=sharing or None
    )
    index_name = index_file_name(safetensors)
    small = [*sorted(extra_files.items()), (index_name, encode_index(index))]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptsvc-small-files") as side:
        published = side.submit(lambda: [publish_file(ckpt, n, data) for n, data in small])
        records = _write_files(
            ckpt, weight_map, to_write, safetensors=safetensors, io_threads=io_threads
        )
        records += published.result()
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
    # names the final directory (a replacement is swapped in by the caller; until then the
    # pointer's timestamp does not match and readers list the folder)
    advance_pointer(Location.parse(target.path, ckpt.storage_options), manifest)


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
    sd = state_dict_of(module)
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
