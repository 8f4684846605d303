"""``ckptsvc bench --loop`` end to end at tiny sizes: real worker processes, real saves.

No timed assertions: the checks are on structure (every mode reported with sane fields),
on the saves themselves (each saving mode wrote one durable checkpoint per save that
loads), and on determinism (every mode's step-k checkpoint holds the same values, so an
overlapped snapshot that copied a half-updated tensor would differ from the sync save).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, load_state
from ckptsvc.sharded_checkpoint import load_checkpoint
from ckptsvc.stage.flatten import flatten_state
from ckptsvc.tools.bench_loop import (
    OVERLAP_TARGET,
    evaluate_loop_target,
    format_loop_table,
    merge_rounds,
    worker_env,
)
from ckptsvc.tools.bench_loop_worker import MODES, ModeResult, interval_means

HAS_OVERLAP = "overlap" in inspect.signature(AsyncCheckpointer.save).parameters
CLI = "import sys; from ckptsvc.cli import main; sys.exit(main(sys.argv[1:]))"
TINY = ("--model-mb", "0.5", "--batch", "8", "--quiet", "--keep")


def run_loop_cli(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLI, "bench", "--loop", *args],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip


def modes_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mode"]: m for m in doc["modes"]}


def step_of(path: str) -> int:
    return int(path.rstrip("/").rsplit("-", 1)[1])


def saved_tensors(mode: str, path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's model and optimizer tensors by flattened name (model only for DCP)."""
    if mode == "sync":
        return load_checkpoint(path)  # type: ignore[return-value]
    if mode in ("async", "overlapped"):
        return dict(flatten_state(load_state(path)).tensors)
    import torch.distributed.checkpoint as dcp

    from ckptsvc.tools.bench_loop_worker import LoopConfig, _build

    cfg = LoopConfig("dcp_async", 1, 0, 1, 0.5, 8, root="", result_path="")
    model = _build(cfg)[0]
    target = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(target, checkpoint_id=path, no_dist=True)
    return {f"model.{k}": v for k, v in target["model"].items()}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.slow
