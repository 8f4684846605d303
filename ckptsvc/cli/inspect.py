"""The ``ckptsvc`` commands that look at checkpoints without changing them: ``version``,
``ls``, ``inspect`` and ``verify``. :mod:`ckptsvc.cli` registers them; each handler takes the
parsed arguments and returns the exit status."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Any

import torch

from ckptsvc.cli.common import human_bytes, print_table, storage_options
from ckptsvc.read.discovery import (
    CheckpointStatus,
    checkpoint_info,
    list_checkpoints,
)
from ckptsvc.read.loading import check_inside, read_safetensors_header
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.storage import Location
from ckptsvc.version import __version__

__all__ = ["cmd_inspect", "cmd_ls", "cmd_verify", "cmd_version"]


def cmd_version(args: argparse.Namespace) -> int:
    print(
        json.dumps({"ckptsvc": __version__, "torch": torch.__version__})
        if args.json
        else f"ckptsvc {__version__} (torch {torch.__version__})"
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    infos = list_checkpoints(args.root, storage_options=storage_options(args))
    latest = max(
        (i for i in infos if i.status in (CheckpointStatus.COMPLETE, CheckpointStatus.LEGACY)),
        key=lambda i: i.sort_key(),
        default=None,
    )
    rows: list[dict[str, Any]] = []
    for i in infos:
        when = ""
        if i.manifest is not None:
            try:
                when = datetime.fromtimestamp(i.manifest.timestamp_s(), tz=timezone.utc).strftime(
                    "%Y-%m-%d %H:%M:%S"
                )
            except (ValueError, OverflowError, OSError):
                when = "?"  # never a crash for one odd manifest
        rows.append(
            {
                "url": i.url,
                "id": i.checkpoint_id,
                "step": i.step,
                "status": i.status.value,
                "time": when,
                "nbytes": i.manifest.total_nbytes if i.manifest else None,
                "latest": latest is not None and i.url == latest.url,
                "reason": i.reason,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no checkpoints under {args.root}")
    else:
        print_table(
            [
                [
                    r["id"],
                    str(r["step"] if r["step"] is not None else ""),
                    r["status"] + (" (latest)" if r["latest"] else ""),
                    r["time"],
                    human_bytes(r["nbytes"]) if r["nbytes"] is not None else "",
                    r["url"],
                ]
                for r in rows
            ],
            ["ID", "STEP", "STATUS", "COMMITTED (UTC)", "SIZE", "PATH"],
        )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    ckpt = Location.parse(args.checkpoint, storage_options(args))
    info = checkpoint_info(ckpt)
    files = [c.name for c in ckpt.list_children() if not c.is_dir]
    tensors: list[dict[str, Any]] = []
    for name in sorted(f for f in files if f.endswith(".safetensors")):
        check_inside(ckpt, ckpt.join(name))  # as the loaders do: never follow a link out
        layout, _ = read_safetensors_header(ckpt.join(name))
        tensors += [
            {
                "file": name,
                "name": e.name,
                "dtype": e.dtype,
                "shape": list(e.shape),
                "nbytes": e.nbytes,
            }
            for e in layout.entries
        ]
    m = info.manifest
    doc: dict[str, Any] = {
        "url": ckpt.url,
        "status": info.status.value,
        "step": info.step,
        "timestamp": m.timestamp if m else None,
        "world_size": m.world_size if m else None,
        "components": [c.to_dict() for c in m.components] if m else [],
        "files": [{"path": f.path, "nbytes": f.nbytes, "crc32c": f.crc32c} for f in m.files]
        if m
        else [],
        "tensors": tensors,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"{ckpt.url}: {info.status.value}, step {info.step}, {len(doc['files'])} files, {len(tensors)} tensors"
    )
    for c in doc["components"]:
        print(
            f"  component {c['key']}: {c['sharing_pattern']} ranks={c['ranks']} {human_bytes(c['size_bytes'])}"
        )
    print_table(
        [
            [
                t["name"],
                t["dtype"],
                "x".join(map(str, t["shape"])) or "()",
                human_bytes(t["nbytes"]),
                t["file"],
            ]
            for t in tensors
        ],
        ["TENSOR", "DTYPE", "SHAPE", "SIZE", "FILE"],
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    opts = storage_options(args)
    targets = [args.checkpoint]
    if checkpoint_info(args.checkpoint, storage_options=opts).status is CheckpointStatus.ABSENT:
        found = list_checkpoints(args.checkpoint, storage_options=opts)
        targets = [i.url for i in found] or targets  # a model directory: every checkpoint
    reports = [verify_checkpoint(t, deep=args.deep, storage_options=opts) for t in targets]
    # a save that never committed is reported, but only a damaged commit is a failure
    failed = [r for r in reports if not r.ok and r.status != CheckpointStatus.INCOMPLETE.value]
    if len(reports) == 1 and not reports[0].ok:
        failed = reports
    if args.json:
        doc: Any = reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports]
        print(json.dumps(doc, indent=2))
        return 1 if failed else 0
    mode = "deep (size + CRC-32C + headers)" if args.deep else "shallow (sizes)"
    for r in reports:
        verdict = "OK" if r.ok else "FAILED" if r in failed else "INCOMPLETE (not committed)"
        print(
            f"{r.url}: {verdict} [{r.status}, {mode}, {r.files_checked} files, "
            f"{human_bytes(r.nbytes_checked)}]"
        )
        for p in r.problems:
            print(f"  {p.kind}: {p.path or '-'}: {p.detail}")
    if len(reports) > 1:
        passed = sum(1 for r in reports if r.ok)
        print(f"{len(reports)} checkpoints: {passed} passed, {len(failed)} failed")
    return 1 if failed else 0
