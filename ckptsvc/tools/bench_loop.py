"""``ckptsvc bench --loop``: the step-time cost of checkpointing inside a real training loop.

One small CPU training loop (an MLP trained with AdamW on a fixed batch), run once per
save mode, each in a fresh worker process (:mod:`ckptsvc.tools.bench_loop_worker`) so the modes
do not disturb each other. :func:`run_loop`, in the CLI process:

1. makes a scratch directory; for each mode (the baseline ``none`` first) starts the
   worker, waits for it and then for the processes it left (DCP's daemon), up to a grace
   period, and reads its :class:`~ckptsvc.tools.bench_loop_worker.ModeResult`;
2. removes the mode's checkpoints (unless ``--keep``);
3. compares each mode's median step time with the baseline's (the same loop without
   saves), evaluates the issue's target (overlapped <= 1.05 x baseline, saving every
   step) and prints a table and/or writes the JSON document (``--json``).

Modes: ``none``, ``sync``, ``async``, ``overlapped``, ``dcp_async`` (see the worker).
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

from ckptsvc.tools.bench_common import reap_group, tail_log
from ckptsvc.tools.bench_loop_worker import MODES, LoopConfig, ModeResult, trimmed_mean
from ckptsvc.tools.bench_report import Target, write_json

__all__ = [
    "add_loop_options",
    "evaluate_loop_target",
    "format_loop_table",
    "merge_rounds",
    "run_loop",
    "worker_env",
]

_LABELS = {
    "none": "no saves (baseline)",
    "sync": "ckptsvc save_checkpoint (sync)",
    "async": "ckptsvc AsyncCheckpointer.save",
    "overlapped": "ckptsvc save(overlap=True)",
    "dcp_async": "DCP async_save",
}
OVERLAP_TARGET = 1.05  # issue 9: overlapped step time <= 1.05 x the baseline's


# ---------------------------------------------------------------------------- the parent
def worker_env() -> dict[str, str]:
    """The workers' environment: ours, with OpenMP threads that sleep when idle
    (``OMP_WAIT_POLICY=PASSIVE``) unless the caller chose a policy. Spinning threads make
    a loop's speed depend on whether anything else runs on its cores: a mode that starts
    more threads (copy threads make OpenMP throttle its spinning) would look faster than
    the baseline on a busy machine."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _run_worker(cfg: LoopConfig, *, log_path: str, timeout_s: float) -> ModeResult:
    cmd = [sys.executable, "-m", "ckptsvc.tools.bench_loop_worker", json.dumps(asdict(cfg))]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=worker_env(),
        )  # fmt: skip
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        reap_group(proc.pid, grace_s=10.0 if rc is not None else 0.0)
        proc.wait()
    if rc is None:
        return ModeResult(
            cfg.mode, "error", reason=f"timed out after {timeout_s:.0f} s: {tail_log(log_path)}"
        )
    try:
        with open(cfg.result_path) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return ModeResult(
            cfg.mode, "error", reason=f"worker exited {rc} without a result: {tail_log(log_path)}"
        )
    for key in ("checkpoints", "step_s_samples"):
        raw[key] = tuple(raw.get(key, ()))
    result = ModeResult(**raw)
    if result.status == "error":
        result = ModeResult(result.mode, "error", reason=f"{result.reason} / {tail_log(log_path)}")
    return result


