"""Our streaming safetensors encoder/decoder against the reference ``safetensors`` library.

Encoder: ``plan_shard`` + ``tensor_bytes`` (in memory) and ``write_shard`` (to local disk
and ``memory://``) must produce files that ``safetensors.torch.load_file`` / ``safe_open``
load bit for bit, for every dtype torch and safetensors share, 0-d, empty, non-contiguous
tensors and views sharing storage. A tiny shard is pinned byte for byte in
``tests/golden/tiny.safetensors``.

Decoder: ``parse_header`` and ``ckptsvc.read.loading.read_safetensors`` reject every malformed
file with ``CorruptCheckpointError`` naming the file, never another exception.

Regenerate the golden file (only on a deliberate format change) with
``CKPTSVC_REGENERATE_GOLDEN=1 pytest tests/test_safetensors_stream.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import hypothesis.strategies as st
import pytest
import safetensors
import safetensors.torch
import torch
from helpers_models import ALL_DTYPES, assert_bitwise_equal, random_tensor
from hypothesis import HealthCheck, given, settings

from ckptsvc.errors import CorruptCheckpointError, InvalidStateError
from ckptsvc.format.safetensors_stream import DTYPE_SIZES, ShardLayout, parse_header, plan_shard
from ckptsvc.read.loading import read_safetensors
from ckptsvc.stage.tensors import dtype_from_torch, dtype_to_torch, tensor_bytes
from ckptsvc.storage import Location
from ckptsvc.workers.shard_writer import write_shard

GOLDEN_DIR = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("CKPTSVC_REGENERATE_GOLDEN") == "1"


# ---- helpers ---------------------------------------------------------------------------------


def layout_of(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> ShardLayout:
    return plan_shard(
        ((n, dtype_from_torch(t.dtype, name=n), tuple(t.shape)) for n, t in tensors.items()),
        metadata=metadata,
    )


def chunks_of(layout: ShardLayout, tensors: Mapping[str, torch.Tensor]) -> Iterator[memoryview]:
    for e in layout.entries:
        yield tensor_bytes(tensors[e.name])


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The whole file in memory: header, then each tensor's bytes in layout order."""
    layout = layout_of(tensors, metadata)
    return layout.header + b"".join(bytes(c) for c in chunks_of(layout, tensors))


