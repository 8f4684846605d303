"""``ckptsvc bench --many-tensors N``: per-tensor load costs (issue 15).

N tensors of 16 floats each (64 bytes: the bytes are nothing, the per-tensor work is
everything), saved once by ``save_checkpoint`` (ckptsvc's layout, one shard) and once by
``safetensors.save_file``. Then, for ``--reps`` rounds, a fresh process per measurement,
cold page cache: ``load_checkpoint`` against ``safetensors.torch.load_file`` of the same
tensors. The target: ckptsvc's median at most safetensors' (ratio <= 1).
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
from collections.abc import Callable
from typing import Any

__all__ = ["add_many_options", "many_rows", "run_many"]

_METHODS = {"ckptsvc_load": "ckptsvc load_checkpoint", "safetensors_load": "safetensors load_file"}


def add_many_options(parser: argparse.ArgumentParser) -> None:
    """``--many-tensors N`` on the ``bench`` parser (``--reps``, ``--dir``, ``--json`` and
    ``--quiet`` are shared)."""
    parser.add_argument(
        "--many-tensors",
        type=int,
        metavar="N",
        default=0,
        help="measure loading N tensors of 16 floats: load_checkpoint vs safetensors load_file",
    )


def _worker(argv: list[str]) -> None:
    method, path = argv
    import torch  # noqa: F401  (before the clock)

    if method == "ckptsvc_load":
        from ckptsvc.read.weights import load_checkpoint

        t0 = time.perf_counter()
        got = load_checkpoint(path)
    else:
        from safetensors.torch import load_file

        t0 = time.perf_counter()
        got = load_file(path)
    took = time.perf_counter() - t0
    print(json.dumps({"load_s": took, "ntensors": len(got or {})}))
    sys.stdout.flush()
    os._exit(0)


def many_rows(
    root: str, n: int, *, reps: int, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Save ``n`` small tensors both ways under ``root``, then time fresh-process loads."""
    import torch
    from safetensors.torch import save_file

    from ckptsvc.engine.sync_save import save_checkpoint
    from ckptsvc.tools.bench_probes import drop_page_cache

    gen = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.w": torch.randn(16, generator=gen) for i in range(n)}
    paths = {
        "ckptsvc_load": os.path.join(root, "ckptsvc"),
        "safetensors_load": os.path.join(root, "st.safetensors"),
    }
    save_checkpoint(paths["ckptsvc_load"], state, safetensors=True)
    save_file(state, paths["safetensors_load"])
    del state
    times: dict[str, list[float]] = {m: [] for m in _METHODS}
    for rep in range(reps):
        for method, path in paths.items():
            drop_page_cache(path)
            cmd = [sys.executable, "-m", "ckptsvc.tools.bench_many", "--worker", method, path]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{method} worker failed: {proc.stderr[-800:]}")
            out = json.loads(lines[-1])
            if out["ntensors"] != n:
                raise RuntimeError(f"{method} loaded {out['ntensors']} tensors, not {n}")
            times[method].append(out["load_s"])
            progress(f"many-tensors {method} rep {rep + 1}/{reps}: {out['load_s']:.3f} s")
    medians = {m: statistics.median(times[m]) for m in _METHODS}
    rows: list[dict[str, Any]] = [
        {"method": m, "label": label, "ntensors": n, "load_s": medians[m], "reps_s": times[m]}
        for m, label in _METHODS.items()
    ]
    rows[0]["vs_safetensors"] = medians["ckptsvc_load"] / medians["safetensors_load"]
    return rows


def run_many(args: argparse.Namespace) -> int:
    """``ckptsvc bench --many-tensors N``. Exit status: 0 the target passed, 1 not, 2 usage."""
    if args.many_tensors < 1 or args.reps < 1:
        print("ckptsvc bench --many-tensors: N and --reps must be >= 1", file=sys.stderr)
        return 2
    progress: Callable[[str], None] = (
        (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    )
    root = tempfile.mkdtemp(prefix="ckptsvc-bench-many-", dir=args.dir)
    try:
        rows = many_rows(root, args.many_tensors, reps=args.reps, progress=progress)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = rows[0]["vs_safetensors"]
    verdict = "PASS" if ratio <= 1.0 else "FAIL"
    if args.json:
        from ckptsvc.tools.bench_report import write_json

        write_json({"rows": rows, "target": {"ratio": ratio, "verdict": verdict}}, args.json)
    if args.json != "-":
        print(f"ckptsvc bench --many-tensors {args.many_tensors}: 16 floats each, reps {args.reps}, "
              "cold reads, a fresh process per load\n")  # fmt: skip
        for r in rows:
            print(
                f"{r['label']:28} {r['load_s']:8.3f} s  reps {[round(x, 3) for x in r['reps_s']]}"
            )
        print(f"\ntarget: ckptsvc_load / safetensors_load <= 1  {ratio:.2f}  {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
