"""Measure the REPLICATED split: a model written by rank 0 alone vs split over 4 ranks.

    python tests/dist_workers/bench_replicated.py [--delay-s 0.02] [--mib 64]

Each rank is its own simulated node (its own node writer, one I/O thread), so a node
writer is one stream, as on a cluster where each node has its own link to the store.
``--delay-s`` throttles every 1 MiB written by that much (``faulty://``), i.e. a per-stream
bandwidth cap like an object store's; with ``--delay-s 0`` it writes to local disk, which
all "nodes" of this one machine share (so no speedup is possible there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_workers.launch import describe, launch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay-s", type=float, default=0.02)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--world", type=int, default=4)
    args = parser.parse_args()
    env = {"CKPTSVC_IO_THREADS": "1", "CKPTSVC_WRITE_CHUNK_BYTES": str(1 << 20)}
    out = {}
    for pattern in ("global", "replicated"):
        root = tempfile.mkdtemp()
        url = f"faulty://{root}" if args.delay_s else root
        run_args = {
            "root": url,
            "pattern": pattern,
            "tensors": 16,
            "tensor_bytes": (args.mib << 20) // 16,
            "max_shard_size": (args.mib << 20) // 16,
            "storage_options": {"delay_s": args.delay_s} if args.delay_s else {},
            "repeats": 3,
        }
        runs = launch(
            "replicated_bench",
            run_args,
            world=args.world,
            nodes=args.world,
            node_prefix=f"b{uuid.uuid4().hex[:6]}",
            env=env,
            timeout_s=600,
        )
        if any(r.returncode or not r.result for r in runs):
            raise SystemExit(describe(runs))
        durable = [t[1] for t in runs[0].result["times"][1:]]  # type: ignore[index]
        blocking = [t[0] for t in runs[0].result["times"][1:]]  # type: ignore[index]
        out[pattern] = {
            "durable_s": statistics.median(durable),
            "blocking_s": statistics.median(blocking),
        }
    out["speedup"] = out["global"]["durable_s"] / out["replicated"]["durable_s"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
