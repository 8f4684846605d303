"""The ``ckptsvc`` commands that reclaim space: ``gc`` (debris of saves and deletions that
never finished) and ``prune`` (the oldest complete checkpoints). :mod:`ckptsvc.cli` registers
``gc`` and calls :func:`add_prune_parser`; each handler returns the exit status. Errors
propagate to :func:`ckptsvc.cli.main`, which prints one line and exits 1 (2 for a
``ConfigError``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ckptsvc.cli.common import add_common_options, json_object, positive_int, storage_options
from ckptsvc.ops.gc import collect_garbage
from ckptsvc.ops.prune import prune

__all__ = ["add_prune_parser", "cmd_gc", "cmd_prune"]

PRUNE_EPILOG = """examples:
  ckptsvc prune ./run1 --keep 3 --dry-run            # show what would go
  ckptsvc prune s3://bucket/run1 --keep 3 --json

Never deleted: the newest complete checkpoint, the best checkpoints a CheckpointManager
recorded, and incomplete directories (saves in flight; `ckptsvc gc` handles debris).
Each delete removes the manifest first, so a crash midway never leaves a torn checkpoint.
"""


def add_prune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``ckptsvc prune ROOT --keep N`` on an argparse subparsers object."""
    sp: argparse.ArgumentParser = subparsers.add_parser(
        "prune",
        help="delete the oldest checkpoints under ROOT/checkpoints, keeping the newest N",
        description="Keep the newest N checkpoints under ROOT/checkpoints; delete older ones "
        "(manifest first).",
        epilog=PRUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.set_defaults(fn=cmd_prune)
    sp.add_argument("root", help="model directory (path or URL)")
    sp.add_argument(
        "--keep", type=positive_int, required=True, metavar="N", help="checkpoints to keep"
    )
    sp.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    add_common_options(sp)
    return sp


def cmd_gc(args: argparse.Namespace) -> int:
    report = collect_garbage(
        args.root,
        dry_run=args.dry_run,
        storage_options=storage_options(args),
        min_age_s=args.min_age_s,
        shared_memory=args.shared_memory,
    )
    if args.json:
        print(json.dumps({**report.to_dict(), "reclaimed": report.reclaimed}, indent=2))
        return 0
    verb = "would remove" if report.dry_run else "removed"
    for url in report.removed:
        print(f"{verb} {url}")
    for label in report.aborted_uploads:
        print(f"{'would abort' if report.dry_run else 'aborted'} unfinished upload {label}")
    for name in report.reclaimed_segments:
        print(f"{'would unlink' if report.dry_run else 'unlinked'} stale shared memory {name}")
    for url, why in report.kept:
        print(f"kept {url}: {why}")
    print(
        f"gc {report.root}: {verb} {len(report.removed)} checkpoint dirs/files, "
        f"{len(report.aborted_uploads)} uploads, {len(report.reclaimed_segments)} shared-memory "
        f"segments; kept {len(report.kept)}"
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    report = prune(
        args.root,
        keep=args.keep,
        dry_run=args.dry_run,
        storage_options=json_object(args.storage_options, "--storage-options"),
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    verb = "would delete" if report.dry_run else "deleted"
    for url in report.deleted:
        print(f"{verb} {url}")
    for url in report.preserved:
        print(f"kept {url} (best checkpoint)")
    print(
        f"prune {report.root}: {verb} {len(report.deleted)}, kept {len(report.kept)} "
        f"(--keep {report.keep})"
    )
    return 0
