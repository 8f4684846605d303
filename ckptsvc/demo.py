"""``ckptsvc demo``: train a small transformer, checkpoint it, find, load and verify it.

The first form of the README's main job: everything a user does with ckptsvc, end to
end, in a few seconds on a CPU, writing to ``<output>/checkpoints``.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

import torch
from torch import nn

from .discovery import find_latest_checkpoint, next_checkpoint_path
from .sharded_checkpoint import load_checkpoint, save_checkpoint
from .verify import verify_checkpoint

__all__ = ["TinyLM", "run_demo"]


class TinyLM(nn.Module):
    """A small causal transformer language model with tied input/output embeddings."""

    def __init__(
        self, *, vocab: int = 2048, dim: int = 256, layers: int = 4, heads: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, batch_first=True, dropout=0.0
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        return self.head(self.norm(self.blocks(self.embed(tokens), mask=mask, is_causal=True)))


def _train_step(model: TinyLM, opt: torch.optim.Optimizer, gen: torch.Generator) -> float:
    tokens = torch.randint(0, model.embed.num_embeddings, (8, 64), generator=gen)
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    )
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _fmt_mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run_demo(
    *, output: str = ".", steps: int = 3, storage_options: dict[str, Any] | None = None
) -> int:
    """Run the demo and print what happened; returns a process exit code."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(
        f"ckptsvc demo: TinyLM with {sum(p.numel() for p in model.parameters()):,} parameters ({_fmt_mib(nbytes)}), checkpoints in {output.rstrip('/')}/checkpoints"
    )

    for step in range(1, steps + 1):
        loss = _train_step(model, opt, gen)
        path = next_checkpoint_path(output, step)
        t0 = time.perf_counter()
        save_checkpoint(
            path,
            model,
            safetensors=True,
            max_shard_size=8 * 2**20,
            storage_options=storage_options,
            step=step,
        )
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.save(model.state_dict(), io.BytesIO())
        ref_s = time.perf_counter() - t0
        print(
            f"  step {step}: loss {loss:.4f}; saved to {path} in {save_s * 1e3:.0f} ms (durable; torch.save to memory alone: {ref_s * 1e3:.0f} ms)"
        )

    latest = find_latest_checkpoint(output, storage_options=storage_options)
    print(f"latest complete checkpoint: {latest}")
    if latest is None:
        print("FAILED: no checkpoint found")
        return 1
    restored = TinyLM()
    t0 = time.perf_counter()
    load_checkpoint(latest, restored, storage_options=storage_options)
    load_s = time.perf_counter() - t0
    same = all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), restored.state_dict().values(), strict=True)
    )
    tied = restored.head.weight is restored.embed.weight
    print(
        f"loaded in {load_s * 1e3:.0f} ms: weights {'bitwise identical' if same else 'DIFFERENT'}, tied embedding {'restored' if tied else 'NOT restored'}"
    )
    report = verify_checkpoint(latest, deep=True, storage_options=storage_options)
    print(
        f"verify --deep: {'OK' if report.ok else 'FAILED'} ({report.files_checked} files, {_fmt_mib(report.nbytes_checked)}, sizes and CRC-32C)"
    )
    for p in report.problems:
        print(f"  {p.kind}: {p.path}: {p.detail}")
    if os.path.isdir(output):
        print(f"inspect it: ckptsvc ls {output}   |   ckptsvc inspect {latest}")
    return 0 if same and tied and report.ok else 1
