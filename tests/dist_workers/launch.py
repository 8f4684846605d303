"""Start ``world`` rank processes the way torchrun would, on simulated nodes.

Each rank is a fresh interpreter running ``tests/dist_workers/worker.py SCENARIO ARGS``
with torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and
``CKPTSVC_NODE_ID=<prefix>n<node>``, so the ranks of one simulated node share one node
writer and different nodes have different writers. A rank prints ``RESULT <json>`` last.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "worker.py"
DCP_WORKER = Path(__file__).resolve().parent / "dcp_worker.py"


@dataclass(frozen=True)
class RankRun:
    rank: int
    returncode: int
    result: dict[str, Any] | None
    output: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    scenario: str,
    args: dict[str, Any],
    *,
    world: int,
    nodes: int = 1,
    node_prefix: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    worker: Path = WORKER,
) -> list[RankRun]:
    """Run every rank of ``worker`` to completion (killing all on timeout); results in
    rank order."""
    per_node = world // nodes
    port = free_port()
    procs = []
    logs = []
    for rank in range(world):
        rank_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank % per_node),
            "LOCAL_WORLD_SIZE": str(per_node),
            "GROUP_RANK": str(rank // per_node),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "CKPTSVC_NODE_ID": f"{node_prefix}n{rank // per_node}",
            "CKPTSVC_WRITER_LINGER_S": "1",
            "CKPTSVC_WRITER_PRELOAD": "faulty_fs",
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        # a file, not a pipe: a node writer started by a rank inherits its stderr and may
        # outlive it, which would keep a pipe open
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed after the rank exits
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), scenario, json.dumps(args)],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env=rank_env,
            )
        )
    deadline = time.monotonic() + timeout_s
    outputs = []
    for p, log in zip(procs, logs, strict=True):
        note = ""
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.send_signal(signal.SIGKILL)
            p.wait()
            note = "\n<killed: launch timeout>"
        log.seek(0)
        outputs.append(log.read() + note)
        log.close()
    runs = []
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        result = None
        for line in out.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
        runs.append(RankRun(rank, p.returncode, result, out))
    return runs


def describe(runs: list[RankRun]) -> str:
    """Every rank's exit code and output tail, for assertion messages."""
    return "\n".join(f"--- rank {r.rank} rc={r.returncode}\n{r.output[-3000:]}" for r in runs)
