"""The ``ckptsvc cp`` and ``ckptsvc prune`` subcommands.

``cli.py`` registers them with :func:`add_cp_parser` and :func:`add_prune_parser`; each
binds its handler (``args.fn``), which returns the exit status. Errors propagate to
``cli.main``, which prints one line and exits 1 (2 for a ``ConfigError``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ckptsvc.errors import ConfigError

__all__ = ["add_cp_parser", "add_prune_parser", "cmd_cp", "cmd_prune"]

CP_EPILOG = """examples:
  ckptsvc cp ./run1/checkpoints/checkpoint-100 s3://bucket/run1/checkpoints/checkpoint-100
  ckptsvc cp s3://bucket/run1 ./run1-copy            # every complete checkpoint of a run
  ckptsvc cp gs://bucket/run1 s3://other/run1 --jobs 8 --json \\
      --dst-storage-options '{"endpoint_url": "http://127.0.0.1:9000"}'

A checkpoint directory is copied to DST (the new checkpoint directory); a model directory
has each complete checkpoint copied to DST/checkpoints/<name>, oldest first, skipping
incomplete ones and those already at DST. Every file's CRC-32C is checked against the
source manifest before its upload completes; the manifest is written last, so an
interrupted copy leaves nothing that looks complete: run it again to finish.
Exit status: 0 copied or up to date, 2 on error (one line on stderr).
"""

PRUNE_EPILOG = """examples:
  ckptsvc prune ./run1 --keep 3 --dry-run            # show what would go
  ckptsvc prune s3://bucket/run1 --keep 3 --json

Never deleted: the newest complete checkpoint, the best checkpoints a CheckpointManager
recorded, and incomplete directories (saves in flight; `ckptsvc gc` handles debris).
Each delete removes the manifest first, so a crash midway never leaves a torn checkpoint.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _json_object(raw: str | None, flag: str) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object")
    return value


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument(
        "--storage-options",
        metavar="JSON",
        help='fsspec options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )


def add_cp_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``ckptsvc cp SRC DST`` on an argparse subparsers object."""
    sp: argparse.ArgumentParser = subparsers.add_parser(
        "cp",
        help="copy a checkpoint (or every checkpoint of a run) between local disk, S3 and GCS, "
        "in parallel, verifying every file's CRC-32C",
        description="Copy a checkpoint or a model directory's checkpoints, verified, with the "
        "commit protocol on the destination (marker, data, manifest last).",
        epilog=CP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.set_defaults(fn=cmd_cp)
    sp.add_argument("src", help="checkpoint or model directory (path or URL)")
    sp.add_argument("dst", help="destination checkpoint or model directory (path or URL)")
    sp.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="files copied at once (default: CKPTSVC_IO_THREADS, 4)",
    )
    _common(sp)
    sp.add_argument(
        "--dst-storage-options",
        metavar="JSON",
        help="fsspec options for DST (default: those of --storage-options)",
    )
    sp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a different checkpoint already at the destination",
    )
    sp.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    return sp


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
        "--keep", type=_positive_int, required=True, metavar="N", help="checkpoints to keep"
    )
    sp.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    _common(sp)
    return sp


def cmd_cp(args: argparse.Namespace) -> int:
    from ckptsvc.ops.transfer import copy

    opts = _json_object(args.storage_options, "--storage-options")
    dst_opts = _json_object(args.dst_storage_options, "--dst-storage-options")
    show = sys.stderr.isatty() if args.progress is None else args.progress
    bar: Any = None
    if show:
        from tqdm import tqdm

        bar = tqdm(
            total=0,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            desc="ckptsvc cp",
            dynamic_ncols=True,
        )

    def progress(done_nbytes: int, total_nbytes: int) -> None:
        if bar.total != total_nbytes:
            bar.total = total_nbytes
        bar.update(done_nbytes - bar.n)

    try:
        report = copy(
            args.src,
            args.dst,
            jobs=args.jobs,
            storage_options=opts,
            dst_storage_options=dst_opts,
            overwrite=args.overwrite,
            progress=progress if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    for c in report.checkpoints:
        if c.status == "copied":
            print(f"copied {c.src} -> {c.dst} ({c.files} files, {_human_bytes(c.nbytes)})")
        else:
            print(f"up to date: {c.dst}")
    for url, why in report.skipped:
        print(f"skipped {url}: {why}")
    rate = report.nbytes_copied / report.elapsed_s if report.elapsed_s > 0 else 0.0
    print(
        f"{sum(c.status == 'copied' for c in report.checkpoints)} checkpoint(s) copied, "
        f"{_human_bytes(report.nbytes_copied)} in {report.elapsed_s:.1f} s "
        f"({_human_bytes(rate)}/s), every file CRC-32C verified"
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from ckptsvc.ops.transfer import prune

    report = prune(
        args.root,
        keep=args.keep,
        dry_run=args.dry_run,
        storage_options=_json_object(args.storage_options, "--storage-options"),
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