def write_file(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    layout = layout_of(tensors, metadata)
    record = write_shard(
        Location.parse(str(path)), layout, chunks_of(layout, tensors), rel_path=path.name
    )
    assert record.nbytes == layout.file_nbytes == path.stat().st_size


def assert_loads_bitwise(path: Path, want: Mapping[str, torch.Tensor]) -> None:
    """Both reference readers (load_file and safe_open) and ours give back ``want``."""
    got = safetensors.torch.load_file(str(path))
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert_bitwise_equal(got[name], t, name=name)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(want)
        for name, t in want.items():
            assert_bitwise_equal(f.get_tensor(name), t, name=name)
    ours = read_safetensors(Location.parse(str(path)))
    assert sorted(ours) == sorted(want)
    for name, t in want.items():
        assert_bitwise_equal(ours[name], t, name=name)


def raw_file(header: object, data: bytes = b"", *, pad: bool = True) -> bytes:
    """A hand-made safetensors file; ``header`` is a JSON-able object or raw bytes."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


# ---- encoder: every dtype, every tensor shape ------------------------------------------------


def test_dtype_table_covers_every_shared_dtype() -> None:
    """Our dtype map names exactly the dtypes the reference library maps for torch."""
    reference = safetensors.torch._TYPES  # the library's own table
    for st_name, torch_dtype in reference.items():
        assert isinstance(torch_dtype, torch.dtype)
        assert dtype_from_torch(torch_dtype) == st_name
        assert dtype_to_torch(st_name) == torch_dtype
        assert DTYPE_SIZES[st_name] == torch.empty((), dtype=torch_dtype).element_size()
    assert set(ALL_DTYPES) == set(reference.values())


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_round_trips_bitwise(dtype: torch.dtype, tmp_path: Path) -> None:
    tensors = {
        "matrix": random_tensor(dtype, (5, 7), seed=1),
        "scalar": random_tensor(dtype, (), seed=2),
        "empty": torch.empty((0, 4), dtype=dtype),
        "vector": random_tensor(dtype, (13,), seed=3),
    }
    path = tmp_path / "all.safetensors"
    write_file(path, tensors, {"format": "pt"})
    assert_loads_bitwise(path, tensors)
    # the in-memory encoding is the same bytes, and the reference loader agrees
    assert encode(tensors, {"format": "pt"}) == path.read_bytes()
    loaded = safetensors.torch.load(path.read_bytes())
    for name, t in tensors.items():
        assert_bitwise_equal(loaded[name], t, name=name)


def test_all_dtypes_in_one_shard_are_aligned_and_ordered(tmp_path: Path) -> None:
    tensors = {
        f"t_{str(d).removeprefix('torch.')}": random_tensor(d, (3, 3), seed=i)
        for i, d in enumerate(ALL_DTYPES)
    }
    tensors["odd_u8"] = random_tensor(torch.uint8, (7,), seed=99)  # odd byte count mid-file
    layout = layout_of(tensors, {"format": "pt"})
    assert len(layout.header) % 8 == 0, "header must be padded to 8 bytes"
    assert layout.header[8:].rstrip(b" ").endswith(b"}")
    keys = [(-DTYPE_SIZES[e.dtype], e.name) for e in layout.entries]
    assert keys == sorted(keys), "tensors must be ordered by dtype size (desc), then name"
    cursor = 0
    for e in layout.entries:
        assert e.begin == cursor, "no holes between tensors"
        assert (layout.data_offset + e.begin) % DTYPE_SIZES[e.dtype] == 0, f"{e.name} misaligned"
        cursor = e.end
    path = tmp_path / "mixed.safetensors"
    write_file(path, tensors, {"format": "pt"})
    assert_loads_bitwise(path, tensors)


def test_metadata_is_written_and_read(tmp_path: Path) -> None:
    meta = {"format": "pt", "step": "12", "unicode": "größe ✓"}
    path = tmp_path / "meta.safetensors"
    write_file(path, {"w": torch.ones(2)}, meta)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
    assert (
        parse_header(path.read_bytes(), file_nbytes=path.stat().st_size, where=str(path)).metadata
        == meta
    )


def test_no_metadata_means_no_metadata_key() -> None:
    raw = encode({"w": torch.ones(2)})
    assert b"__metadata__" not in raw
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(raw)
        f.flush()
        with safetensors.safe_open(f.name, framework="pt") as sf:
            assert not sf.metadata()


def test_metadata_must_be_strings() -> None:
    with pytest.raises(InvalidStateError, match="__metadata__"):
        plan_shard([("w", "F32", (1,))], metadata={"step": 3})  # type: ignore[dict-item]


def test_byte_identical_to_reference_writer() -> None:
    """With one dtype per size class our bytes equal ``safetensors.torch.save`` exactly."""
    tensors = {
        "b.weight": random_tensor(torch.float32, (4, 3), seed=1),
        "a.ids": random_tensor(torch.int64, (5,), seed=2),
        "c.half": random_tensor(torch.bfloat16, (6,), seed=3),
        "d.mask": random_tensor(torch.bool, (3,), seed=4),
        "e.scalar": torch.tensor(1.5, dtype=torch.float32),
    }
    meta = {"format": "pt"}
    assert encode(tensors, meta) == safetensors.torch.save(tensors, metadata=meta)


def _non_contiguous_cases() -> dict[str, torch.Tensor]:
    base = random_tensor(torch.float32, (6, 8), seed=5)
    return {
        "transposed": base.t(),
        "strided_rows": base[::2],
        "strided_cols": base[:, 1::3],
        "strided_both": base[1::2, ::3],
        "expanded": torch.arange(3, dtype=torch.float32).expand(4, 3),
        "channels_last": random_tensor(torch.bfloat16, (2, 3, 4, 5), seed=6).to(
            memory_format=torch.channels_last
        ),
        "permuted_int": random_tensor(torch.int16, (2, 3, 4), seed=7).permute(2, 0, 1),
        "diagonal": base[:6, :6].diagonal(),
    }


@pytest.mark.parametrize("case", sorted(_non_contiguous_cases()))
def test_non_contiguous_tensors(case: str, tmp_path: Path) -> None:
    t = _non_contiguous_cases()[case]
    path = tmp_path / "nc.safetensors"
    write_file(path, {case: t})
    assert_loads_bitwise(path, {case: t.contiguous()})


def test_views_sharing_storage_each_store_their_own_bytes(tmp_path: Path) -> None:
    base = random_tensor(torch.float32, (64,), seed=8)
    views = {
        "head": base[:16],
        "tail": base[48:],  # contiguous, non-zero storage offset
        "overlap_a": base[8:24],
        "overlap_b": base[16:40],  # overlaps overlap_a
        "reshaped": base[32:48].view(4, 4),
        "every_third": base[1::3],
        "as_bytes": base[:4].view(torch.uint8),  # a view with another dtype
    }
    path = tmp_path / "views.safetensors"
    write_file(path, views)
    assert_loads_bitwise(path, {k: v.clone() for k, v in views.items()})
    assert (
        path.stat().st_size < 64 + sum(v.numel() * v.element_size() for v in views.values()) + 1024
    )


def test_conjugate_and_negative_views_store_their_values(tmp_path: Path) -> None:
    """Lazy conj/neg views hold the *logical* values; the file must too (or refuse clearly)."""
    c = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    x = torch.tensor([1.0, -2.0])
    tensors = {"conj": c.conj(), "neg": torch._neg_view(x)}
    path = tmp_path / "lazy.safetensors"
    try:
        write_file(path, tensors)
    except InvalidStateError:
        return  # a clear refusal is acceptable
    assert_loads_bitwise(path, {k: v.resolve_conj().resolve_neg() for k, v in tensors.items()})


def test_tensor_bytes_of_contiguous_tensor_is_zero_copy() -> None:
    """Streaming straight from memory: the view aliases the tensor, no staging copy."""
    t = torch.zeros(4, dtype=torch.float32)
    mv = tensor_bytes(t)
    assert mv.nbytes == 16 and mv.format == "B"
    t[0] = 1.0
    assert bytes(mv[:4]) == struct.pack("<f", 1.0)
    offset_view = torch.arange(10, dtype=torch.int64)[3:6]
    assert bytes(tensor_bytes(offset_view)) == struct.pack("<3q", 3, 4, 5)


def test_write_shard_to_memory_filesystem() -> None:
    tensors = {
        "a": random_tensor(torch.float16, (9,), seed=1),
        "b": random_tensor(torch.int32, (2, 2), seed=2),
    }
    layout = layout_of(tensors, {"format": "pt"})
    loc = Location.parse(f"memory://stream-{uuid.uuid4().hex}/shard.safetensors")
    rec = write_shard(loc, layout, chunks_of(layout, tensors), rel_path="shard.safetensors")
    data = loc.read_bytes()
    assert rec.nbytes == len(data) == layout.file_nbytes
    loaded = safetensors.torch.load(data)
    for k, v in tensors.items():
        assert_bitwise_equal(loaded[k], v, name=k)
    ours = read_safetensors(loc)
    for k, v in tensors.items():
        assert_bitwise_equal(ours[k], v, name=k)


def test_read_subset_of_names(tmp_path: Path) -> None:
    tensors = {f"w{i}": random_tensor(torch.float32, (i + 1,), seed=i) for i in range(5)}
    path = tmp_path / "subset.safetensors"
    write_file(path, tensors)
    got = read_safetensors(Location.parse(str(path)), names={"w1", "w3", "missing"})
    assert sorted(got) == ["w1", "w3"]
    assert_bitwise_equal(got["w3"], tensors["w3"])


def test_write_shard_rejects_wrong_byte_count(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(4)}
    layout = layout_of(tensors)
    path = tmp_path / "short.safetensors"
    with pytest.raises(InvalidStateError):
        write_shard(
            Location.parse(str(path)), layout, [memoryview(b"\x00" * 8)], rel_path=path.name
        )
    assert not path.exists(), "a failed stream must not leave a partial file"


@pytest.mark.parametrize(
    ("specs", "needle"),
    [
        ([("a", "F32", (1,)), ("a", "F32", (1,))], "twice"),
        ([("a", "F128", (1,))], "F128"),
        ([("a", "F32", (-1,))], "negative"),
        ([("", "F32", (1,))], "name"),
        ([("__metadata__", "F32", (1,))], "name"),
    ],
)
def test_plan_shard_rejects_bad_specs(
    specs: list[tuple[str, str, tuple[int, ...]]], needle: str
) -> None:
    with pytest.raises(InvalidStateError, match=needle):
        plan_shard(specs)


def test_unsupported_torch_dtype_is_invalid_state() -> None:
    with pytest.raises(InvalidStateError, match=r"opt\.weird"):
        dtype_from_torch(torch.complex128, name="opt.weird")


# ---- golden bytes ----------------------------------------------------------------------------


def _tiny_tensors() -> dict[str, torch.Tensor]:
    return {
        "weight": torch.tensor([[1.0, -2.0], [0.5, float("inf")]], dtype=torch.float32),
        "ids": torch.tensor([1, 2, 3], dtype=torch.int16),
    }


_TINY_META = {"format": "pt", "producer": "ckptsvc-golden"}


def test_golden_tiny_shard() -> None:
    golden = GOLDEN_DIR / "tiny.safetensors"
    ours = encode(_tiny_tensors(), _TINY_META)
    if REGENERATE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        golden.write_bytes(ours)
    assert golden.exists(), "run with CKPTSVC_REGENERATE_GOLDEN=1 once to create the golden file"
    pinned = golden.read_bytes()
    assert ours == pinned, "encoder output changed: a format change needs a FORMAT_VERSION bump"
    # the pinned file itself is what the reference library expects
    loaded = safetensors.torch.load(pinned)
    for k, v in _tiny_tensors().items():
        assert_bitwise_equal(loaded[k], v, name=k)
    with safetensors.safe_open(str(golden), framework="pt") as f:
        assert f.metadata() == _TINY_META


# ---- decoder: malformed files ----------------------------------------------------------------

_GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

MALFORMED: dict[str, bytes] = {
    "absurd_header_length": struct.pack("<Q", 2**40) + b"{}",
    "header_past_eof": struct.pack("<Q", 1000) + b"{}      ",
    "too_short_for_prefix": b"\x01\x02\x03",
    "not_json": raw_file(b"{this is not json"),
    "not_utf8": raw_file(b'{"\xff\xfe": 1}'),
    "json_array": raw_file([1, 2, 3]),
    "json_string": raw_file("hello"),
    "entry_not_object": raw_file({"w": 5}, b"\x00" * 8),
    "empty_name": raw_file({"": _GOOD_ENTRY}, b"\x00" * 8),
    "unknown_dtype": raw_file(
        {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\x00" * 16
    ),
    "missing_dtype": raw_file({"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 8),
    "shape_not_list": raw_file(
        {"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\x00" * 8
    ),
    "negative_dim": raw_file(
        {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\x00" * 8
    ),
    "float_dim": raw_file(
        {"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\x00" * 8
    ),
    "offsets_not_list": raw_file(
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": 8}}, b"\x00" * 8
    ),
    "offsets_three": raw_file(
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, b"\x00" * 8
    ),
    "offsets_negative": raw_file(
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\x00" * 8
    ),
    "offsets_reversed": raw_file(
        {"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\x00" * 8
    ),
    "offsets_bool": raw_file(
        {"w": {"dtype": "BOOL", "shape": [1], "data_offsets": [False, True]}}, b"\x00"
    ),
    "offsets_shape_mismatch": raw_file(
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\x00" * 12
    ),
    "offsets_out_of_range": raw_file(
        {"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, b"\x00" * 16
    ),
    "overlapping": raw_file(
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
        },
        b"\x00" * 24,
    ),
    "metadata_not_object": raw_file({"__metadata__": [1], "w": _GOOD_ENTRY}, b"\x00" * 8),
    "metadata_int_value": raw_file({"__metadata__": {"step": 3}, "w": _GOOD_ENTRY}, b"\x00" * 8),
    "metadata_nested": raw_file({"__metadata__": {"a": {"b": "c"}}, "w": _GOOD_ENTRY}, b"\x00" * 8),
    "truncated_data": raw_file(
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 9
    ),
    "deeply_nested": raw_file(b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_parse_header_rejects(case: str) -> None:
    raw = MALFORMED[case]
    where = f"s3://bucket/ckpt/{case}.safetensors"
    with pytest.raises(CorruptCheckpointError) as info:
        parse_header(raw, file_nbytes=len(raw), where=where)
    assert where in str(info.value), f"the error must name the file: {info.value}"


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_read_safetensors_rejects(case: str, tmp_path: Path) -> None:
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(MALFORMED[case])
    with pytest.raises(CorruptCheckpointError) as info:
        read_safetensors(Location.parse(str(path)))
    assert str(path) in str(info.value), f"the error must name the file: {info.value}"


def test_reference_library_agrees_files_are_malformed(tmp_path: Path) -> None:
    """Sanity check of the corpus: the reference reader refuses these as well."""
    for case in (
        "absurd_header_length",
        "not_json",
        "unknown_dtype",
        "offsets_out_of_range",
        "overlapping",
        "truncated_data",
    ):
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(MALFORMED[case])
        with pytest.raises(Exception):  # noqa: B017 - the reference raises its own types
            safetensors.torch.load_file(str(path))


def test_truncated_real_file_names_file(tmp_path: Path) -> None:
    tensors = {
        "a": random_tensor(torch.float32, (64,), seed=1),
        "b": random_tensor(torch.int8, (10,), seed=2),
    }
    path = tmp_path / "cut.safetensors"
    write_file(path, tensors)
    full = path.read_bytes()
    for cut in (len(full) - 1, len(full) - 30, 20, 7, 0):
        path.write_bytes(full[:cut])
        with pytest.raises(CorruptCheckpointError, match=r"cut\.safetensors"):
            read_safetensors(Location.parse(str(path)))


def test_header_limit_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = encode({"w": torch.ones(1)})
    monkeypatch.setenv("CKPTSVC_MAX_HEADER_BYTES", "8")
    with pytest.raises(CorruptCheckpointError, match="CKPTSVC_MAX_HEADER_BYTES"):
        parse_header(raw, file_nbytes=len(raw), where="x.safetensors")


# ---- properties ------------------------------------------------------------------------------

_shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=3).map(tuple)
_dtypes = st.sampled_from(ALL_DTYPES)
_names = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12).filter(
    lambda s: s != "__metadata__"
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.dictionaries(
        _names, st.tuples(_dtypes, _shapes, st.integers(0, 2**16)), min_size=0, max_size=6
    ),
    meta=st.one_of(st.none(), st.dictionaries(_names, st.text(max_size=10), max_size=3)),
)
def test_random_shards_round_trip(
    specs: dict[str, tuple[torch.dtype, tuple[int, ...], int]], meta: dict[str, str] | None
) -> None:
    tensors = {
        name: random_tensor(dtype, shape, seed=seed) for name, (dtype, shape, seed) in specs.items()
    }
    raw = encode(tensors, meta)
    loaded = safetensors.torch.load(raw)
    assert sorted(loaded) == sorted(tensors)
    for name, t in tensors.items():
        assert_bitwise_equal(loaded[name], t, name=name)
    layout = parse_header(raw, file_nbytes=len(raw), where="prop.safetensors")
    assert layout.file_nbytes == len(raw)
    assert (layout.metadata or None) == (meta or None)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.safetensors"
        path.write_bytes(raw)
        ours = read_safetensors(Location.parse(str(path)))
    for name, t in tensors.items():
        assert_bitwise_equal(ours[name], t, name=name)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_only_raise_corrupt(raw: bytes) -> None:
    with contextlib.suppress(CorruptCheckpointError):
        parse_header(raw, file_nbytes=len(raw), where="fuzz.safetensors")


_VALID = encode(
    {
        "a": torch.arange(6, dtype=torch.float32),
        "b": torch.tensor([True, False]),
        "c": torch.ones(2, 2, dtype=torch.bfloat16),
    },
    {"format": "pt"},
)


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4
    ),
    cut=st.one_of(st.none(), st.integers(0, len(_VALID))),
)
def test_mutated_valid_file_only_raises_corrupt(
    edits: list[tuple[int, int]], cut: int | None
) -> None:
    """Flip bytes of a valid file (header and data) and maybe truncate it: reading either
    succeeds with tensors of the declared shapes or raises CorruptCheckpointError."""
    raw = bytearray(_VALID)
    for pos, val in edits:
        raw[pos] = val
    data = bytes(raw[:cut] if cut is not None else raw)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(data)
        try:
            got = read_safetensors(Location.parse(str(path)))
        except CorruptCheckpointError as e:
            assert "m.safetensors" in str(e)
            return
    layout = parse_header(data, file_nbytes=len(data), where="m")
    for entry in layout.entries:
        assert tuple(got[entry.name].shape) == entry.shape
