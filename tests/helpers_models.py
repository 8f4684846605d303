"""Small models, state dicts and comparison helpers shared by the format and API tests.

Everything here is deterministic (seeded) and tiny (KiB), so tests stay fast.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "ALL_DTYPES",
    "FLOAT8_DTYPES",
    "TiedLM",
    "TinyMLP",
    "assert_bitwise_equal",
    "assert_state_dicts_bitwise_equal",
    "bitwise_equal",
    "crash_state",
    "mixed_state_dict",
    "random_tensor",
]

FLOAT8_DTYPES: tuple[torch.dtype, ...] = (
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
)

#: every dtype that torch and safetensors share
ALL_DTYPES: tuple[torch.dtype, ...] = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    *FLOAT8_DTYPES,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint64,
    torch.uint32,
    torch.uint16,
    torch.uint8,
    torch.bool,
    torch.complex64,
)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], *, seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` filled with random *bytes* (so floats include NaN/Inf patterns).

    Booleans get valid 0/1 bytes only.
    """
    gen = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * itemsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    ua = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    ub = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(ua, ub)


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, *, name: str = "?") -> None:
    assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert bitwise_equal(a, b), f"{name}: bytes differ"


def assert_state_dicts_bitwise_equal(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]
) -> None:
    assert sorted(got) == sorted(want), f"keys differ: {sorted(set(got) ^ set(want))}"
    for k in want:
        assert_bitwise_equal(got[k], want[k], name=k)


def mixed_state_dict(*, seed: int = 0) -> dict[str, torch.Tensor]:
    """A raw state dict with several dtypes and shapes (a 0-d and an empty tensor included)."""
    return {
        "embed.weight": random_tensor(torch.float32, (16, 8), seed=seed),
        "block.0.proj.weight": random_tensor(torch.bfloat16, (8, 8), seed=seed + 1),
        "block.0.proj.bias": random_tensor(torch.float16, (8,), seed=seed + 2),
        "block.1.scale": random_tensor(torch.float64, (3,), seed=seed + 3),
        "counts": random_tensor(torch.int64, (5,), seed=seed + 4),
        "mask": random_tensor(torch.bool, (4, 2), seed=seed + 5),
        "step": torch.tensor(7, dtype=torch.int32),
        "empty": torch.empty((0, 3), dtype=torch.float32),
    }


class TinyMLP(nn.Module):
    """Two linear layers, a persistent and a non-persistent buffer. About 10 KiB."""

    def __init__(self, *, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("running", torch.arange(width, dtype=torch.float32))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(torch.relu(self.fc1(x))) + self.running)


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight (like GPT-2 / tied LLaMA)."""

    def __init__(self, *, vocab: int = 32, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(ids))))


def crash_state(
    seed: int, *, tensors: int = 8, rows: int = 256, cols: int = 512
) -> dict[str, torch.Tensor]:
    """A few-MiB raw state dict (default 8 x 512 KiB float32 = 4 MiB), distinct per seed."""
    return {
        f"layer{i}.weight": random_tensor(torch.float32, (rows, cols), seed=seed * 1000 + i)
        for i in range(tensors)
    }