def evaluate_loop_target(results: Sequence[ModeResult]) -> Target:
    """The issue's target: overlapped median step time <= 1.05 x the baseline's."""
    ok = {r.mode: r for r in results if r.status == "ok"}
    formula = "overlapped.step / none.step"
    name = "overlapped save every step vs no saves"
    missing = [m for m in ("overlapped", "none") if m not in ok]
    if missing:
        return Target(
            name, formula, "<=", OVERLAP_TARGET, None, "n/a", f"missing {', '.join(missing)}"
        )
    base, over = ok["none"], ok["overlapped"]
    value = (over.step_s_median or 0.0) / (base.step_s_median or 1.0)
    notes = []
    if "async" in ok:
        notes.append(
            f"non-overlapped async {(ok['async'].step_s_median or 0.0) / (base.step_s_median or 1.0):.3f}"
        )
    if base.compute_s_median is not None and base.copy_s is not None:
        notes.append(f"fwd+bwd {base.compute_s_median:.3f} s vs copy {base.copy_s:.3f} s")
    if over.blocking_s_mean is not None and base.step_s_median:
        held_s = over.blocking_s_mean + (over.fence_wait_s_mean or 0.0)
        every = int(over.extras.get("every", 1))
        notes.append(f"save+fence hold {held_s / every / base.step_s_median:.1%} of a step")
    verdict = "PASS" if value <= OVERLAP_TARGET else "FAIL"
    return Target(name, formula, "<=", OVERLAP_TARGET, value, verdict, "; ".join(notes))


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_loop_table(results: Sequence[ModeResult], target: Target, title: str) -> str:
    """Plain-text report: one line per mode, then the target line."""
    base = next((r.step_s_median for r in results if r.mode == "none" and r.status == "ok"), None)
    header = ("mode", "step s", "overhead %", "blocking s/save", "saves", "fence s", "notes")
    rows = [header]
    for r in results:
        if r.status != "ok":
            rows.append(
                (_LABELS.get(r.mode, r.mode), "-", "-", "-", "-", "-", f"{r.status}: {r.reason}")
            )
            continue
        over = (
            None if base is None or r.step_s_median is None else (r.step_s_median / base - 1) * 100
        )
        notes = [f"drain {r.drain_s:.2f} s"] if r.drain_s is not None else []
        if r.mode == "none":
            notes.append(
                f"fwd+bwd {_num(r.compute_s_median, '.3f')} s, copy {_num(r.copy_s, '.4f')} s"
            )
        if r.extras.get("arena_wait_s_mean") is not None:
            notes.append(f"arena wait {r.extras['arena_wait_s_mean']:.4f} s/save")
        if r.extras.get("snapshot_s_mean") is not None:
            notes.append(f"background copy {r.extras['snapshot_s_mean']:.4f} s/save")
        if "dcp_kind" in r.extras:
            notes.append(str(r.extras["dcp_kind"]))
        rows.append((
            _LABELS.get(r.mode, r.mode), _num(r.step_s_median, ".4f"), _num(over, "+.1f"),
            _num(r.blocking_s_mean, ".4f"), f"{r.saves_completed}/{r.saves_started}",
            _num(r.fence_wait_s_mean, ".4f"), "; ".join(notes),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    out = [title, ""]
    for row in rows:
        cols = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:-1], widths[1:], strict=True)
        ]
        out.append("  ".join([*cols, row[-1]]).rstrip())
    value = "-" if target.value is None else f"{target.value:.3f}"
    out += [
        "",
        "step s: median over the save intervals (--every steps ending with a save; warm-up "
        "excluded) of their mean step time; blocking s/save: mean time the save call held "
        "the loop; saves: durable/started; fence s: mean wait per save in the optimizer "
        "pre-hook for the overlapped copy.",
        "",
        "target (ratio within this run):",
        f"  {target.formula} {target.op} {target.threshold:g}  {value}  {target.verdict}  {target.note}".rstrip(),
    ]
    return "\n".join(out)


