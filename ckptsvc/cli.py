"""The ``ckptsvc`` command line: ``version``, ``ls``, ``inspect``, ``verify``, ``demo``, ``bench``.

Every command takes local paths and URLs, prints a human table by default and JSON with
``--json``. A failure of any kind prints one line, ``ckptsvc <command>: error: <cause>``, to
stderr, never a traceback (``ckptsvc --debug ...`` adds it), and exits 1; a usage or
configuration mistake (argparse's, or a ``ConfigError``) exits 2, Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from ckptsvc.errors import CheckpointError, ConfigError
from ckptsvc.version import __version__

__all__ = ["main"]

EXAMPLES = """examples:
  ckptsvc demo                                  # train with async checkpoints, resume, verify
  ckptsvc demo --kill-at 180                    # ... and SIGKILL the training mid-run
  ckptsvc ls ./run1                             # checkpoints under ./run1/checkpoints
  ckptsvc ls s3://bucket/run1 --json
  ckptsvc inspect ./run1/checkpoints/checkpoint-100
  ckptsvc verify gs://bucket/run1/checkpoints/checkpoint-100 --deep
"""


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    raw = getattr(args, "storage_options", None)
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--storage-options is not valid JSON: {e}") from e
    if not isinstance(opts, dict):
        raise ConfigError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return opts


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


def cmd_version(args: argparse.Namespace) -> int:
    import torch

    print(
        json.dumps({"ckptsvc": __version__, "torch": torch.__version__})
        if args.json
        else f"ckptsvc {__version__} (torch {torch.__version__})"
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from ckptsvc.read.discovery import CheckpointStatus, list_checkpoints

    infos = list_checkpoints(args.root, storage_options=_storage_options(args))
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
        _print_table(
            [
                [
                    r["id"],
                    str(r["step"] if r["step"] is not None else ""),
                    r["status"] + (" (latest)" if r["latest"] else ""),
                    r["time"],
                    _human_bytes(r["nbytes"]) if r["nbytes"] is not None else "",
                    r["url"],
                ]
                for r in rows
            ],
            ["ID", "STEP", "STATUS", "COMMITTED (UTC)", "SIZE", "PATH"],
        )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ckptsvc.read.discovery import checkpoint_info
    from ckptsvc.read.loading import check_inside, read_safetensors_header
    from ckptsvc.storage import Location

    ckpt = Location.parse(args.checkpoint, _storage_options(args))
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
            f"  component {c['key']}: {c['sharing_pattern']} ranks={c['ranks']} {_human_bytes(c['size_bytes'])}"
        )
    _print_table(
        [
            [
                t["name"],
                t["dtype"],
                "x".join(map(str, t["shape"])) or "()",
                _human_bytes(t["nbytes"]),
                t["file"],
            ]
            for t in tensors
        ],
        ["TENSOR", "DTYPE", "SHAPE", "SIZE", "FILE"],
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ckptsvc.read.discovery import CheckpointStatus, checkpoint_info, list_checkpoints
    from ckptsvc.read.verify import verify_checkpoint

    opts = _storage_options(args)
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
            f"{_human_bytes(r.nbytes_checked)}]"
        )
        for p in r.problems:
            print(f"  {p.kind}: {p.path or '-'}: {p.detail}")
    if len(reports) > 1:
        passed = sum(1 for r in reports if r.ok)
        print(f"{len(reports)} checkpoints: {passed} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_gc(args: argparse.Namespace) -> int:
    from ckptsvc.ops.gc import collect_garbage

    report = collect_garbage(
        args.root,
        dry_run=args.dry_run,
        storage_options=_storage_options(args),
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


def cmd_crashtest(args: argparse.Namespace) -> int:
    from ckptsvc.testing.crashtest import PointResult, run_campaign

    opts = _storage_options(args)

    def progress(r: PointResult) -> None:
        if args.json:
            return
        what = r.point.describe() if r.point else "final run (must save)"
        print(f"{'ok  ' if r.ok else 'FAIL'} {what} [{r.seconds:.1f} s]", file=sys.stderr)

    reports = [
        run_campaign(
            url,
            points=args.points,
            seed=args.seed,
            storage_options=opts,
            timeout_s=args.timeout_s,
            on_result=progress,
        )
        for url in args.storage
    ]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for r in reports:
            print(r.summary())
    return 0 if all(r.ok for r in reports) else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from ckptsvc.tools.demo import run_demo

    return run_demo(
        output=args.output,
        steps=args.steps,
        save_every=args.save_every,
        kill_at=args.kill_at,
        storage_options=_storage_options(args),
        progress=not args.no_progress,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ckptsvc",
        description="Asynchronous, crash-consistent PyTorch checkpoints.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    p.add_argument("--debug", action="store_true", help="on a failure, print the traceback too")
    sub = p.add_subparsers(dest="command", required=True)

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help_: str, example: str
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.set_defaults(fn=fn)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.add_argument(
            "--storage-options",
            metavar="JSON",
            help='fsspec options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
        )
        return sp

    add("version", cmd_version, "print the ckptsvc and torch versions", "ckptsvc version")
    add(
        "ls",
        cmd_ls,
        "list checkpoints under ROOT/checkpoints, with status",
        "ckptsvc ls s3://bucket/run1",
    ).add_argument("root", help="model directory (path or URL)")
    sp = add(
        "inspect",
        cmd_inspect,
        "show a checkpoint's components, files and tensors",
        "ckptsvc inspect ./run1/checkpoints/checkpoint-100",
    )
    sp.add_argument("checkpoint", help="checkpoint directory (path or URL)")
    sp = add(
        "verify",
        cmd_verify,
        "check every file's size (and CRC-32C, headers, index and state with --deep) against "
        "the manifest; a model directory verifies each of its checkpoints",
        "ckptsvc verify ./run1/checkpoints/checkpoint-100 --deep",
    )
    sp.add_argument("checkpoint", help="checkpoint or model directory (path or URL)")
    sp.add_argument(
        "--deep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read every byte: CRC-32C, safetensors headers, index keys, state skeleton "
        "(default); --no-deep checks presence and sizes only. Exit status 1 if a committed "
        "checkpoint fails",
    )
    sp = add(
        "gc",
        cmd_gc,
        "reclaim debris under ROOT/checkpoints: saves and deletions that never finished, stray "
        "temp files, unfinished S3 multipart uploads, shared memory of dead processes",
        "ckptsvc gc ./run1 --dry-run",
    )
    sp.add_argument("root", help="model directory (path or URL)")
    sp.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    sp.add_argument(
        "--min-age-s",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep anything younger (guards saves in flight on other hosts; default 0)",
    )
    sp.add_argument(
        "--shared-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also unlink this host's staging arenas of dead processes (default)",
    )
    sp = add(
        "crashtest",
        cmd_crashtest,
        "crash-consistency campaign: kill -9 the trainer / node writer at seeded random points "
        "of real saves (snapshot, streaming, commit, retention) and check that no committed "
        "checkpoint is lost, the latest loads and verifies, and gc reclaims the debris",
        "ckptsvc crashtest --points 120 --storage /tmp/ct --storage s3://bucket/ct",
    )
    sp.add_argument(
        "--storage",
        action="append",
        required=True,
        metavar="URL",
        help="root to run under (a fresh crashtest-<id> directory is made there and removed "
        "if every point passes); repeat for several backends",
    )
    sp.add_argument("--points", type=int, default=120, help="kill points per storage (default 120)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the points (default 0)")
    sp.add_argument(
        "--timeout-s", type=float, default=300.0, help="hang guard per point (default 300)"
    )
    sp.epilog = (
        "example:\n  ckptsvc crashtest --points 120 --storage /tmp/ct --storage s3://bucket/ct\n\n"
        "The test suite runs a seeded sample of about 20 points (tests/test_crash_campaign.py);\n"
        "CKPTSVC_FULL_CRASHTEST=1 pytest tests/test_crash_campaign.py runs the full campaign\n"
        "(120 points on local disk and 120 on the S3 emulator). Exit status 1 if any point fails."
    )
    sp = add(
        "demo",
        cmd_demo,
        "train a small transformer with async checkpoints; optionally SIGKILL it and resume",
        "ckptsvc demo --kill-at 180",
    )
    sp.add_argument(
        "--output",
        default=".",
        help="model directory (path or URL); checkpoints go to OUTPUT/checkpoints (default: .)",
    )
    sp.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    sp.add_argument(
        "--save-every", type=int, default=50, help="checkpoint every N steps (default: 50)"
    )
    sp.add_argument(
        "--kill-at",
        type=int,
        metavar="STEP",
        help="train in a child process that SIGKILLs itself at STEP, resume in a new process "
        "from the latest checkpoint, and compare the loss curve with an uninterrupted run",
    )
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    from ckptsvc import cli_extra
    from ckptsvc.ops import export
    from ckptsvc.tools import bench

    cli_extra.add_cp_parser(sub)
    cli_extra.add_prune_parser(sub)
    bench.add_parser(sub).set_defaults(fn=bench.run)
    export.add_cli(sub)
    return p


def error_line(exc: BaseException) -> str:
    """``exc`` as one line: ckptsvc's messages as they are, others with their type name."""
    text = str(exc) or repr(exc)
    if not isinstance(exc, CheckpointError):
        text = f"{type(exc).__name__}: {text}"
        if not isinstance(exc, (OSError, ValueError)):
            text += " (unexpected; rerun with --debug for the traceback)"
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckptsvc`` console script: the command's exit status; 1 with one
    line on stderr for any failure, 2 for a usage or configuration mistake, 130 on Ctrl-C."""
    args = _parser().parse_args(argv)  # a usage error: argparse's message, exit 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args))
    except BrokenPipeError:  # output piped into `head` and friends
        return 0
    except KeyboardInterrupt:
        print(f"ckptsvc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"ckptsvc {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
