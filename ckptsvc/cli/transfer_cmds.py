"""The ``ckptsvc cp`` command: copy a checkpoint, or every checkpoint of a run, verified.

:mod:`ckptsvc.cli` registers it with :func:`add_cp_parser`, which binds its handler
(``args.fn``); the handler returns the exit status. Errors propagate to
:func:`ckptsvc.cli.main`, which prints one line and exits 1 (2 for a ``ConfigError``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ckptsvc.cli.common import add_common_options, human_bytes, json_object, positive_int
from ckptsvc.ops.transfer import copy

__all__ = ["add_cp_parser", "cmd_cp"]

CP_EPILOG = """examples:
  ckptsvc cp ./run1/checkpoints/checkpoint-100 s3://bucket/run1/checkpoints/checkpoint-100
  ckptsvc cp s3://bucket/run1 ./run1-copy            # every complete checkpoint of a run
  ckptsvc cp gs://bucket/run1 s3://other/run1 --jobs 8 --json \\
      --dst-storage-options '{"endpoint_url": "http://127.0.0.1:9000"}'

A checkpoint directory is copied to DST (the new checkpoint directory); a model directory
has each complete checkpoint copied to DST/checkpoints/<name> (DST/<name> for the HF
Trainer layout, checkpoint-* directly under the run), oldest first, skipping
incomplete ones and those already at DST. Every file's CRC-32C is checked against the
source manifest before its upload completes; the manifest is written last, so an
interrupted copy leaves nothing that looks complete: run it again to finish.
Exit status: 0 copied or up to date, 2 on error (one line on stderr).
"""


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
        type=positive_int,
        default=None,
        metavar="N",
        help="files copied at once (default: CKPTSVC_IO_THREADS, 4)",
    )
    add_common_options(sp)
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


def cmd_cp(args: argparse.Namespace) -> int:
    opts = json_object(args.storage_options, "--storage-options")
    dst_opts = json_object(args.dst_storage_options, "--dst-storage-options")
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
            print(f"copied {c.src} -> {c.dst} ({c.files} files, {human_bytes(c.nbytes)})")
        else:
            print(f"up to date: {c.dst}")
    for url, why in report.skipped:
        print(f"skipped {url}: {why}")
    rate = report.nbytes_copied / report.elapsed_s if report.elapsed_s > 0 else 0.0
    print(
        f"{sum(c.status == 'copied' for c in report.checkpoints)} checkpoint(s) copied, "
        f"{human_bytes(report.nbytes_copied)} in {report.elapsed_s:.1f} s "
        f"({human_bytes(rate)}/s), every file CRC-32C verified"
    )
    return 0
