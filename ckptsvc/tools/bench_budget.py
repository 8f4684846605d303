"""Benchmark probe: the peak extra host memory of a save streamed within a memory budget.

:func:`measure_budget_peak` runs one save of a state larger than ``memory_budget_bytes``
in a fresh interpreter (so nothing of the caller's heap or earlier peaks counts) and
returns what it cost on top of the state itself:

- ``trainer_extra_bytes``: the trainer's peak resident set (``VmHWM`` after resetting it
  through ``/proc/self/clear_refs``; sampled ``VmRSS`` where that is refused) minus its
  resident set just before the save. It includes the ring arena's shared-memory pages,
  which the trainer maps and pre-faults (so they are not counted again);
- ``writer_extra_bytes``: the node writer's peak private memory (``RssAnon``, sampled
  every few ms) minus its value before the save - upload or direct-I/O buffers. The
  writer's mapping of the ring is the same pages as the trainer's (not counted twice);
- ``shm_peak_bytes``: the largest total size of this run's segments in the shm
  directory (sampled), which the budget bounds;
- ``extra_bytes`` = trainer + writer extra; ``ratio`` = extra / budget.

The page cache that local writes fill is the kernel's (reclaimable), not the process's,
and is not counted. A warm-up save of a tiny state to another root comes first, so the
writer's lazy imports (fsspec, storage clients) are not counted as the save's memory.

``ckptsvc bench --budget [--size 1GiB] [--budget-fraction 0.25]`` runs it and checks
issue 9's target (peak extra / budget <= 1.10). The probe itself is
``python -m ckptsvc.tools.bench_budget --state-bytes N --budget-bytes B --root R`` (prints one
JSON object).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

from ckptsvc import knobs
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.tools.bench_common import parse_size
from ckptsvc.tools.bench_report import Row, budget_target, report_rows
from ckptsvc.workers.shm import segment_prefix

__all__ = ["add_budget_options", "measure_budget_peak", "run_budget"]

_SAMPLE_S = 0.002


def measure_budget_peak(
    *, state_nbytes: int, budget_nbytes: int, root: str, timeout_s: float = 300.0
) -> dict[str, Any]:
    """Save a ``state_nbytes`` state with ``memory_budget_bytes=budget_nbytes`` to local
    ``root`` in a fresh process; return its memory figures (see the module docstring)."""
    env = dict(os.environ)
    env["CKPTSVC_NODE_ID"] = f"budget{uuid.uuid4().hex[:8]}"
    env.pop("CKPTSVC_MEMORY_BUDGET_BYTES", None)
    env.pop("CKPTSVC_ARENAS_PER_RANK", None)
    env["CKPTSVC_WRITER_LINGER_S"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "ckptsvc.tools.bench_budget",
        "--state-bytes",
        str(state_nbytes),
        "--budget-bytes",
        str(budget_nbytes),
        "--root",
        root,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"budget probe failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def add_budget_options(parser: argparse.ArgumentParser) -> None:
    """``--budget`` (and its fraction option) on the ``bench`` parser."""
    parser.add_argument(
        "--budget",
        action="store_true",
        help="measure the peak extra memory of a save streamed within memory_budget_bytes",
    )
    parser.add_argument(
        "--budget-fraction",
        type=float,
        default=0.25,
        help="memory budget as a fraction of the state for --budget (default 0.25)",
    )


def run_budget(args: argparse.Namespace) -> int:
    """``ckptsvc bench --budget``: measure, print the row and the target (or JSON)."""
    size = getattr(args, "size", None)
    nbytes = parse_size(size) if isinstance(size, str) else int(size or 256 << 20)
    fraction = float(getattr(args, "budget_fraction", 0.25))
    budget = max(2 << 20, int(nbytes * fraction))
    scratch = tempfile.mkdtemp(prefix="ckptsvc-bench-budget-", dir=getattr(args, "dir", None))
    try:
        figures = measure_budget_peak(
            state_nbytes=nbytes, budget_nbytes=budget, root=os.path.join(scratch, "root")
        )
        row = Row(
            "ckptsvc_budget",
            "save",
            f"ckptsvc async, budget {fraction:g}x state",
            "ok",
            nbytes=figures["state_bytes"],
            blocking_s=figures["blocking_s"],
            durable_s=figures["durable_s"],
            rss_extra_bytes=figures["extra_bytes"],
            extras=figures,
        )
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        row = Row("ckptsvc_budget", "save", "ckptsvc async, budget", "error", reason=str(e))
    finally:
        if not getattr(args, "keep", False):
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    title = f"ckptsvc bench --budget ({nbytes >> 20} MiB state, {budget >> 20} MiB budget)"
    return report_rows([row], [budget_target(row)], title, getattr(args, "json", None))


def _status_bytes(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _shm_bytes(directory: str, prefix: str) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    total += entry.stat().st_blocks * 512
    return total


def _child(state_nbytes: int, budget_nbytes: int, root: str) -> dict[str, Any]:
    import torch

    ntensors = 8
    per = max(1, state_nbytes // ntensors // 4)
    state = {f"layer{i}.weight": torch.randn(per) for i in range(ntensors)}
    node = knobs.NODE_ID.get()
    prefix = segment_prefix(node)
    shm_dir = knobs.SHM_DIR.get()
    with AsyncCheckpointer(root, memory_budget_bytes=budget_nbytes) as ckpt:
        ckpt.save(0, {"warmup": torch.zeros(16)}).wait()  # writer imports, client thread
        writer = ckpt.writer_pid
        if writer is None:
            raise RuntimeError("no node writer")
        peaks = {"writer_anon": 0, "shm": 0, "trainer_rss": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    peaks["writer_anon"] = max(
                        peaks["writer_anon"], _status_bytes(writer, "RssAnon")
                    )
                peaks["shm"] = max(peaks["shm"], _shm_bytes(shm_dir, prefix))
                peaks["trainer_rss"] = max(peaks["trainer_rss"], _status_bytes("self", "VmRSS"))
                time.sleep(_SAMPLE_S)

        writer_base = _status_bytes(writer, "RssAnon")
        reset = _reset_peak()
        trainer_base = _status_bytes("self", "VmRSS")
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        handle = ckpt.save(1, state)
        handle.wait()
        durable_s = time.perf_counter() - started
        stop.set()
        sampler.join()
        trainer_peak = _status_bytes("self", "VmHWM") if reset else peaks["trainer_rss"]
    trainer_extra = max(0, trainer_peak - trainer_base)
    writer_extra = max(0, peaks["writer_anon"] - writer_base)
    extra = trainer_extra + writer_extra
    return {
        "state_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "budget_bytes": budget_nbytes,
        "trainer_extra_bytes": trainer_extra,
        "writer_extra_bytes": writer_extra,
        "shm_peak_bytes": peaks["shm"],
        "extra_bytes": extra,
        "ratio": extra / budget_nbytes,
        "streamed_pieces": handle.timings.pieces,
        "blocking_s": handle.timings.blocking_s,
        "durable_s": durable_s,
        "peak_from": "VmHWM" if reset else "sampled VmRSS",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckptsvc.tools.bench_budget")
    parser.add_argument("--state-bytes", type=int, required=True)
    parser.add_argument("--budget-bytes", type=int, required=True)
    parser.add_argument("--root", required=True)
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.state_bytes, args.budget_bytes, args.root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
