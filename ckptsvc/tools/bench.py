"""``ckptsvc bench``: ckptsvc against the physical floors and the peer libraries, side by side.

One run, one synthetic state (:func:`ckptsvc.tools.bench_probes.make_specs`), every
measurement in a fresh worker process (:mod:`ckptsvc.tools.bench_workloads`). The parent:

1. makes a scratch directory (local, or a prefix under ``--storage URL``);
2. ``--reps`` rounds; in each, for each group (a save and the loads that read what it
   wrote): removes the old artifact and runs ``sync``, runs the save worker, then for
   each load recycles memory (:func:`~ckptsvc.tools.bench_probes.recycle_memory`),
   drops the artifact from the page cache (cold reads) and runs the load worker
   (round-robin: see :func:`run_bench`);
3. aggregates the samples into :class:`~ckptsvc.tools.bench_report.Row`: the fastest rep for
   the floors (noise only adds time), the median for every method; the max peak RSS;
4. computes the issue's target ratios (:mod:`ckptsvc.tools.bench_report`) and prints a table,
   or one JSON document with ``--json``;
5. removes the scratch data (unless ``--keep``).

The ``ckptsvc`` CLI registers the options with :func:`add_parser` (or
:func:`configure_parser`) and calls :func:`run`; :func:`main` parses ``argv`` itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ckptsvc.errors import CheckpointError
from ckptsvc.storage import Location
from ckptsvc.tools.bench_budget import add_budget_options, run_budget
from ckptsvc.tools.bench_common import GiB, parse_size, reap_group, tail_log
from ckptsvc.tools.bench_dcp import DCP_METHODS
from ckptsvc.tools.bench_incremental import add_incremental_options, run_incremental
from ckptsvc.tools.bench_loop import add_loop_options, run_loop
from ckptsvc.tools.bench_many import add_many_options, run_many
from ckptsvc.tools.bench_plot import render_svg
from ckptsvc.tools.bench_probes import (
    WorkerConfig,
    cached_bytes,
    drop_page_cache,
    make_specs,
    recycle_memory,
)
from ckptsvc.tools.bench_remote_save import REMOTE_SAVE_ARTIFACTS, remote_save_targets
from ckptsvc.tools.bench_report import (
    Row,
    document,
    evaluate_targets,
    format_table,
    print_rich,
    write_json,
)
from ckptsvc.tools.bench_resume import add_resume_options, run_resume
from ckptsvc.tools.bench_workloads import ARTIFACTS

__all__ = ["METHODS", "Method", "add_parser", "configure_parser", "main", "parse_size", "run"]


@dataclass(frozen=True)
class Method:
    """One row of the bench. ``needs``: the save whose artifact this load reads;
    ``leaves``: names under the scratch root that the method creates."""

    name: str
    kind: str  # "floor" | "save" | "load"
    label: str
    needs: str | None = None
    leaves: tuple[str, ...] = ()


_A = ARTIFACTS
METHODS: tuple[Method, ...] = (
    Method("memcpy", "floor", "memcpy floor (pre-touched)"),
    Method("raw_write", "floor", "raw write floor", leaves=(_A["raw_write"],)),
    Method(
        "raw_write_direct", "floor", "raw write floor (O_DIRECT)", leaves=(_A["raw_write_direct"],)
    ),
    Method("raw_read", "floor", "raw read floor", needs="raw_write"),
    Method("s3fs_put", "floor", "s3fs put, one object", leaves=(REMOTE_SAVE_ARTIFACTS["s3fs_put"],)),
    Method("raw_read_direct", "floor", "raw read floor (O_DIRECT)", needs="raw_write"),
    Method("raw_read_mapped", "floor", "raw read floor (mapped)", needs="raw_write"),
    Method(
        "raw_write_objects",
        "floor",
        "raw put, 4 objects in parallel",
        leaves=(_A["raw_write_objects"],),
    ),
    Method(
        "raw_read_objects", "floor", "raw get, 4 objects in parallel", needs="raw_write_objects"
    ),
    Method("torch_save", "save", "torch.save", leaves=(_A["torch_save"],)),
    Method("safetensors_save", "save", "safetensors save_file", leaves=(_A["safetensors_save"],)),
    Method("dcp_save", "save", "DCP save", leaves=(_A["dcp_save"],)),
    Method("dcp_async", "save", "DCP async_save", leaves=("dcp_async", "dcp_async_warmup")),
    Method("ckptsvc_save", "save", "ckptsvc save_checkpoint", leaves=(_A["ckptsvc_save"],)),
    Method("ckptsvc_async", "save", "ckptsvc AsyncCheckpointer", leaves=("ckptsvc_async",)),
    Method(
        "ckptsvc_async_reserved", "save", "ckptsvc AsyncCheckpointer, reserve() first",
        leaves=("ckptsvc_async_reserved",),
    ),
    Method(
        "ckptsvc_dcp_save", "save", "DCP save, ckptsvc StorageWriter",
        leaves=(_A["ckptsvc_dcp_save"],),
    ),
    Method(
        "ckptsvc_dcp_async", "save", "DCP async_save, ckptsvc StorageWriter",
        leaves=("ckptsvc_dcp_async", "ckptsvc_dcp_async_warmup"),
    ),
    Method("torch_load", "load", "torch.load", needs="torch_save"),
    Method("safetensors_load", "load", "safetensors load_file", needs="safetensors_save"),
    Method("dcp_load", "load", "DCP load (in place)", needs="dcp_save"),
    Method("ckptsvc_load", "load", "ckptsvc load_checkpoint", needs="ckptsvc_save"),
    Method(
        "ckptsvc_dcp_load", "load", "DCP load, ckptsvc StorageReader", needs="ckptsvc_dcp_save"
    ),
)  # fmt: skip
_BY_NAME = {m.name: m for m in METHODS}
#: floors a run without ``--only`` leaves out where they do not apply (with ``--only`` they
#: report "unavailable" instead)
OBJECT_STORE_ONLY = frozenset({"raw_write_objects", "raw_read_objects", "s3fs_put"})
LOCAL_ONLY = frozenset({"raw_read_direct", "raw_read_mapped"})


# ---------------------------------------------------------------------------- running
@dataclass(frozen=True)
class _Plan:
    total_nbytes: int
    reps: int
    root: str
    local_dir: str
    remote: bool
    storage_options: dict[str, Any]
    cold_reads: bool
    timeout_s: float
    dcp_threads: int
    keep: bool
    worker_tmp: str  # TMPDIR of the workers: short, for AF_UNIX socket paths under it
    tensors: int = 0  # --tensors N: N tensors of 16 floats instead of --size's mix


class _Runner:
    """Runs workers and keeps the scratch area clean; see the module docstring for order."""

    def __init__(self, plan: _Plan, progress: Callable[[str], None]) -> None:
        self.plan = plan
        self.progress = progress
        self._count = 0
        self._recycle_path = os.path.join(plan.local_dir, "recycle.bin")

    def _remove(self, name: str) -> None:
        if self.plan.remote:
            Location.parse(f"{self.plan.root}/{name}", self.plan.storage_options).remove(
                recursive=True
            )
            return
        path = os.path.join(self.plan.root, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)

    def _worker(self, method: str) -> dict[str, Any]:
        self._count += 1
        tag = f"{self._count:03d}-{method}"
        result_path = os.path.join(self.plan.local_dir, f"{tag}.json")
        log_path = os.path.join(self.plan.local_dir, f"{tag}.log")
        cfg = WorkerConfig(
            method=method, total_nbytes=self.plan.total_nbytes, root=self.plan.root,
            local_dir=self.plan.local_dir, result_path=result_path,
            storage_options=self.plan.storage_options, remote=self.plan.remote,
            dcp_threads=self.plan.dcp_threads, tensors=self.plan.tensors,
        )  # fmt: skip
        module = "bench_dcp" if method in DCP_METHODS else "bench_workloads"
        cmd = [sys.executable, "-m", f"ckptsvc.tools.{module}", cfg.to_json()]
        # the worker leaves with os._exit: temp dirs of its libraries (multiprocessing's
        # pymp-* with sockets) go to a temp dir of ours, removed at the end
        env = dict(os.environ, TMPDIR=self.plan.worker_tmp)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
            try:
                rc = proc.wait(timeout=self.plan.timeout_s)
            except subprocess.TimeoutExpired:
                rc = None
            reap_group(proc.pid, grace_s=10.0 if rc is not None else 0.0)
            proc.wait()
        if rc is None:
            return {
                "status": "error",
                "reason": f"timed out after {self.plan.timeout_s:.0f} s",
                "log_tail": tail_log(log_path),
            }
        try:
            with open(result_path) as f:
                result: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            return {
                "status": "error",
                "reason": f"worker exited {rc} without a result: {tail_log(log_path)}",
            }
        if result.get("status") == "error":
            result["log_tail"] = tail_log(log_path)
        return result

    def measure(self, method: Method, *, rep: int, reps: int) -> dict[str, Any]:
        """Run one worker of ``method`` (its ``rep``-th of ``reps``, for the progress line)."""
        cached_before: int | None = None
        if method.needs is None:
            for name in method.leaves:
                self._remove(name)
            os.sync()
        elif not self.plan.remote:
            path = os.path.join(self.plan.root, ARTIFACTS[method.needs or ""])
            if self.plan.cold_reads:
                recycle_memory(self._recycle_path, nbytes=self.plan.total_nbytes)
                drop_page_cache(path)
            cached_before = cached_bytes(path)
        started = time.perf_counter()
        out = self._worker(method.name)
        if out.get("status") == "ok" and cached_before is not None:
            out["sample"]["extras"]["cached_before_bytes"] = cached_before
        took_s = time.perf_counter() - started
        self.progress(f"{method.name} rep {rep + 1}/{reps}: {out['status']} ({took_s:.1f} s)")
        if out.get("status") != "ok":
            self.progress(f"  {out.get('reason', '')}\n  {out.get('log_tail', '')}".rstrip())
        return out

    def cleanup(self, method: Method) -> None:
        for name in method.leaves:
            self._remove(name)


def run_bench(plan: _Plan, selected: Sequence[str], progress: Callable[[str], None]) -> list[Row]:
    """Run the selected methods (and any save a selected load needs) and aggregate them.

    Reps go round-robin: rep ``i`` of every method runs before rep ``i + 1`` of any, so a
    disk that speeds up or slows down over the minutes of a run (shared virtual disks do,
    by 20 % and more) moves the floors and the methods compared with them together. A
    method stops at its first rep that is not ok; a save that only its selected loads need
    runs once, and its artifact stays until the last round."""
    runner = _Runner(plan, progress)
    wanted = set(selected)
    groups: list[tuple[Method, list[Method]]] = []
    for method in METHODS:
        loads = [m for m in METHODS if m.needs == method.name and m.name in wanted]
        if method.needs is None and (method.name in wanted or loads):
            groups.append((method, loads))
    outcomes: dict[str, list[dict[str, Any]]] = {
        m.name: [] for save, loads in groups for m in (save, *loads)
    }

    def still_ok(name: str) -> bool:
        return all(o.get("status") == "ok" for o in outcomes[name])

    for rep in range(plan.reps):
        for save, loads in groups:
            reps = plan.reps if save.name in wanted else 1
            if rep < reps and still_ok(save.name):
                outcomes[save.name].append(runner.measure(save, rep=rep, reps=reps))
            last = outcomes[save.name][-1]
            for load in loads:
                if last.get("status") != "ok":
                    why = last.get("reason", "")
                    outcomes[load.name] = [
                        {"status": "unavailable", "reason": f"needs {save.name}: {why}"}
                    ]
                elif still_ok(load.name):
                    outcomes[load.name].append(runner.measure(load, rep=rep, reps=plan.reps))
            if not plan.keep and (reps > 1 or rep == plan.reps - 1):
                runner.cleanup(save)
    return [_aggregate(m, outcomes[m.name]) for m in METHODS if m.name in wanted]


def _aggregate(method: Method, outcomes: list[dict[str, Any]]) -> Row:
    samples = [o["sample"] for o in outcomes if o.get("status") == "ok"]
    failed = [o for o in outcomes if o.get("status") != "ok"]
    if not samples:
        status = failed[-1].get("status", "error") if failed else "error"
        return Row(
            method.name, method.kind, method.label, status, reason=str(failed[-1].get("reason", ""))
        )
    if method.kind == "floor":  # a floor is the best the machine did: noise only adds time
        typical = min(samples, key=lambda s: s["durable_s"])
        blocking, durable = typical["blocking_s"], typical["durable_s"]
    else:
        durable = statistics.median(s["durable_s"] for s in samples)
        blocking = statistics.median(s["blocking_s"] for s in samples)
        typical = min(samples, key=lambda s: abs(s["durable_s"] - durable))
    nbytes = int(samples[0]["nbytes"])
    return Row(
        method.name, method.kind, method.label, "ok",
        reason=f"rep failed: {failed[-1].get('reason', '')}" if failed else "",
        nbytes=nbytes,
        blocking_s=blocking,
        durable_s=durable,
        gb_per_s=nbytes / durable / 1e9 if durable > 0 else None,
        rss_extra_bytes=max(s["rss_peak_bytes"] - s["rss_base_bytes"] for s in samples),
        child_rss_peak_bytes=max(s["child_rss_peak_bytes"] for s in samples),
        extras=dict(typical.get("extras", {})),
        samples=tuple(samples),
    )  # fmt: skip


# ---------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the bench options to ``parser`` (used by :func:`add_parser` and :func:`main`)."""
    names = ", ".join(m.name for m in METHODS)
    parser.add_argument(
        "--size", default="1GiB", help="state size, e.g. 1GiB, 256MiB (default 1GiB)"
    )
    parser.add_argument(
        "--tensors",
        type=int,
        default=0,
        metavar="N",
        help="N tensors of 16 floats instead of --size's mix (per-tensor costs; ckptsvc "
        "saves them as one component)",
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="runs per method (default 3); times are medians"
    )
    parser.add_argument("--only", default=None, help=f"comma-separated methods: {names}")
    parser.add_argument(
        "--dcp",
        action="store_true",
        help="only torch.distributed.checkpoint: dcp.save, dcp.async_save and dcp.load with "
        "DCP's FileSystemWriter/Reader and with ckptsvc's StorageWriter/Reader",
    )
    parser.add_argument(
        "--dir", default=None, help="local scratch parent directory (default: system temp)"
    )
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="write/read under this URL (s3://, gs://, ...)",
    )
    parser.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help="fsspec options for --storage, as JSON",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="write the results as JSON to PATH (or stdout without PATH, instead of the table)",
    )
    parser.add_argument(
        "--warm-reads", action="store_true", help="do not drop loads' files from the page cache"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch data")
    parser.add_argument(
        "--timeout-s", type=float, default=900.0, help="limit per measurement (default 900)"
    )
    parser.add_argument(
        "--dcp-threads", type=int, default=1, help="DCP FileSystemWriter thread_count (default 1)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_loop_options(parser)
    add_incremental_options(parser)
    add_budget_options(parser)
    add_resume_options(parser)
    add_many_options(parser)
    parser.add_argument(
        "--plot",
        metavar="FILE.svg",
        default=None,
        help="also write the save times (blocking and durable, per method) as an SVG bar chart",
    )
    return parser  # fmt: skip


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on an argparse subparsers object and return its parser; the
    caller binds the handler, e.g. ``add_parser(sub).set_defaults(fn=bench.run)``."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark ckptsvc against memcpy/disk floors, torch.save, safetensors and DCP",
        description=__doc__.split("\n", 1)[0] if __doc__ else None,
    )
    return configure_parser(parser)


def _fail(message: str) -> int:
    print(f"ckptsvc bench: error: {message}", file=sys.stderr)
    return 2


def _plan_from_args(args: argparse.Namespace) -> tuple[_Plan, list[str]]:
    """Validate ``args`` and create the scratch area; ValueError says what is wrong."""
    total_nbytes = parse_size(args.size)
    if total_nbytes < (1 << 20):
        raise ValueError(f"--size {args.size} is too small: use at least 1MiB")
    if args.reps < 1:
        raise ValueError("--reps must be at least 1")
    options = json.loads(args.storage_options) if args.storage_options else {}
    selected = [m.strip() for m in (args.only or "").split(",") if m.strip()]
    if getattr(args, "dcp", False):
        if selected:
            raise ValueError("--dcp selects the DCP methods itself: leave out --only")
        selected = list(DCP_METHODS)
    selected = selected or list(_BY_NAME)
    unknown = [m for m in selected if m not in _BY_NAME]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(_BY_NAME)}"
        )
    remote, parent = False, None
    if args.storage:
        loc = Location.parse(args.storage, options)
        remote, parent = not loc.is_local, loc.path
    if args.tensors < 0:
        raise ValueError("--tensors must be at least 0")
    if not args.only:  # by default only the read floors that apply where the bench runs
        skip = LOCAL_ONLY if remote else OBJECT_STORE_ONLY
        selected = [m for m in selected if m not in skip]
    nbytes = sum(s.nbytes for s in make_specs(total_nbytes, tensors=args.tensors))
    local_dir = tempfile.mkdtemp(prefix="ckptsvc-bench-", dir=args.dir)
    if remote:
        root = f"{args.storage.rstrip('/')}/ckptsvc-bench-{uuid.uuid4().hex[:8]}"
    else:
        root = tempfile.mkdtemp(prefix="ckptsvc-bench-data-", dir=parent or local_dir)
        free = shutil.disk_usage(root).free
        if free < 3 * nbytes + (256 << 20):
            shutil.rmtree(local_dir, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
            raise ValueError(
                f"{root}: {free / GiB:.1f} GiB free, the bench needs {3 * nbytes / GiB:.1f} GiB"
            )
    worker_tmp = tempfile.mkdtemp(prefix="ckptsvc-bench-tmp-")
    plan = _Plan(total_nbytes, args.reps, root, local_dir, remote, options, not args.warm_reads,
                 args.timeout_s, args.dcp_threads, args.keep, worker_tmp, args.tensors)  # fmt: skip
    return plan, selected


def _remove_scratch(plan: _Plan) -> None:
    shutil.rmtree(plan.worker_tmp, ignore_errors=True)
    if plan.keep:
        return
    if plan.remote:
        Location.parse(plan.root, plan.storage_options).remove(recursive=True)
    else:
        shutil.rmtree(plan.root, ignore_errors=True)
    shutil.rmtree(plan.local_dir, ignore_errors=True)


def _emit(args: argparse.Namespace, plan: _Plan, rows: list[Row], started: float) -> None:
    """The table on stdout (unless ``--json`` alone) and the JSON document if asked."""
    targets = evaluate_targets(rows) + remote_save_targets(rows)
    specs = make_specs(plan.total_nbytes, tensors=plan.tensors)
    nbytes = sum(s.nbytes for s in specs)
    where = f"remote {args.storage}" if plan.remote else "local disk"
    mix = "fp32, 16 floats each" if plan.tensors else "bf16 model + fp32 optimizer"
    title = f"ckptsvc bench: {nbytes / GiB:.2f} GiB in {len(specs)} tensors ({mix}), {where}, reps {plan.reps}, {'cold' if plan.cold_reads and not plan.remote else 'warm'} reads"
    if args.json is not None:
        config = {
            "nbytes": nbytes, "ntensors": len(specs), "reps": plan.reps, "remote": plan.remote,
            "root": plan.root, "cold_reads": plan.cold_reads and not plan.remote,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        }  # fmt: skip
        write_json(document(config, rows, targets), args.json)
        if args.json == "-":
            return
    if args.plot:
        with open(args.plot, "w") as f:
            f.write(render_svg(rows, title=title))
    if not (sys.stdout.isatty() and print_rich(rows, targets, title)):
        print(format_table(rows, targets, title))


def run(args: argparse.Namespace) -> int:
    """Run the bench for parsed ``args``. Exit status: 0 ok, 1 a method failed, 2 bad usage."""
    if getattr(args, "loop", False):
        return run_loop(args)
    if getattr(args, "incremental", False):
        return run_incremental(args)
    if getattr(args, "budget", False):
        return run_budget(args)
    if getattr(args, "resume", False):
        return run_resume(args)
    if getattr(args, "many_tensors", 0):
        return run_many(args)
    try:
        plan, selected = _plan_from_args(args)
    except (ValueError, CheckpointError) as e:
        return _fail(str(e))
    progress: Callable[[str], None] = (
        (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    )
    what = f"{plan.tensors} tensors" if plan.tensors else f"{plan.total_nbytes / GiB:.2f} GiB"
    progress(f"ckptsvc bench: {what} under {plan.root}")
    started = time.time()
    try:
        rows = run_bench(plan, selected, progress)
    finally:
        _remove_scratch(plan)
        if plan.keep:
            progress(f"kept the scratch data in {plan.root} and {plan.local_dir}")
    _emit(args, plan, rows, started)
    return 1 if any(r.status == "error" for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m ckptsvc.tools.bench [options]``."""
    parser = configure_parser(argparse.ArgumentParser(prog="ckptsvc bench", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
