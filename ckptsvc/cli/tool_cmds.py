"""The ``ckptsvc`` commands built on the tools outside the library: ``crashtest`` (the
crash-consistency campaign, :mod:`ckptsvc.testing.crashtest`) and ``demo``
(:mod:`ckptsvc.tools.demo`); ``bench`` registers itself (:func:`ckptsvc.tools.bench.add_parser`).
Each handler returns the exit status."""

from __future__ import annotations

import argparse
import json
import sys

from ckptsvc.cli.common import storage_options
from ckptsvc.testing.crashtest import PointResult, run_campaign
from ckptsvc.tools.demo import run_demo

__all__ = ["cmd_crashtest", "cmd_demo"]


def cmd_crashtest(args: argparse.Namespace) -> int:
    opts = storage_options(args)

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
    return run_demo(
        output=args.output,
        steps=args.steps,
        save_every=args.save_every,
        kill_at=args.kill_at,
        storage_options=storage_options(args),
        progress=not args.no_progress,
    )
