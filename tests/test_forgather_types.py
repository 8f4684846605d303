"""Forgather's checkpoint types in ckptsvc: ``compute_state_hash`` hashes as Forgather does,
``CheckpointManifest`` round-trips its JSON and reads a manifest ckptsvc wrote; a load given
``None`` (no checkpoint found) says so; a wrong ``stateful_provider`` is a ConfigError."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from helpers_models import TinyMLP

import ckptsvc
import ckptsvc.manager
from ckptsvc.compat import forgather_types
from ckptsvc.compat.forgather_types import (
    CheckpointManifest,
    ComponentManifest,
    compute_state_hash,
)
from ckptsvc.compat.training_state import SimpleStatefulProvider
from ckptsvc.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.manager import CheckpointConfig, CheckpointManager
from ckptsvc.read.discovery import next_checkpoint_path
from ckptsvc.sharded_checkpoint import save_checkpoint


class Opaque:
    def __str__(self) -> str:
        return "opaque-thing"


def test_hash_of_a_known_state_is_forgathers() -> None:
    """The JSON Forgather hashes, written out by hand: keys sorted at every level, tensors
    summarised by shape, dtype, device and first 10 values, tuples as lists, other objects
    by str(), json.dumps' default separators."""
    state = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "step": 7,
        "lr": 0.5,
        "name": "adamw",
        "flags": (True, None),
        "other": Opaque(),
        "empty": torch.zeros(0, dtype=torch.int64),
    }
    by_hand = (
        '{"empty": {"device": "cpu", "dtype": "torch.int64", "sample": [], "shape": [0], '
        '"type": "tensor"}, "flags": [true, null], "lr": 0.5, "name": "adamw", '
        '"other": "opaque-thing", "step": 7, "w": {"device": "cpu", "dtype": "torch.float32", '
        '"sample": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], "shape": [3, 4], '
        '"type": "tensor"}}'
    )
    assert compute_state_hash(state) == hashlib.sha256(by_hand.encode("utf-8")).hexdigest()


def test_hash_sees_the_first_ten_values_only() -> None:
    base = torch.zeros(20)
    late, early = base.clone(), base.clone()
    late[15] = 1.0
    early[3] = 1.0
    h = compute_state_hash({"t": base})
    assert compute_state_hash({"t": late}) == h  # Forgather's documented limitation
    assert compute_state_hash({"t": early}) != h
    assert compute_state_hash({"t": base.to(torch.float64)}) != h
    assert compute_state_hash({"t": base.reshape(4, 5)}) != h


def sample_manifest() -> CheckpointManifest:
    return CheckpointManifest(
        checkpoint_path="/out/checkpoints/checkpoint-5",
        world_size=2,
        timestamp=datetime(2025, 1, 24, 10, 30, 0, 123456, tzinfo=timezone.utc),
        components={
            "model": ComponentManifest("model", "replicated", [0], replicated_across=[0, 1]),
            "rng": ComponentManifest("rng", "per_rank", [0, 1], size_bytes=64, checksum="ab"),
        },
        training_args_hash="abc123",
        metadata={"model_type": "llama"},
    )


def test_manifest_round_trip_as_forgather_writes_it(tmp_path: Path) -> None:
    m = sample_manifest()
    path = tmp_path / "checkpoint_manifest.json"
    m.save(str(path))
    text = path.read_text()
    assert text == json.dumps(m.to_dict(), indent=2)  # Forgather's json.dump(..., indent=2)
    doc = json.loads(text)
    assert list(doc) == [
        "checkpoint_path", "world_size", "timestamp", "components", "training_args_hash",
        "forgather_version", "pytorch_version", "metadata",
    ]  # fmt: skip
    assert doc["timestamp"] == "2025-01-24T10:30:00.123456+00:00"
    assert list(doc["components"]["rng"]) == [
        "key", "sharing_pattern", "ranks", "replicated_across", "group_name", "size_bytes",
        "checksum", "metadata",
    ]  # fmt: skip
    assert CheckpointManifest.load(str(path)) == m
    assert CheckpointManifest.from_dict(m.to_dict()) == m
    assert ComponentManifest.from_dict({"key": "k", "sharing_pattern": "global", "ranks": [0]}) == (
        ComponentManifest("k", "global", [0], None, None, 0, None, {})
    )
    with pytest.raises(TypeError):  # cls(**data), as Forgather: unknown keys are refused
        ComponentManifest.from_dict({"key": "k", "sharing_pattern": "global", "ranks": [], "x": 1})


