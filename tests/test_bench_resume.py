"""``ckptsvc bench --resume`` and ``--many-tensors`` run and report their fields (issue 15).
No timing asserts: the figures are the bench's to report, not a test's to check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptsvc.tools import bench
from ckptsvc.tools.bench_resume import RESUME_METHODS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("node")]


def test_resume_mode_reports_every_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "resume.json"
    rc = bench.main(
        ["--resume", "--model-mb", "0.25", "--reps", "1", "--dir", str(tmp_path), "--json",
         str(out), "--quiet"]
    )  # fmt: skip
    doc = json.loads(out.read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == set(RESUME_METHODS)
    assert rc == 0, [r.get("reason") for r in rows.values() if r["status"] != "ok"]
    for r in rows.values():
        assert r["status"] == "ok" and r["reps"] == 1
        phases = r["interpreter_s"] + r["import_s"] + r["build_s"] + r["load_s"] + r["step_s"]
        assert r["start_to_step_s"] == pytest.approx(phases, rel=1e-6)  # the phases add up
        assert min(r[k] for k in ("import_s", "load_s", "step_s")) > 0
    assert rows["ckptsvc"]["best_peer"] in RESUME_METHODS
    table = capsys.readouterr().out
    assert "start->step s" in table and "ckptsvc find_latest + load_components" in table
    assert not list(tmp_path.glob("ckptsvc-bench-resume-*"))  # scratch removed


def test_resume_mode_refuses_unknown_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--resume", "--only", "nope"]) == 2
    assert "choose --only" in capsys.readouterr().err


def test_many_tensors_mode_reports_both_loads(tmp_path: Path) -> None:
    out = tmp_path / "many.json"
    rc = bench.main(["--many-tensors", "50", "--reps", "1", "--dir", str(tmp_path), "--json",
                     str(out), "--quiet"])  # fmt: skip
    doc = json.loads(out.read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"ckptsvc_load", "safetensors_load"}
    assert all(r["ntensors"] == 50 and r["load_s"] > 0 for r in rows.values())
    assert doc["target"]["ratio"] == pytest.approx(
        rows["ckptsvc_load"]["load_s"] / rows["safetensors_load"]["load_s"]
    )
    assert rc == (0 if doc["target"]["verdict"] == "PASS" else 1)
