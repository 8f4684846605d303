"""Hostile checkpoints: every reader (safetensors header, index, manifest, state skeleton,
legacy pickles) answers a malicious or mangled file with a specific exception
(:class:`CorruptCheckpointError`, or another :class:`CheckpointError`), never a crash, a
hang, a huge allocation, or a read outside the checkpoint directory.

``tests/test_safetensors_stream.py`` already fuzzes the safetensors codec with random bytes
and byte flips of a valid file; here the headers are *structured* (valid JSON with hostile
values), and the other readers get the same treatment.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import save_file

from ckptsvc.errors import CheckpointError, CorruptCheckpointError
from ckptsvc.format.manifest import MANIFEST_NAME, Manifest, check_relpath
from ckptsvc.format.safetensors_stream import DTYPE_SIZES, parse_header
from ckptsvc.read.loading import read_safetensors
from ckptsvc.read.regions import RegionReader
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.sharded_checkpoint import (
    SAFE_WEIGHTS_INDEX_NAME,
    load_checkpoint,
    load_shard_index,
    save_checkpoint,
)
from ckptsvc.stage.flatten import parse_skeleton, unflatten_state
from ckptsvc.storage import Location

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(suppress_health_check=[HealthCheck.too_slow])  # examples: conftest profile

# ---- strategies ------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
HOSTILE_NAMES = [
    "../outside.safetensors", "../../etc/passwd", "/etc/passwd", "s3://other/x.safetensors",
    "file:///etc/passwd", "gs://b/k", "a/../../b", "a\\..\\b", "a\x00b", "", ".", "..",
    "a//b", "./a", "a/.", "a/..", "/", "http://169.254.169.254/latest",
]  # fmt: skip
path_names = (
    st.sampled_from(HOSTILE_NAMES)
    | st.text(max_size=20)
    | st.builds(
        "/".join,
        st.lists(st.sampled_from(["..", ".", "", "a", "b.safetensors", "/", "x:"]), max_size=5),
    )
)


def _stays_inside(name: str) -> bool:
    base = "/ckpt"
    return os.path.normpath(os.path.join(base, name)).startswith(base + "/")


# ---- paths -----------------------------------------------------------------------------------


@FUZZ
@given(name=path_names)
def test_an_accepted_relative_name_always_stays_inside(name: str) -> None:
    try:
        check_relpath(name, where="t")
    except CorruptCheckpointError:
        return
    assert _stays_inside(name), name
    loc = Location.parse("/ckpt").join(name)
    assert loc.path.startswith("/ckpt/")


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_in_the_manifest_are_refused(name: str) -> None:
    doc = {
        "timestamp": "2024-01-01T00:00:00+00:00",
        "metadata": {
            "ckptsvc": {"format_version": 1, "files": {name: {"nbytes": 1, "crc32c": "0"}}}
        },
    }
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_json(json.dumps(doc).encode(), where="m")


@pytest.fixture(scope="module")
def secret_layout() -> Any:
    """A checkpoint dir next to a valid 'secret' safetensors file it must never read."""
    base = Path(tempfile.mkdtemp(prefix="ckptsvc-hostile-"))
    save_file({"secret": torch.full((4,), 42.0)}, str(base / "outside.safetensors"))
    ckpt = base / "ckpt"
    save_checkpoint(str(ckpt), {"w": torch.ones(4)}, safetensors=True)
    (ckpt / MANIFEST_NAME).unlink()  # legacy: the index alone decides what is read
    return ckpt


@FUZZ
@given(name=path_names)
def test_weight_map_never_reads_outside(secret_layout: Path, name: str) -> None:
    index = {"metadata": {}, "weight_map": {"w": name, "secret": name}}
    (secret_layout / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    try:
        got = load_checkpoint(str(secret_layout))
    except CheckpointError:
        return
    assert got is not None and "secret" not in got  # whatever loaded came from inside


@pytest.mark.parametrize("linked", ["shard", "index"])
def test_a_symlink_out_of_the_checkpoint_is_refused(tmp_path: Path, linked: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    ckpt = tmp_path / "ckpt"
    save_checkpoint(str(ckpt), {"w": torch.ones(4)}, safetensors=True)
    (ckpt / MANIFEST_NAME).unlink()
    name = "model-00001-of-00001.safetensors" if linked == "shard" else SAFE_WEIGHTS_INDEX_NAME
    if linked == "shard":
        save_file({"w": torch.full((4,), 42.0)}, str(outside / name))
    else:
        (outside / name).write_text((ckpt / name).read_text())
    (ckpt / name).unlink()
    os.symlink(outside / name, ckpt / name)
    with pytest.raises(CheckpointError, match="outside"):
        load_checkpoint(str(ckpt))


def test_verify_refuses_a_symlink_out_without_reading_it(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    save_checkpoint(str(ckpt), {"w": torch.ones(4)}, safetensors=True)
    shard = ckpt / "model-00001-of-00001.safetensors"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would block forever: the test would hang
    shard.unlink()
    os.symlink(fifo, shard)
    report = verify_checkpoint(str(ckpt))
    assert [p.kind for p in report.problems] == ["symlink"]


# ---- manifest --------------------------------------------------------------------------------

manifest_docs = st.fixed_dictionaries(
    {},
    optional={
        "timestamp": st.text(max_size=30) | json_values,
        "world_size": json_values,
        "checkpoint_path": json_values,
        "components": st.dictionaries(
            st.text(max_size=5),
            st.fixed_dictionaries(
                {"key": st.text(max_size=5) | json_values},
                optional={
                    "ranks": json_values,
                    "replicated_across": json_values,
                    "size_bytes": json_values,
                    "metadata": json_values,
                },
            )
            | json_values,
            max_size=3,
        )
        | json_values,
        "metadata": st.fixed_dictionaries(
            {},
            optional={
                "ckptsvc": st.fixed_dictionaries(
                    {},
                    optional={
                        "format_version": json_values,
                        "step": json_values,
                        "files": st.dictionaries(
                            path_names,
                            st.fixed_dictionaries({"nbytes": json_values, "crc32c": json_values})
                            | json_values,
                            max_size=4,
                        )
                        | json_values,
                    },
                )
                | json_values
            },
        )
        | json_values,
    },
)


@FUZZ
@given(doc=manifest_docs | json_values)
def test_manifest_reader_only_raises_corrupt(doc: Any) -> None:
    try:
        m = Manifest.from_json(json.dumps(doc).encode(), where="fuzz/manifest")
    except CorruptCheckpointError as e:
        assert "fuzz/manifest" in str(e)
        return
    for f in m.files:
        assert _stays_inside(f.path) and f.nbytes >= 0
    m.timestamp_s()  # never raises


@FUZZ
@given(raw=st.binary(max_size=200))
def test_manifest_reader_on_random_bytes(raw: bytes) -> None:
    with contextlib.suppress(CorruptCheckpointError):
        Manifest.from_json(raw, where="fuzz")


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 200_000 + b"]" * 200_000,
        b'{"a":' * 200_000 + b"1" + b"}" * 200_000,
        b"\xff\xfe\x00garbage",
        b'{"timestamp": "\xed\xa0\x80"}',  # a lone surrogate: not UTF-8
    ],
    ids=["deep_list", "deep_object", "binary", "surrogate"],
)
def test_manifest_deep_or_undecodable(raw: bytes) -> None:
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_json(raw, where="m")


@pytest.mark.parametrize("field", ["world_size", "ranks"])
def test_manifest_infinity_is_corrupt(field: str) -> None:
    doc: dict[str, Any] = {"timestamp": "2024-01-01T00:00:00+00:00"}
    if field == "world_size":
        doc["world_size"] = float("inf")
    else:
        doc["components"] = {"m": {"key": "m", "ranks": [float("inf")]}}
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_json(json.dumps(doc).encode(), where="m")


# ---- index -----------------------------------------------------------------------------------


@FUZZ
@given(
    doc=st.fixed_dictionaries(
        {},
        optional={
            "weight_map": st.dictionaries(st.text(max_size=8), path_names | json_values, max_size=4)
            | json_values,
            "metadata": json_values,
        },
    )
    | json_values
)
def test_index_reader_only_raises_corrupt(doc: Any) -> None:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "index.json").write_text(json.dumps(doc))
        try:
            index = load_shard_index(d, "index.json")
        except CorruptCheckpointError as e:
            assert "index.json" in str(e)
            return
    assert all(_stays_inside(f) for f in index["weight_map"].values())


@pytest.mark.parametrize(
    "raw",
    [b"[" * 200_000, b"\xff\xfe", b"", b'{"weight_map": {"a": "\xed\xa0\x80"}}'],
    ids=["deep", "binary", "empty", "surrogate"],
)
def test_index_deep_or_undecodable(tmp_path: Path, raw: bytes) -> None:
    (tmp_path / "index.json").write_bytes(raw)
    with pytest.raises(CorruptCheckpointError, match=r"index\.json"):
        load_shard_index(str(tmp_path), "index.json")


@pytest.mark.parametrize(
    "metadata",
    [[], {"param_sharing": 5}, {"param_sharing": [[["x"]]]}, {"param_sharing": "ab"}],
    ids=["metadata_list", "sharing_int", "sharing_nested", "sharing_str"],
)
def test_index_metadata_of_the_wrong_shape_is_corrupt(tmp_path: Path, metadata: Any) -> None:
    save_checkpoint(str(tmp_path), {"a": torch.ones(3)}, safetensors=True)
    (tmp_path / MANIFEST_NAME).unlink()
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    index["metadata"] = metadata
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="index"):
        load_checkpoint(str(tmp_path))


# ---- safetensors headers: valid JSON, hostile values -----------------------------------------

_dtypes = st.sampled_from([*DTYPE_SIZES, "F128", "", "f32", "I4"]) | json_scalars
_dims = st.integers(min_value=-2, max_value=2**40)
_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": _dtypes,
        "shape": st.lists(_dims, max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(min_value=-2, max_value=2**42), min_size=0, max_size=3)
        | json_values,
    },
)


def _file(header: Any, data: bytes) -> bytes:
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


@FUZZ
@given(
    header=st.dictionaries(st.text(max_size=6), _entries | json_values, max_size=4),
    data=st.binary(max_size=128),
)
def test_structured_headers_only_raise_corrupt(header: dict[str, Any], data: bytes) -> None:
    raw = _file(header, data)
    try:
        layout = parse_header(raw, file_nbytes=len(raw), where="fuzz.safetensors")
    except CorruptCheckpointError as e:
        assert "fuzz.safetensors" in str(e)
        return
    assert layout.data_offset + layout.data_nbytes <= len(raw)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "f.safetensors").write_bytes(raw)
        try:
            tensors = read_safetensors(Location.parse(str(Path(d, "f.safetensors"))))
        except CorruptCheckpointError:
            return
    for e in layout.entries:
        assert tuple(tensors[e.name].shape) == e.shape


def test_zero_size_tensor_with_a_huge_dimension_is_corrupt(tmp_path: Path) -> None:
    raw = _file({"w": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}, b"")
    path = tmp_path / "huge.safetensors"
    path.write_bytes(raw)
    with pytest.raises(CorruptCheckpointError):
        read_safetensors(Location.parse(str(path)))


def test_header_length_is_bounded_before_any_allocation(tmp_path: Path) -> None:
    """A length just under the limit on a small file: refused from the 8-byte prefix."""
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", 100 * 2**20 - 8) + b"{}      ")
    with pytest.raises(CorruptCheckpointError, match="runs past the end"):
        read_safetensors(Location.parse(str(path)))


# ---- the async state skeleton ------------------------------------------------------------------


def _skeleton(state: Any, **extra: Any) -> bytes:
    return json.dumps({"format": "ckptsvc-state", "version": 1, "state": state, **extra}).encode()


@FUZZ
@given(doc=json_values)
def test_skeleton_parser_only_raises_corrupt(doc: Any) -> None:
    try:
        parse_skeleton(json.dumps(doc).encode(), where="fuzz/ckptsvc_state.json")
    except CorruptCheckpointError as e:
        assert "ckptsvc_state.json" in str(e)


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe", b"[" * 200_000, _skeleton(1, version=99), b'{"format": "other"}'],
    ids=["binary", "deep", "future_version", "foreign"],
)
def test_skeleton_parser_rejects(raw: bytes) -> None:
    with pytest.raises(CorruptCheckpointError):
        parse_skeleton(raw, where="s")


def _nested(depth: int) -> Any:
    node: Any = 0
    for _ in range(depth):
        node = {"a": node}
    return node


HOSTILE_SKELETONS = {
    "dict_not_pairs": _skeleton({"__dict__": 5}),
    "dict_pair_too_short": _skeleton({"__dict__": [[1]]}),
    "dict_unhashable_key": _skeleton({"__dict__": [[[1], 2]]}),
    "float_not_a_number": _skeleton({"__float__": "abc"}),
    "float_of_a_list": _skeleton({"__float__": [1]}),
    "tuple_of_an_int": _skeleton({"__tuple__": 5}),
    "tensor_name_unhashable": _skeleton({"__tensor__": ["a"]}),
    "sharing_not_a_list": _skeleton(1, param_sharing=5),
    "nested_900_deep": _skeleton(_nested(900)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SKELETONS))
def test_hostile_skeleton_is_corrupt(case: str) -> None:
    doc = parse_skeleton(HOSTILE_SKELETONS[case], where="s")
    with pytest.raises(CorruptCheckpointError):
        unflatten_state(doc, {})


def test_skeleton_naming_a_missing_tensor_is_corrupt() -> None:
    doc = parse_skeleton(_skeleton({"w": {"__tensor__": "nope"}}), where="s")
    with pytest.raises(CorruptCheckpointError, match="nope"):
        unflatten_state(doc, {})


# ---- pickle ----------------------------------------------------------------------------------

_PACKAGE_DIRS = ("ckptsvc", "workers", "storage")
# restricted unpicklers: the writer protocol's, DCP metadata's
_PICKLE_ALLOWED = {"workers/protocol.py", "ckptsvc/dcp/reader.py"}


def _python_files() -> list[Path]:
    return sorted(p for d in _PACKAGE_DIRS for p in (REPO / d).rglob("*.py"))


def _call_name(node: ast.Call) -> str:
    parts = []
    func: ast.expr = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def pickle_offenders(source: str, rel: str) -> list[str]:
    """Calls in ``source`` that could unpickle arbitrary objects."""
    offenders = []
    tree = ast.parse(source, filename=rel)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle"):
            names = {a.name for a in node.names}
            if names & {"load", "loads", "Unpickler"}:
                offenders.append(f"{rel}:{node.lineno}: from {node.module} import {names}")
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if name.endswith("torch.load"):
            flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                offenders.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
        unpickling = name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.loads")
        if unpickling and rel not in _PICKLE_ALLOWED:
            offenders.append(f"{rel}:{node.lineno}: {name}")
    for cls in ast.walk(tree):
        if isinstance(cls, ast.ClassDef) and any(
            ast.unparse(b).endswith("Unpickler") for b in cls.bases
        ):
            methods = {m.name for m in cls.body if isinstance(m, ast.FunctionDef)}
            if "find_class" not in methods or rel not in _PICKLE_ALLOWED:
                offenders.append(f"{rel}: {cls.name} is an unrestricted or unexpected unpickler")
    return offenders


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(f)",
        "import torch\ntorch.load(f, weights_only=False)",
        "import pickle\npickle.loads(b)",
        "from torch import load",
        "import pickle\nclass U(pickle.Unpickler):\n    pass",
    ],
)
def test_the_pickle_scan_catches(source: str) -> None:
    assert pickle_offenders(source, "ckptsvc/x.py")


def test_no_pickle_is_loaded_without_weights_only() -> None:
    """Every torch.load passes weights_only=True; pickle loads only in the writer protocol,
    whose unpickler refuses every class it does not know (``find_class``)."""
    files = _python_files()
    assert len(files) > 20, "package sources not found"
    offenders = [
        o for p in files for o in pickle_offenders(p.read_text(), p.relative_to(REPO).as_posix())
    ]
    assert not offenders, "\n".join(offenders)


def test_a_region_read_refuses_a_symlink_out_of_the_checkpoint(tmp_path: Path) -> None:
    """A per-rank or sharded load reads headers through RegionReader: a shard that is a
    symlink to a valid file outside the checkpoint is refused, not read."""
    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.full((4,), 42.0)}, str(outside))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    name = "optimizer_state_rank_0.safetensors"
    os.symlink(outside, ckpt / name)
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint"):
        RegionReader(Location.parse(str(ckpt))).header(name)
