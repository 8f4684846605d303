"""torchao-quantized models: save through CheckpointManager, load into a fresh float model.

Two configs that run on CPU (int8 weight-only, and int8 dynamic activation + int8
per-group weights). The load installs the quantized weights (assigned, device kept,
frozen), re-ties tied weights, and the model computes exactly what it computed before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ckptsvc.compat.training_state import SimpleStatefulProvider, TrainingProgress
from ckptsvc.errors import CorruptCheckpointError, InvalidStateError, StateMismatchError
from ckptsvc.manager import CheckpointConfig, CheckpointManager
from ckptsvc.stage.quantized import (
    install_quantized,
    is_quantized_tensor,
    join_quantized,
    split_quantized,
)

torchao = pytest.importorskip("torchao")
from torchao.quantization import (  # noqa: E402
    Int8DynamicActivationIntxWeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)

CONFIGS = {
    "int8_weight_only": Int8WeightOnlyConfig,
    "int8_dyn_act_intx_weight": Int8DynamicActivationIntxWeightConfig,
}


pytestmark = pytest.mark.usefixtures("node")  # a private node writer per test (conftest)


class LM(nn.Module):
    """Tied embedding/head (kept in float) around two linear layers that get quantized."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(64, 64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(self.embed(ids)))))


def _quantized(seed: int, config: str) -> LM:
    model = LM(seed)
    quantize_(model, CONFIGS[config](), filter_fn=lambda m, fqn: fqn in ("up", "down"))
    return model


def _manager(root: str, model: nn.Module, progress: TrainingProgress) -> CheckpointManager:
    cfg = CheckpointConfig(output_dir=root, save_total_limit=None)
    provider = SimpleStatefulProvider({"progress": progress})
    return CheckpointManager(config=cfg, stateful_provider=provider, model=model)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_quantized_model_round_trip(tmp_path: Path, config: str) -> None:
    model = _quantized(0, config)
    assert is_quantized_tensor(model.up.weight)
    ids = torch.arange(16).reshape(2, 8)
    expected = model(ids)
    with _manager(str(tmp_path), model, TrainingProgress(global_step=3)) as m:
        path = m.save_checkpoint(checkpoint_id=3)
    # stored as plain tensors: inner tensors, no subclass, no pickle
    stored = load_file(str(Path(path, "model.safetensors")))
    assert "up._weight_qdata" in stored and stored["up._weight_qdata"].dtype == torch.int8
    assert "up.weight" not in stored

    fresh = LM(seed=1)  # a float model: the load installs the quantized weights
    progress = TrainingProgress()
    with _manager(str(tmp_path), fresh, progress) as m2:
        m2.load_checkpoint()
    assert progress.global_step == 3
    assert type(fresh.up.weight) is type(model.up.weight)
    assert not fresh.up.weight.requires_grad
    assert fresh.up.weight.device == torch.device("cpu")
    assert fresh.head.weight is fresh.embed.weight  # re-tied
    assert torch.equal(fresh(ids), expected)


def test_quantized_model_round_trip_on_s3(s3_root: Any) -> None:
    model = _quantized(0, "int8_weight_only")
    ids = torch.arange(8).reshape(1, 8)
    cfg = CheckpointConfig(
        output_dir=s3_root.url, save_total_limit=None, storage_options=s3_root.storage_options
    )
    provider = SimpleStatefulProvider({})
    with CheckpointManager(config=cfg, stateful_provider=provider, model=model) as m:
        m.save_checkpoint(checkpoint_id=1)
    fresh = LM(seed=2)
    with CheckpointManager(config=cfg, stateful_provider=provider, model=fresh) as m2:
        m2.load_checkpoint()
    assert torch.equal(fresh(ids), model(ids))


def test_loading_into_an_already_quantized_model(tmp_path: Path) -> None:
    model = _quantized(0, "int8_weight_only")
    with _manager(str(tmp_path), model, TrainingProgress()) as m:
        m.save_checkpoint(checkpoint_id=1)
    other = _quantized(5, "int8_weight_only")  # quantized already, different values
    with _manager(str(tmp_path), other, TrainingProgress()) as m2:
        m2.load_checkpoint()
    ids = torch.arange(8).reshape(1, 8)
    assert torch.equal(other(ids), model(ids))


def test_split_and_join_are_inverse() -> None:
    model = _quantized(0, "int8_dyn_act_intx_weight")
    sd = model.state_dict()
    split = split_quantized(sd)
    assert split.quantized_names == ("down.weight", "up.weight")
    assert all(not is_quantized_tensor(t) for t in split.tensors.values())
    assert split.description["format"] == "torchao"
    joined = join_quantized(split.tensors, split.description, where="mem")
    assert sorted(joined) == sorted(sd)
    for k, v in sd.items():
        assert type(joined[k]) is type(v)
        assert torch.equal(joined[k].dequantize() if is_quantized_tensor(v) else joined[k],
                           v.dequantize() if is_quantized_tensor(v) else v)  # fmt: skip
    plain = {"w": torch.ones(2)}
    assert split_quantized(plain).tensors == plain and not split_quantized(plain).description


def test_join_names_what_is_missing() -> None:
    split = split_quantized(_quantized(0, "int8_weight_only").state_dict())
    tensors = dict(split.tensors)
    del tensors["up._weight_scale"]
    with pytest.raises(CorruptCheckpointError, match=r"up\._weight_scale"):
        join_quantized(tensors, split.description, where="ckpt")
    with pytest.raises(CorruptCheckpointError, match="format"):
        join_quantized(split.tensors, {"format": "other"}, where="ckpt")


def test_install_rejects_shape_and_name_mismatches() -> None:
    q = _quantized(0, "int8_weight_only")
    with pytest.raises(StateMismatchError, match="shape"):
        install_quantized(LM(1), {"head.weight": q.up.weight})
    with pytest.raises(StateMismatchError, match="nothere"):
        install_quantized(LM(1), {"nothere.weight": q.up.weight})


def test_an_inner_name_colliding_with_a_key_is_refused() -> None:
    sd = _quantized(0, "int8_weight_only").state_dict()
    sd["up._weight_qdata"] = torch.zeros(1)
    with pytest.raises(InvalidStateError, match=r"up\._weight_qdata"):
        split_quantized(sd)


@pytest.mark.gpu
def test_quantized_load_keeps_the_module_device(tmp_path: Path) -> None:
    model = LM(0).cuda()
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in ("up", "down"))
    ids = torch.arange(8, device="cuda").reshape(1, 8)
    with _manager(str(tmp_path), model, TrainingProgress()) as m:
        m.save_checkpoint(checkpoint_id=1)
    fresh = LM(1).cuda()
    with _manager(str(tmp_path), fresh, TrainingProgress()) as m2:
        m2.load_checkpoint()
    assert fresh.up.weight.device.type == "cuda" and is_quantized_tensor(fresh.up.weight)
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh(ids), model(ids))