def test_every_mode_runs_saves_and_checkpoints_agree(tmp_path: Path) -> None:
    out = tmp_path / "loop.json"
    proc = run_loop_cli(
        "--steps", "3", "--warmup", "1", "--reps", "1", *TINY,
        "--dir", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = json.loads(out.read_text())
    modes = modes_of(doc)
    assert list(modes) == list(MODES)  # the baseline first, every mode reported
    assert "overlapped.step / none.step" in proc.stdout  # the table went to stdout too

    base = modes["none"]
    assert base["status"] == "ok"
    assert (base["saves_started"], base["saves_completed"], base["checkpoints"]) == (0, 0, [])
    assert base["blocking_s_mean"] is None and base["drain_s"] is None
    assert base["copy_s"] > 0 and base["compute_s_median"] > 0

    if HAS_OVERLAP:
        assert modes["overlapped"]["status"] == "ok", modes["overlapped"]["reason"]
        assert modes["overlapped"]["fence_wait_s_mean"] is not None
    else:  # reported honestly, never faked
        assert modes["overlapped"]["status"] == "unavailable"
        assert "overlap" in modes["overlapped"]["reason"]

    by_step: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for name, m in modes.items():
        if name == "none" or m["status"] == "unavailable":
            continue
        assert m["status"] == "ok", f"{name}: {m['reason']}"
        assert m["state_nbytes"] == base["state_nbytes"] > 0
        assert m["step_s_median"] > 0 and 0 < m["compute_s_median"] <= m["step_s_median"]
        assert m["saves_started"] == m["saves_completed"] == 4  # warm-up included, every 1
        assert m["blocking_s_mean"] is not None and m["blocking_s_max"] >= m["blocking_s_mean"]
        assert [step_of(p) for p in m["checkpoints"]] == [1, 2, 3, 4]
        for path in m["checkpoints"]:
            assert os.path.isdir(path), path
        for path in (m["checkpoints"][0], m["checkpoints"][-1]):
            by_step.setdefault(step_of(path), {})[name] = saved_tensors(name, path)

    for step, saved in by_step.items():
        reference = saved["sync"]
        assert any(k.startswith("optimizer.") for k in reference)
        for name, tensors in saved.items():
            for key, value in tensors.items():
                assert torch.equal(value, reference[key]), f"{name} step {step}: {key} differs"
    first, last = by_step[1]["sync"], by_step[4]["sync"]
    assert not torch.equal(first["model.0.0.weight"], last["model.0.0.weight"])  # it trained


@pytest.mark.slow
def test_every_n_and_a_subset_of_modes(tmp_path: Path) -> None:
    out = tmp_path / "loop.json"
    proc = run_loop_cli(
        "--only", "async,none", "--every", "2", "--steps", "4", "--warmup", "0", "--reps", "2",
        *TINY, "--dir", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = json.loads(out.read_text())
    modes = modes_of(doc)
    assert list(modes) == ["none", "async"]  # the baseline runs first whatever the order
    assert doc["config"]["every"] == 2
    assert modes["async"]["saves_completed"] == 4  # 2 per round
    assert [step_of(p) for p in modes["async"]["checkpoints"]] == [2, 4, 2, 4]
    assert len(modes["async"]["step_s_samples"]) == 4  # 2 save intervals per round
    assert modes["async"]["extras"]["rounds"] == 2
    assert doc["target"]["verdict"] == "n/a" and "overlapped" in doc["target"]["note"]


@pytest.mark.slow
def test_json_to_stdout_and_scratch_removed_without_keep(tmp_path: Path) -> None:
    proc = run_loop_cli(
        "--only", "none,sync", "--steps", "2", "--warmup", "0", "--reps", "1", "--model-mb", "0.5",
        "--batch", "4", "--quiet", "--dir", str(tmp_path), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # nothing but the document on stdout
    assert doc["schema"] == "ckptsvc-bench-loop/1"
    assert modes_of(doc)["sync"]["saves_completed"] == 2
    assert list(tmp_path.iterdir()) == []  # checkpoints, logs and results removed


@pytest.mark.parametrize(
    "args, message",
    [
        (("--only", "none,bogus"), "unknown loop mode(s) bogus"),
        # one subprocess each: the fast lane checks the first
        pytest.param(("--every", "0"), "--every", marks=pytest.mark.slow),
        pytest.param(("--model-mb", "0"), "--model-mb", marks=pytest.mark.slow),
        pytest.param(("--reps", "0"), "--reps", marks=pytest.mark.slow),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    proc = run_loop_cli(*args, "--dir", str(tmp_path))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert list(tmp_path.iterdir()) == []


def _ok(mode: str, step_s: float, **kw: Any) -> ModeResult:
    return ModeResult(mode, "ok", step_s_median=step_s, **kw)


def test_target_pass_fail_and_missing() -> None:
    base = _ok("none", 1.0, compute_s_median=0.8, copy_s=0.1)
    overlapped = _ok("overlapped", 1.04, blocking_s_mean=0.02, fence_wait_s_mean=0.01)
    passing = evaluate_loop_target([base, overlapped, _ok("async", 1.3)])
    assert (passing.verdict, passing.threshold) == ("PASS", OVERLAP_TARGET)
    assert passing.value == pytest.approx(1.04)
    assert "non-overlapped async 1.300" in passing.note and "copy 0.100 s" in passing.note
    assert "save+fence hold 3.0% of a step" in passing.note
    assert evaluate_loop_target([base, _ok("overlapped", 1.06)]).verdict == "FAIL"
    skipped = ModeResult("overlapped", "unavailable", reason="no overlap=")
    missing = evaluate_loop_target([base, skipped])
    assert (missing.verdict, missing.value) == ("n/a", None)
    table = format_loop_table([base, skipped], missing, "title")
    assert "unavailable: no overlap=" in table and "n/a" in table


def test_workers_sleep_when_idle_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert worker_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert worker_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_intervals_end_with_a_save_and_only_complete_ones_count() -> None:
    steps = [(i, float(i)) for i in range(3, 12)]  # warm-up 3: steps 3..11 measured
    assert interval_means(steps, every=1) == [float(i) for i in range(3, 12)]
    # every 4: saves after steps 3, 7, 11 (0-based); interval 4..7 and 8..11 are complete
    assert interval_means(steps, every=4) == [5.5, 9.5]


def test_rounds_merge_pools_steps_and_sums_saves() -> None:
    one = _ok(
        "async",
        0.2,
        step_s_samples=(0.1, 0.2, 0.3),
        saves_started=3,
        saves_completed=3,
        blocking_s_mean=0.01,
        blocking_s_max=0.02,
        copy_s=0.05,
        checkpoints=("a-1",),
    )
    two = _ok("async", 0.5, step_s_samples=(0.4, 0.5, 0.6), saves_started=3, saves_completed=2,
              blocking_s_mean=0.03, blocking_s_max=0.04, copy_s=0.04, checkpoints=("b-1",))  # fmt: skip
    merged = merge_rounds([one, two])
    assert merged.step_s_median == pytest.approx(0.35)  # the median of all six steps
    assert (merged.saves_started, merged.saves_completed) == (6, 5)
    assert merged.blocking_s_mean == pytest.approx(0.02) and merged.blocking_s_max == 0.04
    assert merged.copy_s == 0.04 and merged.checkpoints == ("a-1", "b-1")
    failed = ModeResult("async", "error", reason="boom")
    assert merge_rounds([one, failed]).status == "error"
    assert "round 2: boom" in merge_rounds([one, failed]).reason
