"""The manifest (``checkpoint_manifest.json``): golden bytes, round trip, validation, and
compatibility with the way Forgather parses its own manifest.

Regenerate the golden file (only with a FORMAT_VERSION change) with
``CKPTSVC_REGENERATE_GOLDEN=1 pytest tests/test_manifest.py``.
"""

from __future__ import annotations

import copy
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ckptsvc.errors import CorruptCheckpointError
from ckptsvc.format.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MARKER_NAME,
    PLAIN_FORMAT_VERSION,
    ComponentRecord,
    FileRecord,
    Manifest,
    check_relpath,
    now_iso,
)

GOLDEN = Path(__file__).parent / "golden" / "manifest.json"
REGENERATE = os.environ.get("CKPTSVC_REGENERATE_GOLDEN") == "1"

#: the eight keys of Forgather's ComponentManifest, in its order
FORGATHER_COMPONENT_KEYS = (
    "key",
    "sharing_pattern",
    "ranks",
    "replicated_across",
    "group_name",
    "size_bytes",
    "checksum",
    "metadata",
)
FORGATHER_TOP_KEYS = (
    "checkpoint_path",
    "world_size",
    "timestamp",
    "components",
    "training_args_hash",
    "forgather_version",
    "pytorch_version",
    "metadata",
)


def sample_manifest() -> Manifest:
    return Manifest(
        checkpoint_path="s3://bucket/run/checkpoints/checkpoint-100",
        world_size=2,
        timestamp="2025-01-24T10:30:00.123456+00:00",
        step=100,
        files=(
            FileRecord("model-00001-of-00002.safetensors", 4096, "0a1b2c3d"),
            FileRecord("model-00002-of-00002.safetensors", 1024, "deadbeef"),
            FileRecord("model.safetensors.index.json", 321, "01234567"),
            FileRecord("optimizer/rank-00001.safetensors", 77, "89abcdef"),
        ),
        components=(
            ComponentRecord(
                "model", "replicated", (0,), (0, 1), None, 5120, "cafe", {"dtype": "bf16"}
            ),
            ComponentRecord("rng", "per_rank", (0, 1), size_bytes=64),
        ),
        training_args_hash="abc123",
        forgather_version=None,
        pytorch_version="2.13.0",
        library_version="0.1.0",
        user_metadata={"run": "golden", "loss": 1.25},
    )


def doc_of(m: Manifest) -> dict[str, Any]:
    out = json.loads(m.to_json())
    assert isinstance(out, dict)
    return out