def test_manifest_reads_a_checkpoint_ckptsvc_wrote(tmp_path: Path) -> None:
    path = next_checkpoint_path(str(tmp_path), 3)
    save_checkpoint(path, {"w": torch.ones(4)}, step=3, safetensors=True)
    m = CheckpointManifest.from_checkpoint(path)
    assert m == CheckpointManifest.load(str(Path(path) / MANIFEST_NAME))
    assert m.world_size == 1
    assert m.timestamp.tzinfo is not None
    assert m.metadata["ckptsvc"]["step"] == 3
    assert "model.safetensors.index.json" in m.metadata["ckptsvc"]["files"]


def test_manifest_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"no manifest at .*nowhere"):
        CheckpointManifest.from_checkpoint(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"world_size": 1}')
    with pytest.raises(CorruptCheckpointError, match=r"bad\.json: not a checkpoint manifest"):
        CheckpointManifest.load(str(bad))


def test_forgather_names_are_importable_where_forgather_users_look() -> None:
    for name in ("CheckpointManifest", "ComponentManifest", "compute_state_hash"):
        assert getattr(ckptsvc.manager, name) is getattr(forgather_types, name)
    assert ckptsvc.manager.Statefuls == dict[str, ckptsvc.Stateful]
    assert ckptsvc.manager.ModelParts is forgather_types.ModelParts


def test_loaders_given_none_say_no_checkpoint(tmp_path: Path) -> None:
    """The README's pattern on an empty root: a clear error, not a TypeError on None."""
    latest = ckptsvc.find_latest_checkpoint(str(tmp_path))
    assert latest is None
    hint = "find_latest_checkpoint returns when the root holds no complete checkpoint"
    with pytest.raises(CheckpointNotFoundError, match=f"load_state.*{hint}"):
        ckptsvc.load_state(latest)  # type: ignore[arg-type]
    with pytest.raises(CheckpointNotFoundError, match=f"load_components.*{hint}"):
        ckptsvc.load_components(latest, [])  # type: ignore[arg-type]
    with pytest.raises(CheckpointNotFoundError, match=f"load_checkpoint.*{hint}"):
        ckptsvc.load_checkpoint(latest)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "provider",
    [{"optimizer": object()}, TinyMLP(seed=0), None],
    ids=["dict", "module", "none"],
)
def test_a_wrong_stateful_provider_is_a_config_error(tmp_path: Path, provider: object) -> None:
    config = CheckpointConfig(output_dir=str(tmp_path), save_total_limit=None)
    with pytest.raises(ConfigError, match=r"stateful_provider must be a StatefulProvider.*Simple"):
        CheckpointManager(config=config, stateful_provider=provider, model=TinyMLP(seed=0))  # type: ignore[arg-type]


def test_a_provider_listing_non_components_is_a_config_error(tmp_path: Path) -> None:
    class Listing(SimpleStatefulProvider):
        def get_state_components(self) -> list:  # type: ignore[override]
            return [{"key": "optimizer"}]

    config = CheckpointConfig(output_dir=str(tmp_path), save_total_limit=None)
    with pytest.raises(ConfigError, match="must return StateComponent objects; got a dict"):
        CheckpointManager(config=config, stateful_provider=Listing({}), model=TinyMLP(seed=0))
