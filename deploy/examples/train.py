"""A small data-parallel training script that checkpoints with ckptsvc.

The deploy examples launch it; it runs as one process, under ``torchrun`` on one node, or
under Slurm on many nodes::

    python deploy/examples/train.py --output ./train-run
    torchrun --standalone --nproc-per-node=4 deploy/examples/train.py --output ./train-run
    sbatch deploy/slurm/train.sbatch

What it shows, in the order it happens:

1. describe the training state as components with sharing patterns: the model and the
   optimizer are REPLICATED (identical on every rank; each rank writes a slice of them),
   the training progress is GLOBAL (rank 0 writes it), each rank's RNG is PER_RANK;
2. resume from the newest complete checkpoint under ``--output`` (a path or a URL): every
   rank loads what it needs;
3. train with DDP (gloo on CPU, NCCL on GPUs, one device per local rank);
4. save asynchronously on every rank every ``--save-every`` steps; rank 0 commits the
   checkpoint once every rank's files are durable; keep the newest ``--keep``;
5. on SIGTERM (preemption, ``scancel``, the Slurm time limit), every rank stops at the
   same step, saves, waits until the checkpoint is committed, and exits with status 0.

The batch of step ``s`` on rank ``r`` is drawn from a generator seeded with
``(--seed, s, r)``, so a resumed run sees the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ckptsvc
from ckptsvc import SharingPattern, StateComponent
from ckptsvc.engine.async_checkpointer import load_components


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a small model with ckptsvc checkpoints.")
    p.add_argument("--output", default="./train-run", help="model directory: path or URL")
    p.add_argument("--storage-options", default="{}", metavar="JSON", help="fsspec options")
    p.add_argument("--steps", type=int, default=20, help="last training step")
    p.add_argument("--save-every", type=int, default=5, help="save every N steps")
    p.add_argument("--keep", type=int, default=3, help="complete checkpoints to keep")
    p.add_argument("--batch-size", type=int, default=32, help="samples per rank and step")
    p.add_argument("--width", type=int, default=256, help="hidden width of the model")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    """Same seeds on every rank and every start: the model starts identical everywhere."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_model(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, 1))  # fmt: skip


def batch(
    seed: int, step: int, rank: int, size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)
    x = torch.randn(size, 64, generator=gen)
    y = x[:, :8].sum(dim=1, keepdim=True).sin()
    return x.to(device), y.to(device)


class Progress:
    """The training progress to checkpoint: anything with state_dict/load_state_dict."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class Preemption:
    """Remembers SIGTERM; ``agreed()`` is True on every rank once any rank got it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.signalled = False
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signalled = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.signalled else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    opts: dict[str, Any] = json.loads(args.storage_options)

    # --- processes and devices (torchrun sets RANK, LOCAL_RANK and WORLD_SIZE) -------------
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0

    seed_everything(args.seed)
    model = make_model(args.width).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    progress = Progress()

    # --- 1. the state, by sharing pattern -------------------------------------------------
    components = [
        StateComponent("model", model, SharingPattern.REPLICATED),
        StateComponent("optimizer", optimizer, SharingPattern.REPLICATED),
        StateComponent("progress", progress, SharingPattern.GLOBAL),
        StateComponent("rng", ckptsvc.RNGState(), SharingPattern.PER_RANK),
    ]

    # --- 2. resume --------------------------------------------------------------------------
    latest = ckptsvc.find_latest_checkpoint(args.output, storage_options=opts)
    if latest is not None:
        # "skip": resuming with another number of processes keeps fresh per-rank RNG state.
        load_components(latest, components, storage_options=opts, world_size_policy="skip")
        if rank == 0:
            print(f"resumed from {latest}; continuing at step {progress.step + 1}", flush=True)

    ddp = DistributedDataParallel(model) if distributed else model
    preemption = Preemption(device)

    # --- 3./4. train and save ---------------------------------------------------------------
    ckpt = ckptsvc.AsyncCheckpointer(args.output, storage_options=opts)
    handle = None
    try:
        for step in range(progress.step + 1, args.steps + 1):
            x, y = batch(args.seed, step, rank, args.batch_size, device)
            loss = nn.functional.mse_loss(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            progress.step = step

            stop = preemption.agreed()  # --- 5. every rank leaves at the same step
            if step % args.save_every == 0 or step == args.steps or stop:
                handle = ckpt.save_components(step, components)
                if rank == 0:
                    print(f"step {step}: loss {loss.item():.5f}; save blocked "
                          f"{handle.timings.blocking_s * 1e3:.1f} ms", flush=True)  # fmt: skip
                    ckptsvc.prune(args.output, keep=args.keep, storage_options=opts)
            if stop:
                if handle is not None:
                    handle.wait()  # committed (every rank's files durable), or raises
                    if rank == 0:
                        print(f"preempted: step {step} is durable at {handle.path}", flush=True)
                break
        ckpt.wait_all()  # raises if any save failed
        if distributed:
            dist.barrier()  # nobody tears the process group down while others still train
    finally:
        ckpt.close()
        if distributed:
            dist.destroy_process_group()
    if handle is not None and rank == 0:
        print(f"last checkpoint: {handle.path} ({handle.timings})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
