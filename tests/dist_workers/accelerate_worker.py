"""A tiny Accelerate training run that checkpoints through ckptsvc (or Accelerate itself).

Imported by tests/test_accelerate.py (one process) and run under ``accelerate launch
--num_processes 2 --cpu`` (``python accelerate_worker.py '<json args>'``, each process
writing its losses to a file). The loss of every step depends on the model, the
optimizer (AdamW moments), the scheduler, the data order (seedable shuffling, mid-epoch
resume through ``skip_first_batches``), dropout (torch RNG), Python's and NumPy's RNG and a
registered custom object, so a resume that misses any of them changes the losses.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckptsvc.integrations import accelerate as ckpt_accel

SAMPLES = 24
BATCH = 4
EPOCHS = 3


class Counter:
    """A ``register_for_checkpointing`` object: it scales the loss, so it must be restored."""

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])


def build(seed: int) -> tuple[Accelerator, Any, Any, Any, Any, Counter]:
    """A fresh accelerator and prepared model, optimizer, dataloader, scheduler, counter."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    set_seed(0)  # the data are the same in every run
    g = torch.Generator().manual_seed(1234)
    data = TensorDataset(torch.randn(SAMPLES, 4, generator=g), torch.randn(SAMPLES, 1, generator=g))
    set_seed(seed)  # the initial weights differ: a resume must restore them
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    # its own generator: the per-epoch base seed is drawn from it, not from the global RNG,
    # so a mid-epoch resume (skip_first_batches) draws the same numbers as an uninterrupted run
    dl = DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator())
    set_seed(0)  # the seedable sampler takes its seed from here (a script's set_seed(...))
    accelerator = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    model, opt, dl, sched = accelerator.prepare(model, opt, dl, sched)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    set_seed(seed + 1)
    return accelerator, model, opt, dl, sched, counter


def train(
    root: str,
    *,
    seed: int = 0,
    stop_after: int | None = None,
    save_every: int = 0,
    resume: str | None = None,
    use_accelerate: bool = False,
    validate_replication: bool = False,
) -> dict[str, Any]:
    """Train EPOCHS epochs (or until ``stop_after`` steps), saving every ``save_every`` steps
    to ``root`` (ckptsvc; or ``root/step_<n>`` with ``accelerator.save_state``); with
    ``resume``, first restore from that path. Returns this process's losses by step."""
    accelerator, model, opt, dl, sched, counter = build(seed)
    start = 0
    if resume is not None:
        restored = ckpt_accel.load_state(accelerator, resume)
        if restored is None:
            raise RuntimeError(f"nothing to resume under {resume}")
        start = restored.step if restored.step is not None else counter.seen
    per_epoch = len(dl)
    losses: dict[int, float] = {}
    step = start
    try:
        for epoch in range(start // per_epoch, EPOCHS):
            dl.set_epoch(epoch)
            skip = start - epoch * per_epoch if step == start else 0
            loader = accelerator.skip_first_batches(dl, skip) if skip > 0 else dl
            for x, y in loader:
                model.train()
                noise = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
                loss = nn.functional.mse_loss(model(x), y) * noise * (1 + 0.001 * counter.seen)
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
                counter.seen += 1
                step += 1
                losses[step] = float(loss.detach())
                if save_every and step % save_every == 0:
                    if use_accelerate:
                        accelerator.save_state(f"{root}/step_{step}")
                    else:
                        ckpt_accel.save_state(
                            accelerator, root, step, validate_replication=validate_replication
                        )
                if stop_after is not None and step >= stop_after:
                    return {"losses": losses, "rank": accelerator.process_index}
        return {"losses": losses, "rank": accelerator.process_index}
    finally:
        ckpt_accel.close(accelerator)


def main() -> None:
    """``argv[1]``: the JSON arguments of :func:`train` plus ``out``, a directory where each
    process writes ``rank_<n>.json`` (processes share stdout, so lines may interleave)."""
    args = json.loads(sys.argv[1])
    out = Path(args.pop("out"))
    result = train(**args)
    result["losses"] = {str(k): v for k, v in result["losses"].items()}
    (out / f"rank_{result['rank']}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():  # gloo's threads abort the exit otherwise
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
