"""``ckptsvc bench --incremental``: bytes an incremental save writes for a LoRA-like model.

The model (:class:`LoraLike`) is a stack of big frozen linear layers, each with a small
trainable low-rank adapter, 90% of the bytes frozen by default. :func:`measure_incremental`
(the CLI process; the node writer writes):

1. full save: an ``AsyncCheckpointer(incremental=False)`` saves the model twice (an
   "optimizer step" on the adapters in between); the second save's bytes are the
   full-save figure;
2. incremental save: the same with ``incremental=True`` (the default) in a fresh root:
   the second save links the frozen shards from the first;
3. the ratio of the two second saves' ``SaveTimings.nbytes_written`` is compared with
   the issue's target (<= 0.15); both checkpoints are loaded back and compared.

Local disk by default (``--dir``); any URL works (hard links become server-side copies).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from typing import Any

import torch
from torch import nn

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.read.component_load import load_state
from ckptsvc.storage import Location
from ckptsvc.tools.bench_common import parse_size
from ckptsvc.tools.bench_report import Row, incremental_target, report_rows

__all__ = [
    "LoraLike",
    "add_incremental_options",
    "measure_incremental",
    "run_incremental",
]


class LoraLike(nn.Module):
    """``layers`` frozen ``dim x dim`` linear layers, each with a trainable rank-``rank``
    adapter (``A: rank x dim``, ``B: dim x rank``) - the shape of a LoRA fine-tune."""

    def __init__(self, *, layers: int = 8, dim: int = 256, rank: int = 8, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.base = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.lora_a = nn.ParameterList(
            nn.Parameter(torch.randn(rank, dim, generator=gen) * 0.01) for _ in range(layers)
        )
        self.lora_b = nn.ParameterList(
            nn.Parameter(torch.randn(dim, rank, generator=gen) * 0.01) for _ in range(layers)
        )
        with torch.no_grad():
            for p in self.base.parameters():  # seeded like the adapters, not by the global RNG
                p.copy_(torch.randn(p.shape, generator=gen))
        self.base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin, a, b in zip(self.base, self.lora_a, self.lora_b, strict=True):
            x = torch.relu(lin(x) + x @ a.t() @ b.t())
        return x

    @staticmethod
    def dims_for(nbytes: int, *, layers: int = 8, frozen_fraction: float = 0.9) -> tuple[int, int]:
        """(dim, rank) so the fp32 model holds about ``nbytes`` with ``frozen_fraction``
        of them frozen (rank = dim (1 - f) / (2 f), from dim^2 frozen vs 2 dim rank)."""
        dim = max(16, int((nbytes * frozen_fraction / (4 * layers)) ** 0.5))
        rank = max(1, round(dim * (1 - frozen_fraction) / (2 * frozen_fraction)))
        return dim, rank

    def trainable_step(self) -> None:
        """What an optimizer step does to the state: only the adapters change."""
        with torch.no_grad():
            for p in self.parameters():
                if p.requires_grad:
                    p.add_(0.001)


def _two_saves(root: str, model: LoraLike, *, incremental: bool, **opts: Any) -> dict[str, Any]:
    with AsyncCheckpointer(root, incremental=incremental, **opts) as ckpt:
        ckpt.save(1, {"model": model}).wait()
        model.trainable_step()
        started = time.perf_counter()
        handle = ckpt.save(2, {"model": model})
        handle.wait()
        elapsed = time.perf_counter() - started
    loaded = load_state(handle.path, storage_options=opts.get("storage_options"))["model"]
    expected = model.state_dict()
    same = loaded.keys() == expected.keys() and all(
        torch.equal(loaded[k], v) for k, v in expected.items()
    )
    t = handle.timings
    return {
        "nbytes_written": t.nbytes_written,
        "nbytes_reused": t.nbytes_reused,
        "durable_s": t.durable_s if t.durable_s is not None else elapsed,
        "blocking_s": t.blocking_s,
        "loads_back": same,
    }


def measure_incremental(
    root: str,
    *,
    nbytes: int = 256 << 20,
    frozen_fraction: float = 0.9,
    layers: int = 8,
    storage_options: dict[str, Any] | None = None,
) -> Row:
    """Full vs incremental second save of a :class:`LoraLike` model (module docstring)."""
    dim, rank = LoraLike.dims_for(nbytes, layers=layers, frozen_fraction=frozen_fraction)
    model = LoraLike(layers=layers, dim=dim, rank=rank)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    opts: dict[str, Any] = {
        "max_shard_size": max(1 << 20, total // (2 * layers)),
        "storage_options": storage_options,
    }
    sep = "/" if "://" in root else os.sep
    full = _two_saves(f"{root.rstrip('/')}{sep}full", model, incremental=False, **opts)
    inc = _two_saves(f"{root.rstrip('/')}{sep}incremental", model, incremental=True, **opts)
    ratio = inc["nbytes_written"] / full["nbytes_written"] if full["nbytes_written"] else None
    ok = full["loads_back"] and inc["loads_back"]
    return Row(
        method="ckptsvc_incremental",
        kind="save",
        label="incremental save (90% frozen)",
        status="ok" if ok and ratio is not None else "error",
        reason="" if ok else "a checkpoint did not load back bitwise",
        nbytes=total,
        blocking_s=inc["blocking_s"],
        durable_s=inc["durable_s"],
        extras={
            "frozen_fraction": frozen / total,
            "full_written_nbytes": full["nbytes_written"],
            "full_durable_s": full["durable_s"],
            "incremental_written_nbytes": inc["nbytes_written"],
            "incremental_reused_nbytes": inc["nbytes_reused"],
            "written_ratio": ratio,
            "mode": (
                f"wrote {inc['nbytes_written']} of {full['nbytes_written']} bytes "
                f"(full save durable in {full['durable_s']:.3f} s)"
            ),
        },
    )


def add_incremental_options(parser: argparse.ArgumentParser) -> None:
    """``--incremental`` (and its size option) on the ``bench`` parser."""
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="measure the bytes an incremental save of a 90%%-frozen (LoRA-like) model writes",
    )
    parser.add_argument(
        "--frozen-fraction",
        type=float,
        default=0.9,
        help="frozen share of the model's bytes for --incremental (default 0.9)",
    )


def run_incremental(args: argparse.Namespace) -> int:
    """``ckptsvc bench --incremental``: measure, print the row and the target (or JSON)."""
    size = getattr(args, "size", None)
    nbytes = parse_size(size) if isinstance(size, str) else int(size or 256 << 20)
    storage = getattr(args, "storage", None)
    options = json.loads(args.storage_options) if getattr(args, "storage_options", None) else {}
    if storage:
        root = f"{storage.rstrip('/')}/ckptsvc-bench-incremental-{uuid.uuid4().hex[:8]}"
    else:
        root = tempfile.mkdtemp(prefix="ckptsvc-bench-incremental-", dir=getattr(args, "dir", None))
    try:
        row = measure_incremental(
            root,
            nbytes=nbytes,
            frozen_fraction=float(getattr(args, "frozen_fraction", 0.9)),
            storage_options=options,
        )
    finally:
        if not getattr(args, "keep", False):
            Location.parse(root, options).remove(recursive=True, missing_ok=True)
    title = f"ckptsvc bench --incremental ({nbytes >> 20} MiB)"
    return report_rows([row], [incremental_target(row)], title, getattr(args, "json", None))
