"""A 2-rank Lightning DDP run (CPU, gloo) saving through ``CkptsvcCheckpointIO``.

``python lightning_worker.py OUT MAX_STEPS [CKPT_PATH]``: rank 0 is this process;
Lightning's own launcher (``strategy="ddp"``, ``devices=2``) starts rank 1 by running the
same command again. One batch per rank and epoch (Lightning restarts an interrupted
epoch of a plain dataloader from its first batch, so a resumed run sees the same data as
an unbroken one only this way), a checkpoint every 2 epochs (2 steps) under
``OUT/ckpts``; with ``CKPT_PATH`` the run resumes from it and saves
under ``OUT/resumed``. Each rank writes ``OUT/losses-rank<r>.json``: ``{global step: loss
as float.hex()}`` (exact, so a test compares bitwise).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ckptsvc.integrations.lightning import CkptsvcCheckpointIO


class Tiny(pl.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.save_hyperparameters({"hidden": 16, "lr": 0.05})

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, str] = {}

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"].detach()).hex()


def main() -> None:
    warnings.filterwarnings("ignore")  # Lightning's advice on workers, sanity checks, ...
    out, max_steps = Path(sys.argv[1]), int(sys.argv[2])
    ckpt_path = sys.argv[3] if len(sys.argv) > 3 else None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)  # 2 ranks x 1 batch of 8 per epoch
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8
    )
    record = RecordLosses()
    ckpt_cb = pl.callbacks.ModelCheckpoint(
        dirpath=str(out / ("resumed" if ckpt_path else "ckpts")),
        every_n_epochs=2,
        save_on_train_epoch_end=True,
        save_top_k=-1,
        filename="{step}",
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt_cb, record],
        plugins=[CkptsvcCheckpointIO()],
        deterministic=True,
    )
    trainer.fit(Tiny(seed=123 if ckpt_path else 0), data, ckpt_path=ckpt_path)
    rank = trainer.global_rank
    (out / f"losses-rank{rank}.json").write_text(json.dumps(record.losses))


if __name__ == "__main__":
    main()
