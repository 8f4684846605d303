"""One rank of a DCP test: ``python dcp_worker.py SCENARIO JSON_ARGS``.

Started by :func:`dist_workers.launch.launch` (``worker=DCP_WORKER``) with torchrun's
environment. The state is DTensors on a 1-D CPU mesh (``Shard(0)``, ``Shard(1)``,
``Replicate``), a plain tensor every rank holds, and non-tensor values, built from a
seed so every world size knows the same full values. Prints ``RESULT <json>`` last.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import ckptsvc.dcp
from ckptsvc.workers import shard_writer

warnings.filterwarnings("ignore")


def full_state() -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors, the same on every rank and every world size."""
    g = torch.Generator().manual_seed(1234)
    return {
        "rows": torch.randn(40, 24, generator=g),  # Shard(0): contiguous ranges
        "cols": torch.randn(12, 36, generator=g),  # Shard(1): strided on both sides
        "uneven": torch.randn(10, 7, generator=g),  # Shard(0) with a short last chunk
        "half": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "replicated": torch.randn(5, 3, generator=g),
        "plain": torch.arange(11, dtype=torch.int64),
    }


PLACEMENTS = {"rows": 0, "cols": 1, "uneven": 0, "half": 0, "replicated": None}


def sharded_state(full: dict[str, torch.Tensor], *, zero: bool) -> dict[str, Any]:
    """The DCP state dict on this world's mesh (zeros to load into, with ``zero``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model: dict[str, Any] = {}
    for name, t in full.items():
        src = torch.zeros_like(t) if zero else t
        if name == "plain":
            model[name] = src.clone()
            continue
        dim = PLACEMENTS[name]
        placement = Replicate() if dim is None else Shard(dim)
        model[name] = distribute_tensor(src, mesh, [placement])
    return {"model": model, "trainer": {"step": 0 if zero else 17, "tag": "" if zero else "run"}}


def compare(full: dict[str, torch.Tensor], got: dict[str, Any]) -> list[str]:
    bad = []
    for name, want in full.items():
        value = got["model"][name]
        if type(value).__name__ == "DTensor":
            value = value.full_tensor()
        if value.dtype != want.dtype or not torch.equal(
            value.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
        ):
            bad.append(name)
    if got["trainer"] != {"step": 17, "tag": "run"}:
        bad.append(f"trainer={got['trainer']}")
    return bad


def save(a: dict[str, Any]) -> dict[str, Any]:
    """Save the sharded state at this world size; optionally fail or die on one rank."""
    rank = dist.get_rank()
    state = sharded_state(full_state(), zero=False)
    if a.get("kill_rank") == rank or a.get("fail_rank") == rank:
        real_write = shard_writer.ChecksummedWriter.write

        def write(self: shard_writer.ChecksummedWriter, data: Any) -> int:
            if self.nbytes > 0:  # after the first piece went out
                if a.get("kill_rank") == rank:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(5, "injected write failure")
            return real_write(self, data)

        shard_writer.ChecksummedWriter.write = write  # type: ignore[method-assign]
    writer = ckptsvc.dcp.StorageWriter(a["path"], overwrite=a.get("overwrite", False))
    error = None
    try:
        if a.get("async"):
            dcp.async_save(state, storage_writer=writer).result()
        else:
            dcp.save(state, storage_writer=writer)
    except BaseException as e:  # CheckpointException is a BaseException
        failures = getattr(e, "failures", {})
        error = sorted({type(exc).__name__ for exc, _ in failures.values()}) or [type(e).__name__]
        print("save failed:", e, flush=True)
    return {"error": error, "exit_now": error is not None}


def load(a: dict[str, Any]) -> dict[str, Any]:
    """Load into this world size's layout (``plain``: full tensors, no process group)."""
    full = full_state()
    if a.get("plain"):
        state: dict[str, Any] = {
            "model": {k: torch.zeros_like(v) for k, v in full.items()},
            "trainer": {"step": 0, "tag": ""},
        }
        dcp.load(state, storage_reader=ckptsvc.dcp.StorageReader(a["path"]), no_dist=True)
    else:
        state = sharded_state(full, zero=True)
        dcp.load(state, storage_reader=ckptsvc.dcp.StorageReader(a["path"]))
    return {"mismatch": compare(full, state)}


SCENARIOS = {"save": save, "load": load}


def main() -> None:
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    if not args.get("plain"):
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.get("pg_timeout_s", 60)))
    result = SCENARIOS[scenario](args)
    print("RESULT " + json.dumps(result), flush=True)
    if result.get("exit_now"):
        os._exit(0)  # a peer may be dead: tearing the process group down would wait for it
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # The result is out and the group is down. Skip interpreter teardown: no ckptsvc
    # thread is alive here, but gloo's threads are (the device mesh still holds the
    # group), and one that needs the GIL while the interpreter finalizes aborts an exit
    # whose work was complete (rc -6, seen once in CI; design.md section 12). ckptsvc's
    # own exit is tested without this shortcut (test_clean_exit.py, the docs samples).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
