"""Hugging Face interoperability: our safetensors checkpoints load with ``transformers``
``from_pretrained`` (tied embeddings included), and HF's ``save_pretrained`` output loads
with our ``load_checkpoint``. Tiny models built from configs in the test; no hub access."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_models import assert_bitwise_equal
from torch import nn

from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.sharded_checkpoint import (
    SAFE_WEIGHTS_INDEX_NAME,
    load_checkpoint,
    load_shard_index,
    save_checkpoint,
)

transformers = pytest.importorskip("transformers")


def _llama(tied: bool) -> Callable[[], Any]:
    def build() -> Any:
        cfg = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
            tie_word_embeddings=tied,
        )
        return transformers.AutoModelForCausalLM.from_config(cfg)

    return build


def _gpt2() -> Any:
    cfg = transformers.GPT2Config(
        vocab_size=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg)


MODELS: dict[str, Callable[[], Any]] = {
    "llama-tied": _llama(True),
    "llama-untied": _llama(False),
    "gpt2": _gpt2,
}


def build(name: str, seed: int) -> Any:
    torch.manual_seed(seed)
    model = MODELS[name]()
    model.eval()
    return model


def is_tied(model: Any) -> bool:
    return bool(model.get_output_embeddings().weight is model.get_input_embeddings().weight)


def assert_same_weights(got: nn.Module, want: nn.Module) -> None:
    g, w = got.state_dict(), want.state_dict()
    assert sorted(g) == sorted(w)
    for k in w:
        assert_bitwise_equal(g[k], w[k], name=k)


IDS = torch.tensor([[1, 5, 9, 3, 7]])


@pytest.mark.parametrize("max_shard_size", [2**31, 4096], ids=["one-shard", "sharded"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_from_pretrained_loads_our_checkpoint(
    tmp_path: Path, name: str, max_shard_size: int
) -> None:
    src = build(name, seed=0)
    out = tmp_path / "ckpt"
    save_checkpoint(str(out), src, safetensors=True, max_shard_size=max_shard_size)
    src.config.save_pretrained(str(out))

    index = load_shard_index(str(out), SAFE_WEIGHTS_INDEX_NAME)
    if max_shard_size == 4096:
        assert len(set(index["weight_map"].values())) > 1
    if is_tied(src):
        assert index["metadata"].get("param_sharing"), "tied embeddings must be recorded"
        assert len(index["weight_map"]) == len(src.state_dict()) - 1, (
            "the tied weight is stored once"
        )

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), output_loading_info=True
    )
    loaded.eval()
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    assert is_tied(loaded) == is_tied(src)
    assert_same_weights(loaded, src)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, src(IDS).logits)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_our_loader_reads_save_pretrained(tmp_path: Path, name: str) -> None:
    src = build(name, seed=1)
    out = tmp_path / "hf"
    src.save_pretrained(str(out), max_shard_size="8KB")
    assert (out / SAFE_WEIGHTS_INDEX_NAME).exists(), "expected a sharded HF checkpoint"
    assert find_latest_checkpoint(str(out)) == str(out), "an HF directory is a legacy checkpoint"

    dst = build(name, seed=2)
    load_checkpoint(str(out), dst, strict=True)
    assert is_tied(dst) == is_tied(src)
    assert_same_weights(dst, src)
    with torch.no_grad():
        assert torch.equal(dst(IDS).logits, src(IDS).logits)

    raw = load_checkpoint(str(out))  # no module: exactly what HF stored (no tied alias)
    assert isinstance(raw, dict)
    want = src.state_dict()
    assert set(raw) <= set(want)
    assert len(raw) == len(want) - int(is_tied(src))
    for k, v in raw.items():
        assert_bitwise_equal(v, want[k], name=k)


def test_round_trip_through_both(tmp_path: Path) -> None:
    """ours -> HF -> ours: the final weights equal the first ones."""
    src = build("llama-tied", seed=3)
    a = tmp_path / "a"
    save_checkpoint(str(a), src, safetensors=True, max_shard_size=4096)
    src.config.save_pretrained(str(a))
    mid = transformers.AutoModelForCausalLM.from_pretrained(str(a))
    b = tmp_path / "b"
    mid.save_pretrained(str(b))
    end = build("llama-tied", seed=4)
    load_checkpoint(str(b), end)
    assert is_tied(end)
    assert_same_weights(end, src)


@pytest.mark.parametrize("max_shard_size", [2**31, 4096], ids=["one-shard", "sharded"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_async_save_of_model_and_optimizer_loads_with_from_pretrained(
    tmp_path: Path, name: str, max_shard_size: int, node: str
) -> None:
    """``ckpt.save(step, {"model": hf_model, "optimizer": opt})``: ``from_pretrained`` on the
    checkpoint as it is (config.json written by the save), the ``model-*`` shards hold
    exactly the model's keys, and ``load_state`` restores the optimizer."""
    from safetensors import safe_open

    from ckptsvc import AsyncCheckpointer, load_state

    src = build(name, seed=0)
    src.train()
    opt = torch.optim.AdamW(src.parameters(), lr=1e-3)
    src(IDS, labels=IDS).loss.backward()
    opt.step()
    with AsyncCheckpointer(tmp_path, max_shard_size=max_shard_size) as ckpt:
        handle = ckpt.save(3, {"model": src, "optimizer": opt, "step": 3})
        handle.wait(120)
    out = Path(handle.path)
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    shard_keys: set[str] = set()
    for shard in out.glob("model*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            shard_keys |= set(f.keys())
    if max_shard_size == 2**31:  # one shard: model.safetensors alone, as save_pretrained
        assert not (out / SAFE_WEIGHTS_INDEX_NAME).exists()
        assert sorted(p.name for p in out.glob("model*.safetensors")) == ["model.safetensors"]
        stored = shard_keys
    else:
        assert not (out / "model.safetensors").exists()
        stored = set(load_shard_index(str(out), SAFE_WEIGHTS_INDEX_NAME)["weight_map"])
    assert shard_keys == stored and stored <= set(src.state_dict())
    assert len(stored) == len(src.state_dict()) - int(is_tied(src))  # tied: stored once

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert is_tied(loaded) == is_tied(src)
    assert_same_weights(loaded, src)

    state = load_state(handle.path)
    assert state["step"] == 3
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    fresh.load_state_dict(state["optimizer"])
    want, got = opt.state_dict(), fresh.state_dict()
    assert got["param_groups"] == want["param_groups"]
    for i, slots in want["state"].items():
        for k, v in slots.items():
            assert_bitwise_equal(got["state"][i][k], v, name=f"{i}.{k}")