def raw_of(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


# ---- golden bytes and round trip -------------------------------------------------------------


def test_golden_bytes() -> None:
    data = sample_manifest().to_json()
    if REGENERATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(data)
    assert GOLDEN.exists(), "run with CKPTSVC_REGENERATE_GOLDEN=1 once to create the golden file"
    assert data == GOLDEN.read_bytes(), "manifest bytes changed: bump FORMAT_VERSION and regenerate"
    assert Manifest.from_json(GOLDEN.read_bytes(), where=str(GOLDEN)) == sample_manifest()


def test_round_trip_is_identity_and_deterministic() -> None:
    m = sample_manifest()
    again = Manifest.from_json(m.to_json(), where="x")
    assert again == m
    assert again.to_json() == m.to_json()
    assert m.total_nbytes == 4096 + 1024 + 321 + 77
    assert m.file("model.safetensors.index.json") == FileRecord(
        "model.safetensors.index.json", 321, "01234567"
    )
    assert m.file("nope") is None


def test_minimal_manifest_round_trips() -> None:
    m = Manifest(checkpoint_path="/tmp/c", world_size=1, timestamp=now_iso(), step=None, files=())
    assert Manifest.from_json(m.to_json(), where="x") == m


def test_names() -> None:
    assert MANIFEST_NAME == "checkpoint_manifest.json"
    assert MARKER_NAME != MANIFEST_NAME and MARKER_NAME.startswith(".")


def test_timestamp_parses_and_orders() -> None:
    m = sample_manifest()
    assert m.timestamp_s() == datetime.fromisoformat(m.timestamp).timestamp()
    naive = Manifest("/c", 1, "2025-01-24T10:30:00", 1, ())
    assert naive.timestamp_s() > 0.0
    garbage = Manifest("/c", 1, "yesterday", 1, ())
    assert garbage.timestamp_s() == 0.0
    a, b = now_iso(), now_iso()
    assert datetime.fromisoformat(a) <= datetime.fromisoformat(b)
    assert datetime.fromisoformat(a).tzinfo is not None


# ---- Forgather compatibility -----------------------------------------------------------------


def forgather_parse(doc: dict[str, Any]) -> dict[str, Any]:
    """What Forgather's ``CheckpointManifest.from_dict`` does with a manifest (re-stated here
    so the test needs no Forgather install): required keys indexed directly, the timestamp
    through ``datetime.fromisoformat``, each component through ``ComponentManifest(**data)``
    (so exactly the eight keys, no more)."""
    parsed = {
        "checkpoint_path": doc["checkpoint_path"],
        "world_size": doc["world_size"],
        "timestamp": datetime.fromisoformat(doc["timestamp"]),
        "components": {},
        "training_args_hash": doc.get("training_args_hash"),
        "forgather_version": doc.get("forgather_version"),
        "pytorch_version": doc.get("pytorch_version"),
        "metadata": doc.get("metadata", {}),
    }
    for k, v in doc["components"].items():
        assert set(v) <= set(FORGATHER_COMPONENT_KEYS), (
            f"unknown component keys {set(v) - set(FORGATHER_COMPONENT_KEYS)}"
        )
        assert {"key", "sharing_pattern", "ranks"} <= set(v)
        parsed["components"][k] = dict(v)
    return parsed


def test_top_level_is_forgathers() -> None:
    doc = doc_of(sample_manifest())
    assert tuple(doc) == FORGATHER_TOP_KEYS, "our additions must live under 'metadata'"
    parsed = forgather_parse(doc)
    assert parsed["world_size"] == 2
    assert parsed["timestamp"] == datetime.fromisoformat("2025-01-24T10:30:00.123456+00:00")
    comps = parsed["components"]
    assert set(comps) == {"model", "rng"}
    assert tuple(comps["model"]) == FORGATHER_COMPONENT_KEYS
    assert comps["model"]["ranks"] == [0] and comps["model"]["replicated_across"] == [0, 1]
    assert comps["rng"]["replicated_across"] is None
    # the caller's own metadata stays at the top of "metadata"; ours sits under one key
    assert parsed["metadata"]["run"] == "golden"
    ours = parsed["metadata"]["ckptsvc"]
    assert ours["format_version"] == PLAIN_FORMAT_VERSION
    assert ours["step"] == 100
    assert ours["files"]["model-00001-of-00002.safetensors"] == {
        "nbytes": 4096,
        "crc32c": "0a1b2c3d",
    }


def test_reads_a_forgather_written_manifest() -> None:
    """A manifest as Forgather writes it (no ckptsvc block, naive timestamp) parses."""
    doc = {
        "checkpoint_path": "/out/checkpoints/checkpoint-5",
        "world_size": 1,
        "timestamp": "2025-01-24T10:30:00",
        "components": {
            "model": dict(
                zip(
                    FORGATHER_COMPONENT_KEYS,
                    ["model", "global", [0], None, None, 10, None, {}],
                    strict=True,
                )
            ),
            "optimizer": dict(
                zip(
                    FORGATHER_COMPONENT_KEYS,
                    ["optimizer", "per_group", [0, 4], [0, 1], "pp_group", 20, "x", {"a": 1}],
                    strict=True,
                )
            ),
        },
        "training_args_hash": "h",
        "forgather_version": "1.2.3",
        "pytorch_version": "2.6.0",
        "metadata": {"model_type": "llama"},
    }
    m = Manifest.from_json(raw_of(doc), where="forgather")
    assert m.step is None and m.files == () and m.world_size == 1
    assert m.forgather_version == "1.2.3"
    assert m.user_metadata == {"model_type": "llama"}
    opt = next(c for c in m.components if c.key == "optimizer")
    assert (
        opt.sharing_pattern == "per_group" and opt.ranks == (0, 4) and opt.group_name == "pp_group"
    )
    assert opt.replicated_across == (0, 1)
    assert m.timestamp_s() > 0


def test_unknown_top_level_and_metadata_keys_are_tolerated() -> None:
    doc = doc_of(sample_manifest())
    doc["future_field"] = {"x": 1}
    doc["metadata"]["ckptsvc"]["future_field"] = [1, 2]
    assert Manifest.from_json(raw_of(doc), where="x").files == sample_manifest().files


# ---- validation ------------------------------------------------------------------------------

UNSAFE_PATHS = [
    "../escape.safetensors",
    "a/../../b",
    "a/..",
    "/etc/passwd",
    "s3://other-bucket/x",
    "file:///etc/passwd",
    "a\\b.safetensors",
    "..\\x",
    "a//b",
    "./a",
    "a/./b",
    "",
    "nul\x00byte",
    "trailing/",
]


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_check_relpath_rejects(path: str) -> None:
    with pytest.raises(CorruptCheckpointError, match="ckpt-x"):
        check_relpath(path, where="ckpt-x")


@pytest.mark.parametrize(
    "path",
    ["model.safetensors", "optimizer/rank-00001.safetensors", "a.b/c-d_e.json", "..hidden", "x..y"],
)
def test_check_relpath_accepts(path: str) -> None:
    assert check_relpath(path, where="w") == path


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_manifest_with_unsafe_file_is_rejected(path: str) -> None:
    doc = doc_of(sample_manifest())
    doc["metadata"]["ckptsvc"]["files"][path] = {"nbytes": 1, "crc32c": "00000000"}
    with pytest.raises(CorruptCheckpointError, match="where-it-is"):
        Manifest.from_json(raw_of(doc), where="where-it-is")


def test_check_relpath_rejects_non_strings() -> None:
    for bad in (None, 3, b"model.safetensors", ["a"]):
        with pytest.raises(CorruptCheckpointError):
            check_relpath(bad, where="w")


def test_newer_format_version_is_rejected_with_advice() -> None:
    doc = doc_of(sample_manifest())
    doc["metadata"]["ckptsvc"]["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(CorruptCheckpointError, match="upgrade"):
        Manifest.from_json(raw_of(doc), where="m")


def _mutations() -> dict[str, Any]:
    def set_(path: tuple[str, ...], value: Any) -> Any:
        def apply(doc: dict[str, Any]) -> None:
            target = doc
            for p in path[:-1]:
                target = target[p]
            target[path[-1]] = value

        return apply

    def delete(key: str) -> Any:
        return lambda doc: doc.pop(key)

    f0 = "model-00001-of-00002.safetensors"
    return {
        "no_timestamp": delete("timestamp"),
        "timestamp_int": set_(("timestamp",), 12345),
        "world_size_text": set_(("world_size",), "two"),
        "metadata_list": set_(("metadata",), [1, 2]),
        "ours_list": set_(("metadata", "ckptsvc"), [1]),
        "version_text": set_(("metadata", "ckptsvc", "format_version"), "1"),
        "files_list": set_(("metadata", "ckptsvc", "files"), ["a"]),
        "file_entry_int": set_(("metadata", "ckptsvc", "files", f0), 5),
        "file_nbytes_missing": set_(("metadata", "ckptsvc", "files", f0), {"crc32c": "0"}),
        "file_nbytes_negative": set_(
            ("metadata", "ckptsvc", "files", f0), {"nbytes": -1, "crc32c": "0"}
        ),
        "file_nbytes_float": set_(
            ("metadata", "ckptsvc", "files", f0), {"nbytes": 1.5, "crc32c": "0"}
        ),
        "file_nbytes_bool": set_(
            ("metadata", "ckptsvc", "files", f0), {"nbytes": True, "crc32c": "0"}
        ),
        "file_crc_int": set_(("metadata", "ckptsvc", "files", f0), {"nbytes": 1, "crc32c": 5}),
        "components_list": set_(("components",), [1]),
        "component_not_object": set_(("components", "model"), "model"),
        "component_no_key": set_(("components", "model"), {"sharing_pattern": "global"}),
        "component_bad_ranks": set_(("components", "model", "ranks"), ["zero"]),
        "component_bad_replicated": set_(("components", "model", "replicated_across"), 3),
    }


@pytest.mark.parametrize("case", sorted(_mutations()))
def test_malformed_manifest_is_rejected(case: str) -> None:
    doc = copy.deepcopy(doc_of(sample_manifest()))
    _mutations()[case](doc)
    with pytest.raises(CorruptCheckpointError, match=r"ckpt/checkpoint_manifest\.json"):
        Manifest.from_json(raw_of(doc), where="ckpt/checkpoint_manifest.json")


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[]", b'"text"', b"null", b"\xff\xfe{}", b"[" * 50_000 + b"]" * 50_000],
    ids=["empty", "truncated", "array", "string", "null", "not_utf8", "deep"],
)
def test_unparseable_manifest_is_rejected(raw: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match="here"):
        Manifest.from_json(raw, where="here")


def test_truncated_manifest_never_parses() -> None:
    """Any strict prefix of a manifest is an error (a torn write is never 'complete')."""
    data = sample_manifest().to_json().rstrip(b"\n")
    for cut in range(0, len(data), 7):
        with pytest.raises(CorruptCheckpointError):
            Manifest.from_json(data[:cut], where="torn")
