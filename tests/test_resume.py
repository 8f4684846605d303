"""Bitwise resume: N steps straight == k steps, save, a *new process* loads, N-k steps.

Parameters, optimizer state, scheduler, data position, RNG (dropout draws from it) and the
loss of every step must be identical to the bit, on local disk and on S3 (moto). Each run
is a real subprocess (this file is also the worker: ``python test_resume.py ...``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_models import bitwise_equal
from torch import nn

TESTS_DIR = str(Path(__file__).parent)
N_STEPS, K_STEPS = 12, 5


# ---- the worker (runs in a subprocess) ----------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(self.embed(ids))))


class Data:
    """Batches from a private generator; its state is the data position."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.seen = 0

    def batch(self) -> torch.Tensor:
        self.seen += 1
        return torch.randint(0, 32, (8, 9), generator=self.gen)

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "seen": self.seen}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.gen.set_state(torch.as_tensor(sd["gen"], dtype=torch.uint8))
        self.seen = int(sd["seen"])


def _worker(mode: str, root: str, opts: dict[str, Any], out: str) -> None:
    import random

    import numpy as np

    from ckptsvc.compat.training_state import SimpleStatefulProvider, TrainingProgress
    from ckptsvc.manager import CheckpointConfig, CheckpointManager
    from ckptsvc.stage.components import RNGState

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=N_STEPS)
    data = Data(7)
    progress = TrainingProgress()
    provider = SimpleStatefulProvider(
        {
            "optimizer": opt,
            "scheduler": sched,
            "data": data,
            "rng": RNGState(),
            "progress": progress,
        }
    )
    config = CheckpointConfig(output_dir=root, save_total_limit=2, storage_options=opts)
    losses = {}
    with CheckpointManager(config=config, stateful_provider=provider, model=model) as manager:
        if mode == "resume":
            manager.load_checkpoint()
        stop = K_STEPS if mode == "first" else N_STEPS
        while progress.global_step < stop:
            ids = data.batch()
            # RNG used outside the model too: a noise term from NumPy and Python's random
            noise = float(np.random.rand()) * 1e-3 + random.random() * 1e-3
            logits = model(ids[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            (loss + noise).backward()
            opt.step()
            sched.step()
            progress.global_step += 1
            losses[progress.global_step] = float(loss.detach()).hex()
        if mode == "first":
            manager.save_checkpoint(checkpoint_id=progress.global_step)
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "sched": sched.state_dict()},
        out + ".pt",
    )
    Path(out + ".json").write_text(json.dumps(losses))


# ---- the test -----------------------------------------------------------------------------


def _run(
    mode: str, root: str, opts: dict[str, Any], out: Path, env: dict[str, str]
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, mode, root, json.dumps(opts), str(out / mode)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads((out / f"{mode}.json").read_text())
    state = torch.load(out / f"{mode}.pt", weights_only=True)
    return {"losses": {int(k): v for k, v in losses.items()}, **state}


def _assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and bitwise_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize("storage_root", ["local", "s3"], indirect=True)
def test_bitwise_resume_across_processes(storage_root: Any, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CKPTSVC_NODE_ID": f"r{uuid.uuid4().hex[:10]}",
        "CKPTSVC_WRITER_LINGER_S": "1",
        "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
    }
    root, opts = storage_root.url, storage_root.storage_options
    straight = _run("straight", storage_root.join("straight"), opts, tmp_path, env)
    first = _run("first", root, opts, tmp_path, env)
    resumed = _run("resume", root, opts, tmp_path, env)
    assert sorted(first["losses"]) == list(range(1, K_STEPS + 1))
    assert sorted(resumed["losses"]) == list(range(K_STEPS + 1, N_STEPS + 1))
    assert {**first["losses"], **resumed["losses"]} == straight["losses"]
    for key in ("model", "optimizer", "sched"):
        _assert_same(resumed[key], straight[key], key)
    # the run changed the state, so equality above is not trivial
    assert not torch.equal(first["model"]["body.0.weight"], straight["model"]["body.0.weight"])


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
