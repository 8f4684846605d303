"""The ``ckptsvc`` command line: the parser and :func:`main` (the console script).

Every command takes local paths and URLs, prints a human table by default and JSON with
``--json``. A failure of any kind prints one line, ``ckptsvc <command>: error: <cause>``, to
stderr, never a traceback (``ckptsvc --debug ...`` adds it), and exits 1; a usage or
configuration mistake (argparse's, or a ``ConfigError``) exits 2, Ctrl-C 130.

The commands, by job: :mod:`ckptsvc.cli.inspect` (``version``, ``ls``, ``inspect``,
``verify``), :mod:`ckptsvc.cli.maintain` (``gc``, ``prune``), :mod:`ckptsvc.cli.transfer_cmds`
(``cp``), :mod:`ckptsvc.cli.tool_cmds` (``crashtest``, ``demo``), ``bench``
(:mod:`ckptsvc.tools.bench`) and ``export-hf`` (:mod:`ckptsvc.ops.export`);
:mod:`ckptsvc.cli.common` holds what they share.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from ckptsvc.cli.inspect import cmd_inspect, cmd_ls, cmd_verify, cmd_version
from ckptsvc.cli.maintain import add_prune_parser, cmd_gc
from ckptsvc.cli.tool_cmds import cmd_crashtest, cmd_demo
from ckptsvc.cli.transfer_cmds import add_cp_parser
from ckptsvc.errors import CheckpointError, ConfigError
from ckptsvc.ops import export
from ckptsvc.tools import bench, simulate

__all__ = ["main"]

EXAMPLES = """examples:
  ckptsvc demo                                  # train with async checkpoints, resume, verify
  ckptsvc demo --kill-at 180                    # ... and SIGKILL the training mid-run
  ckptsvc ls ./run1                             # checkpoints under ./run1/checkpoints
  ckptsvc ls s3://bucket/run1 --json
  ckptsvc inspect ./run1/checkpoints/checkpoint-100
  ckptsvc verify gs://bucket/run1/checkpoints/checkpoint-100 --deep
"""


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
    add_cp_parser(sub)
    add_prune_parser(sub)
    bench.add_parser(sub).set_defaults(fn=bench.run)
    simulate.add_parser(sub).set_defaults(fn=simulate.run)
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
