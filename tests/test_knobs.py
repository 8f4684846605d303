"""Every knob checks its value: ConfigError names the variable, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

import ckptsvc
from ckptsvc import knobs
from ckptsvc.errors import CheckpointError, ConfigError
from ckptsvc.knobs import Knob
from ckptsvc.storage import Location
from ckptsvc.workers.shard_writer import write_stream

ALL = [k for k in vars(knobs).values() if isinstance(k, Knob)]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ALL:
        monkeypatch.delenv(k.env_var, raising=False)


def test_config_error_is_exported_and_a_value_error() -> None:
    assert ckptsvc.ConfigError is ConfigError and "ConfigError" in ckptsvc.__all__
    assert issubclass(ConfigError, CheckpointError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("knob", ALL, ids=lambda k: k.name)
def test_defaults_pass_their_own_limits(knob: Knob) -> None:  # type: ignore[type-arg]
    assert knob.get() == knob.default
    assert knob.check(knob.default) == knob.default


@pytest.mark.parametrize(
    ("knob", "raw", "allowed"),
    [
        (knobs.WRITE_CHUNK_BYTES, "0", ">= 1"),
        (knobs.READ_CHUNK_BYTES, "0", ">= 1"),
        (knobs.PART_SIZE_BYTES, "-5", ">= 1"),
        (knobs.IO_THREADS, "0", ">= 1"),
        (knobs.MAX_SHARD_SIZE, "0", ">= 1"),
        (knobs.MAX_HEADER_BYTES, "0", ">= 1"),
        (knobs.DIRECT_IO_BUFFER_BYTES, "0", ">= 1"),
        (knobs.UPLOAD_PARTS_IN_FLIGHT, "0", ">= 1"),
        (knobs.READ_RANGES_IN_FLIGHT, "0", ">= 1"),
        (knobs.RETRY_ATTEMPTS, "0", ">= 1"),
        (knobs.IO_THREADS, "four", "an integer"),
        (knobs.WRITE_CHUNK_BYTES, "1.5", "an integer"),
        (knobs.WRITE_CHUNK_BYTES, "64MiB", "an integer"),
        (knobs.COPY_THREADS, "-1", ">= 0"),
        (knobs.MEMORY_BUDGET_BYTES, "-1", ">= 0"),
        (knobs.ARENAS_PER_RANK, "-2", ">= 0"),
        (knobs.DIRECT_IO_MIN_BYTES, "-1", ">= 0"),
        (knobs.READ_COALESCE_GAP_BYTES, "-1", ">= 0"),
        (knobs.RETRY_MAX_S, "-1", ">= 0"),
        (knobs.RETRY_BASE_S, "nan", "finite"),
        (knobs.COMMIT_TIMEOUT_S, "0", "> 0"),
        (knobs.COMMIT_TIMEOUT_S, "inf", "finite"),
        (knobs.WRITER_START_TIMEOUT_S, "soon", "a finite number"),
        (knobs.WRITER_LINGER_S, "-1", ">= 0"),
        (knobs.WRITER_NICE, "40", "from -20 to 19"),
        (knobs.DIRECT_IO, "sometimes", "auto, on, off"),
        (knobs.WRITER_LOG_LEVEL, "loud", "DEBUG, INFO"),
        (knobs.FSYNC, "maybe", "true/false"),
        (knobs.INCREMENTAL, "2", "1/0"),
        (knobs.SHM_DIR, "  ", "non-empty"),
    ],
)
def test_bad_environment_values_are_config_errors(
    monkeypatch: pytest.MonkeyPatch,
    knob: Knob,  # type: ignore[type-arg]
    raw: str,
    allowed: str,
) -> None:
    monkeypatch.setenv(knob.env_var, raw)
    with pytest.raises(ConfigError) as info:
        knob.get()
    text = str(info.value)
    assert f"{knob.env_var}={raw!r}" in text and allowed in text, text


@pytest.mark.parametrize(
    ("knob", "raw", "want"),
    [
        (knobs.COPY_THREADS, "0", 0),  # 0 means "all cores"
        (knobs.MEMORY_BUDGET_BYTES, " 0 ", 0),
        (knobs.WRITE_CHUNK_BYTES, "1", 1),
        (knobs.RETRY_BASE_S, "0", 0.0),
        (knobs.DIRECT_IO, "OFF", "OFF"),  # returned as given; direct_io_mode normalises
        (knobs.WRITER_LOG_LEVEL, "debug", "debug"),
        (knobs.FSYNC, " Off ", False),
        (knobs.INCREMENTAL, "yes", True),
        (knobs.WRITER_NICE, "-20", -20),
        (knobs.IO_THREADS, "", 4),  # empty: the default
    ],
)
def test_good_environment_values(
    monkeypatch: pytest.MonkeyPatch,
    knob: Knob,  # type: ignore[type-arg]
    raw: str,
    want: object,
) -> None:
    monkeypatch.setenv(knob.env_var, raw)
    got = knob.get()
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(
    ("knob", "value", "problem"),
    [
        (knobs.MAX_SHARD_SIZE, 0, "out of range"),
        (knobs.MAX_SHARD_SIZE, 1.5, "not valid"),
        (knobs.MAX_SHARD_SIZE, "1024", "not valid"),
        (knobs.IO_THREADS, True, "not valid"),
        (knobs.COPY_THREADS, -1, "out of range"),
        (knobs.COMMIT_TIMEOUT_S, 0.0, "out of range"),
        (knobs.COMMIT_TIMEOUT_S, float("nan"), "not valid"),
        (knobs.INCREMENTAL, "no", "not valid"),
        (knobs.DIRECT_IO, "sometimes", "not allowed"),
        (knobs.SHM_DIR, "", "not allowed"),
    ],
)
def test_bad_explicit_arguments_are_config_errors(
    knob: Knob,  # type: ignore[type-arg]
    value: object,
    problem: str,
) -> None:
    with pytest.raises(ConfigError) as info:
        knob.get(value)
    text = str(info.value)
    assert f"{knob.name}={value!r}" in text and knob.env_var in text and problem in text, text


def test_an_explicit_argument_wins_over_a_bad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTSVC_IO_THREADS", "zero")
    assert knobs.IO_THREADS.get(2) == 2
    assert knobs.RETRY_BASE_S.get(0) == 0.0 and type(knobs.RETRY_BASE_S.get(0)) is float
    assert knobs.INCREMENTAL.get(0) is False


def test_a_knob_with_a_default_outside_its_limits_is_refused() -> None:
    with pytest.raises(ConfigError, match="CKPTSVC_BROKEN"):
        Knob("broken", 0, "a size", min_value=1)


def test_write_chunk_zero_is_a_config_error_not_a_range_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``CKPTSVC_WRITE_CHUNK_BYTES=0`` used to fail in the middle of a write with "range()
    arg 3 must not be zero"; now the shard writer refuses it before opening the file."""
    monkeypatch.setenv("CKPTSVC_WRITE_CHUNK_BYTES", "0")
    with pytest.raises(ConfigError, match="CKPTSVC_WRITE_CHUNK_BYTES='0'"):
        write_stream(Location.parse(str(tmp_path / "f.bin")), [b"x" * 10], rel_path="f.bin")
    assert not (tmp_path / "f.bin").exists()


def test_async_checkpointer_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_shard_size=0"):
        ckptsvc.AsyncCheckpointer(tmp_path, max_shard_size=0)
    with pytest.raises(ConfigError, match="copy_threads=-1"):
        ckptsvc.AsyncCheckpointer(tmp_path, copy_threads=-1)
