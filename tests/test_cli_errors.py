"""Every ``ckptsvc`` command fails with one line on stderr (``ckptsvc <cmd>: error: ...``),
a non-zero exit status and no traceback: 1 for a failure, 2 for a usage or configuration
mistake, 130 for Ctrl-C; ``--debug`` adds the traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from ckptsvc import cli

# (argv with {tmp} for a scratch directory holding a regular file "afile", exit status,
# words the line must contain)
FAILURES = {
    "ls": (["ls", "nosuch://x"], 1, "Protocol not known"),
    "inspect": (["inspect", "{tmp}/missing"], 1, "not found"),
    "gc": (["gc", "{tmp}/afile"], 1, "Not a directory"),
    "crashtest": (["crashtest", "--storage", "nosuch://x", "--points", "1"], 1, "nosuch"),
    "demo": (["demo", "--output", "{tmp}/afile", "--steps", "2", "--no-progress"], 1, "afile"),
    "cp": (["cp", "{tmp}/missing", "{tmp}/copy"], 1, "no checkpoint manifest"),
    "prune": (["prune", "nosuch://x", "--keep", "1"], 1, "Protocol not known"),
    "bench": (["bench", "--size", "lots"], 2, "cannot parse size"),
    "simulate": (["simulate", "--ranks", "8,lots"], 2, "not a list of integers"),
    "export-hf": (["export-hf", "{tmp}/missing", "{tmp}/out"], 1, "no checkpoint"),
    "bad-json": (["ls", "{tmp}", "--storage-options", "{x"], 2, "not valid JSON"),
}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_command_failure_is_one_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, status, words = FAILURES[case]
    (tmp_path / "afile").write_text("not a directory")
    code, err = _run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == status, err
    assert err.count("\n") == 1, err
    assert err.startswith(f"ckptsvc {argv[0]}: error: "), err
    assert words in err and "Traceback" not in err


def test_verify_failure_is_a_report_and_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = _run(["verify", str(tmp_path / "missing")], capsys)
    assert code == 1


def test_usage_error_is_argparse_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["ls"], capsys)
    assert code == 2 and "the following arguments are required: root" in err


@pytest.mark.parametrize(
    ("exc", "status", "words"),
    [
        (RuntimeError("boom"), 1, "RuntimeError: boom (unexpected; rerun with --debug"),
        (OSError(28, "No space left on device"), 1, "OSError: [Errno 28] No space left"),
        (ValueError("two\nlines"), 1, "ValueError: two lines"),
        (KeyboardInterrupt(), 130, "ckptsvc version: interrupted"),
    ],
)
def test_any_exception_is_one_line(
    exc: BaseException,
    status: int,
    words: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise exc

    monkeypatch.setattr(cli, "cmd_version", fail)
    code, err = _run(["version"], capsys)
    assert code == status, err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err, err


def test_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_version", fail)
    code, err = _run(["--debug", "version"], capsys)
    assert code == 1
    assert "Traceback" in err and err.rstrip().endswith("ckptsvc version: error: RuntimeError: "
                                                         "boom (unexpected; rerun with --debug "
                                                         "for the traceback)")  # fmt: skip


def test_real_process_prints_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ckptsvc.cli", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("ckptsvc inspect: error: ") and proc.stderr.count("\n") == 1