def add_loop_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--loop`` and its options to the ``bench`` parser (``--only``, ``--json``,
    ``--dir``, ``--keep``, ``--quiet`` and ``--timeout-s`` are shared with the bench)."""
    group = parser.add_argument_group("training loop (--loop)")
    group.add_argument(
        "--loop", action="store_true",
        help="benchmark step-time overhead of saves in a small CPU training loop instead; "
        f"--only picks modes from {', '.join(MODES)}",
    )  # fmt: skip
    group.add_argument("--steps", type=int, default=30, help="measured steps per mode (default 30)")
    group.add_argument("--warmup", type=int, default=5, help="unmeasured first steps (default 5)")
    group.add_argument("--every", type=int, default=1, help="save every N steps (default 1)")
    group.add_argument(
        "--model-mb",
        type=float,
        default=16.0,
        help="fp32 parameter MiB (default 16; AdamW state doubles it)",
    )
    group.add_argument("--batch", type=int, default=512, help="rows per batch (default 512)")


def _modes(args: argparse.Namespace) -> list[str]:
    """The modes to run, the baseline first (every other mode is compared with it)."""
    modes = [m.strip() for m in (args.only or "").split(",") if m.strip()] or list(MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(
            f"unknown loop mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}"
        )
    if args.steps < 1 or args.warmup < 0 or args.every < 1 or args.batch < 1 or args.model_mb <= 0:
        raise ValueError("--steps, --every and --batch must be >= 1, --warmup >= 0, --model-mb > 0")
    if args.reps < 1:
        raise ValueError("--reps must be at least 1")
    return sorted(dict.fromkeys(modes), key=lambda m: m != "none")


def merge_rounds(rounds: Sequence[ModeResult]) -> ModeResult:
    """One mode's rounds as one result: step times pooled (median over every measured
    step), per-round medians and means combined, saves summed, the best copy time."""
    bad = [r for r in rounds if r.status != "ok"]
    if bad:
        worst = next((r for r in bad if r.status == "error"), bad[0])
        return replace(
            worst,
            reason=f"round {rounds.index(worst) + 1}: {worst.reason}"
            if len(rounds) > 1
            else worst.reason,
        )
    if len(rounds) == 1:
        return rounds[0]

    def med(values: Sequence[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    def mean(values: Sequence[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.fmean(present) if present else None

    samples = tuple(x for r in rounds for x in r.step_s_samples)
    blocking_max = [r.blocking_s_max for r in rounds if r.blocking_s_max is not None]
    copies = [r.copy_s for r in rounds if r.copy_s is not None]
    return replace(
        rounds[0],
        step_s_median=statistics.median(samples),
        step_s_trimmed_mean=trimmed_mean(samples),
        compute_s_median=med([r.compute_s_median for r in rounds]),
        opt_step_s_median=med([r.opt_step_s_median for r in rounds]),
        saves_started=sum(r.saves_started for r in rounds),
        saves_completed=sum(r.saves_completed for r in rounds),
        blocking_s_mean=mean([r.blocking_s_mean for r in rounds]),
        blocking_s_max=max(blocking_max) if blocking_max else None,
        fence_wait_s_mean=mean([r.fence_wait_s_mean for r in rounds]),
        drain_s=med([r.drain_s for r in rounds]),
        copy_s=min(copies) if copies else None,
        checkpoints=tuple(p for r in rounds for p in r.checkpoints),
        step_s_samples=samples,
        extras={**rounds[0].extras, "rounds": len(rounds)},
    )


def _run_rounds(
    args: argparse.Namespace, modes: Sequence[str], root: str, progress: Callable[[str], None]
) -> list[ModeResult]:
    """``--reps`` rounds, each running every mode once in turn (slow drifts of a shared
    machine then touch every mode alike); the rounds of each mode merged."""
    rounds: dict[str, list[ModeResult]] = {m: [] for m in modes}
    for rnd in range(1, args.reps + 1):
        for mode in modes:
            tag = f"{mode}-{rnd}"
            cfg = LoopConfig(
                mode=mode, steps=args.steps, warmup_steps=args.warmup, every=args.every,
                model_mb=args.model_mb, batch=args.batch, root=os.path.join(root, tag),
                result_path=os.path.join(root, f"{tag}.json"),
            )  # fmt: skip
            os.makedirs(cfg.root, exist_ok=True)
            t0 = time.perf_counter()
            log_path = os.path.join(root, f"{tag}.log")
            result = _run_worker(cfg, log_path=log_path, timeout_s=args.timeout_s)
            took_s = time.perf_counter() - t0
            progress(
                f"loop {mode} round {rnd}/{args.reps}: {result.status} ({took_s:.1f} s) {result.reason}".rstrip()
            )
            rounds[mode].append(result)
            if not args.keep:
                shutil.rmtree(cfg.root, ignore_errors=True)
    return [merge_rounds(rounds[m]) for m in modes]


def _emit(args: argparse.Namespace, results: Sequence[ModeResult]) -> None:
    """The JSON document (``--json``) and the table on stdout (unless ``--json -``)."""
    target = evaluate_loop_target(results)
    nbytes = next((r.state_nbytes for r in results if r.status == "ok"), 0)
    title = (
        f"ckptsvc bench --loop: MLP {args.model_mb:g} MiB params + AdamW ({nbytes / (1 << 20):.0f} MiB "
        f"state), batch {args.batch}, {args.steps} steps (+{args.warmup} warm-up) x {args.reps} "
        f"round(s), save every {args.every}, {os.cpu_count()} CPUs, "
        f"OMP_WAIT_POLICY={worker_env()['OMP_WAIT_POLICY']}"
    )
    if args.json is not None:
        doc = {
            "schema": "ckptsvc-bench-loop/1",
            "config": {"steps": args.steps, "warmup": args.warmup, "every": args.every,
                       "model_mb": args.model_mb, "batch": args.batch, "reps": args.reps,
                       "cpu_count": os.cpu_count(),
                       "omp_wait_policy": worker_env()["OMP_WAIT_POLICY"]},
            "modes": [asdict(r) for r in results],
            "target": asdict(target),
        }  # fmt: skip
        write_json(doc, args.json)
    if args.json != "-":
        print(format_loop_table(results, target, title))


def run_loop(args: argparse.Namespace) -> int:
    """``ckptsvc bench --loop``. Exit status: 0 ok, 1 a mode failed, 2 bad usage."""
    progress: Callable[[str], None] = (
        (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    )
    try:
        modes = _modes(args)
    except ValueError as e:
        print(f"ckptsvc bench --loop: {e}", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="ckptsvc-bench-loop-", dir=args.dir)
    try:
        results = _run_rounds(args, modes, root, progress)
    finally:
        if args.keep:
            progress(f"kept the loop's checkpoints and logs in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    _emit(args, results)
    return 1 if any(r.status == "error" for r in results) else 0
