"""One rank of a multi-process test: ``python worker.py SCENARIO JSON_ARGS``.

Started by :func:`dist_workers.launch.launch` with torchrun's environment. Each scenario
returns a JSON-able dict, printed last as ``RESULT <json>``. Comparisons of restored
state happen here, in the rank that saved it, so each rank checks bitwise that it got
back exactly its own state.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import faulty_fs  # noqa: F401  (registers faulty:// in this process)
import numpy as np
import torch
import torch.distributed as dist

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, load_components
from ckptsvc.stage.components import RNGState, SharingPattern, StateComponent

SP = SharingPattern


class Box:
    """A stateful holding one dict (tensors and plain values)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.state = sd


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested state -> {path: leaf}; DTensors become full tensors (a collective)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(flat(v, f"{prefix}{i}."))
        return out
    if type(obj).__name__ == "DTensor":
        obj = obj.full_tensor()
    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach().clone()}
    return {prefix: obj}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    return bool(a == b)


def mismatches(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    bad = sorted(set(expected) ^ set(got))
    bad += [k for k in sorted(set(expected) & set(got)) if not same(expected[k], got[k])]
    return bad


def mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 40), torch.nn.ReLU(), torch.nn.Linear(40, 24), torch.nn.ReLU(),
        torch.nn.Linear(24, 6),
    )  # fmt: skip


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, steps: int) -> None:
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + 10 * rank + step)
        model(torch.randn(4, 16, generator=g)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()


def rng_snapshot() -> tuple[Any, ...]:
    np_state: Any = np.random.get_state()
    return (torch.get_rng_state().clone(), random.getstate(), np_state[1].copy())


def rng_equal(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and bool((a[2] == b[2]).all())


# ---- scenarios ------------------------------------------------------------------------------


def replicated_job(a: dict[str, Any]) -> dict[str, Any]:
    """DDP model + every sharing pattern; save, scramble, load, compare bitwise per rank."""
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    node_index = int(os.environ["GROUP_RANK"])
    pgs = [dist.new_group(list(range(i, min(i + 2, world)))) for i in range(0, world, 2)]
    dp = pgs[rank // 2]
    model = mlp(0)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train(ddp, opt, rank, 2)
    if a.get("diverge_rank") == rank:
        with torch.no_grad():
            model.get_parameter("2.weight")[0, 0] += 1e-3
    torch.manual_seed(77 + rank)
    random.seed(rank)
    np.random.seed(rank)
    boxes = {
        "data": Box({"pos": rank * 100 + 3, "order": torch.randperm(10)}),
        "node": Box({"node": node_index, "cache": torch.full((5,), float(node_index))}),
        "group": Box({"group": rank // 2, "w": torch.full((3,), rank // 2 + 0.5)}),
        "trainer": Box({"global_step": 2, "best": 0.5, "history": [1.0, 0.7]}),
    }

    def comps(m: Any, o: Any, b: dict[str, Box]) -> list[StateComponent]:
        return [
            StateComponent("model", m, SP.REPLICATED, validate_replication=True),
            StateComponent("optimizer", o, SP.REPLICATED),
            StateComponent("rng", RNGState(), SP.PER_RANK),
            StateComponent("data", b["data"], SP.PER_RANK),
            StateComponent("node", b["node"], SP.PER_NODE),
            StateComponent("group", b["group"], SP.PER_GROUP, process_group_name="dp"),
            StateComponent("trainer", b["trainer"], SP.GLOBAL),
        ]

    expected = {
        "model": flat(model.state_dict()),
        "optimizer": flat(opt.state_dict()),
        **{k: flat(copy.deepcopy(v.state)) for k, v in boxes.items()},
    }
    rng = rng_snapshot()
    opts = a.get("storage_options") or {}
    with AsyncCheckpointer(
        a["root"], storage_options=opts, max_shard_size=a.get("max_shard_size", 4096)
    ) as ckpt:
        handle = ckpt.save_components(
            a.get("step", 1), comps(model, opt, boxes), process_groups={"dp": dp}
        )
        error = handle.exception(120)
        writer = ckpt.writer_pid
    result: dict[str, Any] = {
        "writer": writer,
        "path": handle.path,
        "error": None if error is None else f"{type(error).__name__}: {error}",
    }
    if error is not None:
        dist.barrier()
        return result
    # scramble everything, then restore into fresh objects
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    model2 = mlp(5)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    fresh = {k: Box({}) for k in boxes}
    load_components(
        handle.path, comps(model2, opt2, fresh), process_groups={"dp": dp}, storage_options=opts
    )
    got = {
        "model": flat(model2.state_dict()),
        "optimizer": flat(opt2.state_dict()),
        **{k: flat(v.state) for k, v in fresh.items()},
    }
    result["mismatch"] = {k: mismatches(expected[k], got[k]) for k in expected}
    result["rng_ok"] = rng_equal(rng, rng_snapshot())
    dist.barrier()  # every rank arrives: nobody is stuck in a collective another skipped
    return result


def killed_rank(a: dict[str, Any]) -> dict[str, Any]:
    """Rank ``kill_rank`` dies (SIGKILL) while its write is blocked; the others must fail."""
    rank = dist.get_rank()
    opts = a["storage_options"]
    comps = [
        StateComponent("data", Box({"x": torch.full((1000,), float(rank))}), SP.PER_RANK),
        StateComponent("trainer", Box({"step": 1}), SP.GLOBAL),
    ]
    ckpt = AsyncCheckpointer(a["root"], storage_options=opts)
    handle = ckpt.save_components(1, comps)
    if rank == a["kill_rank"]:
        os.kill(os.getpid(), signal.SIGKILL)
    error = handle.exception(120)
    ckpt.close()
    return {
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "exit_now": True,
    }


def fsdp_model(world: int, seed: int) -> torch.nn.Sequential:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mlp(seed)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_save(a: dict[str, Any]) -> dict[str, Any]:
    """FSDP2 model and optimizer saved sharded; rank 0 also writes the full reference."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = fsdp_model(world, 0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, opt, rank, 2)
    reference = {"model": flat(model.state_dict()), "optimizer": flat(opt.state_dict())}
    if rank == 0:
        torch.save(reference, a["reference"])
    comps = [
        StateComponent("model", model, SP.GLOBAL),
        StateComponent("optimizer", opt, SP.PER_RANK),
    ]
    with AsyncCheckpointer(a["root"], max_shard_size=a.get("max_shard_size", 1 << 20)) as ckpt:
        handle = ckpt.save_components(1, comps)
        handle.wait(120)
    dist.barrier()
    return {"path": handle.path}


def fsdp_load(a: dict[str, Any]) -> dict[str, Any]:
    """Load the sharded checkpoint at this world size (FSDP2) or into a plain model."""
    world = dist.get_world_size()
    model = fsdp_model(world, 9) if a["fsdp"] else mlp(9)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    comps = [
        StateComponent("model", model, SP.GLOBAL),
        StateComponent("optimizer", opt, SP.PER_RANK),
    ]
    load_components(a["path"], comps)
    reference = torch.load(a["reference"], weights_only=True)
    got = {"model": flat(model.state_dict()), "optimizer": flat(opt.state_dict())}
    placements = sorted({str(getattr(p, "placements", "plain")) for p in model.parameters()})
    train(model, opt, dist.get_rank(), 1)  # the restored state trains
    return {
        "mismatch": {k: mismatches(reference[k], got[k]) for k in reference},
        "placements": placements,
    }


def without_store(a: dict[str, Any]) -> dict[str, Any]:
    """No process group: ranks from the environment, reports as fragment files."""
    rank = int(os.environ["RANK"])
    model = mlp(0)
    boxes = {
        "data": Box({"rank": rank, "x": torch.full((7,), float(rank))}),
        "trainer": Box({"step": 3}),
    }

    def comps(m: Any, b: dict[str, Box]) -> list[StateComponent]:
        return [
            StateComponent("model", m, SP.REPLICATED),
            StateComponent("data", b["data"], SP.PER_RANK),
            StateComponent("trainer", b["trainer"], SP.GLOBAL),
        ]

    expected = {
        "model": flat(model.state_dict()),
        **{k: flat(copy.deepcopy(v.state)) for k, v in boxes.items()},
    }
    with AsyncCheckpointer(a["root"], max_shard_size=2048) as ckpt:
        handle = ckpt.save_components(a.get("step", 1), comps(model, boxes))
        handle.wait(120)
    model2, fresh = mlp(3), {k: Box({}) for k in boxes}
    load_components(handle.path, comps(model2, fresh))
    got = {"model": flat(model2.state_dict()), **{k: flat(v.state) for k, v in fresh.items()}}
    return {"path": handle.path, "mismatch": {k: mismatches(expected[k], got[k]) for k in expected}}


def replicated_bench(a: dict[str, Any]) -> dict[str, Any]:
    """Time to durable of one replicated model: written by rank 0 alone (GLOBAL) or split
    over every rank (REPLICATED). Not a test: ``tests/dist_workers/bench_replicated.py``."""
    g = torch.Generator().manual_seed(0)
    count, nbytes = a["tensors"], a["tensor_bytes"]
    state = {f"layer{i}.weight": torch.randn(nbytes // 4, generator=g) for i in range(count)}
    pattern = SP.GLOBAL if a["pattern"] == "global" else SP.REPLICATED
    comps = [StateComponent("model", Box(state), pattern)]
    opts = a.get("storage_options") or {}
    times = []
    with AsyncCheckpointer(
        a["root"], storage_options=opts, max_shard_size=a["max_shard_size"]
    ) as ckpt:
        for step in range(a.get("repeats", 3)):
            dist.barrier()
            handle = ckpt.save_components(step, comps)
            handle.wait(600)
            times.append((handle.timings.blocking_s, handle.timings.durable_s))
    dist.barrier()
    return {"times": times}


def slow_listener(a: dict[str, Any]) -> dict[str, Any]:
    """Save once with a metrics listener that keeps the commit thread inside torch calls
    (``torch.mm`` releases the GIL) for ``hold_s`` after the handle completed, then close
    and exit. A commit thread still inside such a call when the interpreter finalizes
    aborts the process (rc -6): ``close`` (or, with ``close`` false, the exit) must have
    joined it."""
    from ckptsvc import metrics

    square = torch.randn(128, 128)

    def hold(event: metrics.SaveEvent) -> None:
        deadline = time.monotonic() + a["hold_s"]
        while time.monotonic() < deadline:
            torch.mm(square, square)

    metrics.add_listener(hold)
    ckpt = AsyncCheckpointer(a["root"])
    handle = ckpt.save_components(1, [StateComponent("data", Box({"x": square}), SP.PER_RANK)])
    handle.wait(120)
    if not a["close"]:  # left to the interpreter's exit (AsyncCheckpointer's atexit hook)
        return {"path": handle.path}
    ckpt.close()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("ckptsvc-commit")]
    return {"path": handle.path, "commit_threads_after_close": alive}


SCENARIOS = {
    "slow_listener": slow_listener,
    "replicated_bench": replicated_bench,
    "without_store": without_store,
    "replicated_job": replicated_job,
    "killed_rank": killed_rank,
    "fsdp_save": fsdp_save,
    "fsdp_load": fsdp_load,
}


def main() -> None:
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    if not args.get("no_dist"):
        dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    result = SCENARIOS[scenario](args)
    print("RESULT " + json.dumps(result), flush=True)
    if result.get("exit_now"):
        os._exit(0)  # a peer died: tearing the process group down would wait for it
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
