"""The crash-consistency campaign (:mod:`ckptsvc.testing.crashtest`): kill -9 the trainer, the node
writer or both at seeded points of real saves - snapshot, streaming, commit, retention - on
local disk and on the S3 emulator, and check after each point that the latest checkpoint
is complete, verifies and loads bit for bit, that no committed checkpoint was damaged, that
``gc`` reclaims the debris, and that the next run saves again.

In CI a seeded sample runs (14 points on local disk, 8 on S3, about a minute and a half).
The full campaign, 120 points per storage, runs with::

    CKPTSVC_FULL_CRASHTEST=1 pytest tests/test_crash_campaign.py -k full
    ckptsvc crashtest --points 120 --storage /tmp/ct --storage s3://bucket/ct   # same, by hand
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import StorageRoot

from ckptsvc.format.manifest import MARKER_NAME
from ckptsvc.storage import Location
from ckptsvc.testing.crash_child import _templates
from ckptsvc.testing.crashtest import (
    CampaignReport,
    CrashPoint,
    PointResult,
    plan_points,
    run_campaign,
    run_points,
)

pytestmark = pytest.mark.multiproc

FULL = os.environ.get("CKPTSVC_FULL_CRASHTEST", "").strip().lower() in ("1", "true", "yes")
FULL_POINTS = 120
SEED = 20240611


def _show(report: CampaignReport) -> str:
    return report.summary()


def assert_campaign_passed(report: CampaignReport, points: int) -> None:
    assert len(report.points) == points
    assert report.checkpoints_lost == 0, _show(report)
    assert report.ok, _show(report)
    killed = sum(1 for r in report.points if r.killed)
    assert killed >= points * 0.8, f"too few points actually killed something: {_show(report)}"
    final = report.results[-1]
    assert final.point is None and final.ok and final.committed_seeds, "the final run saves"


# ---- planning --------------------------------------------------------------------------------


def test_points_are_seeded_and_cover_every_template() -> None:
    local = _templates(local=True)
    points = plan_points(len(local), seed=1, local=True)
    assert plan_points(len(local), seed=1, local=True) == points
    assert plan_points(len(local), seed=2, local=True) != points
    seen = {(p.api, p.victim, p.phase, p.event, p.name) for p in points}
    assert seen == {t[:5] for t in local}
    assert {p.phase for p in points} == {"snapshot", "streaming", "commit", "retention"}
    assert {p.victim for p in points} == {"trainer", "writer", "node"}
    remote = plan_points(60, seed=1, local=False)
    assert not {"before_rename", "unlink"} & {p.event for p in remote}


# ---- the CI sample ---------------------------------------------------------------------------


@pytest.mark.slow
def test_campaign_sample_local(tmp_path: Path) -> None:
    report = run_campaign(str(tmp_path), points=14, seed=SEED)
    assert_campaign_passed(report, 14)
    assert report.reclaimed()["directories"] > 0
    assert not any(tmp_path.iterdir()), "a passing campaign removes its root"


@pytest.mark.cloud
@pytest.mark.slow
def test_campaign_sample_s3(s3_root: StorageRoot) -> None:
    report = run_campaign(
        s3_root.url, points=8, seed=SEED + 1, storage_options=s3_root.storage_options
    )
    assert_campaign_passed(report, 8)


@pytest.mark.slow
def test_writer_killed_mid_multipart_upload_is_reclaimed_on_s3(s3_root: StorageRoot) -> None:
    """The node writer dies after 5.5 MiB of a 6 MiB shard: one part uploaded, the upload
    left unfinished; gc must abort it, and the same trainer saves again."""
    point = CrashPoint(
        0,
        "async",
        "writer",
        "streaming",
        "mid_write",
        nbytes=5_800_000,
        hook_in="writer",
        saves_before=0,
    )
    report = run_points(s3_root.url, [point], storage_options=s3_root.storage_options)
    assert report.ok, _show(report)
    result = report.results[0]
    assert result.killed and result.killed[0].startswith("writer")
    assert result.reclaimed["uploads"] == 1 and result.reclaimed["directories"] == 1
    assert len(result.committed_seeds) == 1, "the trainer went on and committed a new save"


@pytest.mark.slow
def test_node_death_leaves_shared_memory_for_gc(tmp_path: Path) -> None:
    point = CrashPoint(0, "async", "node", "snapshot", "after_copy", hook_in="trainer")
    report = run_points(str(tmp_path), [point])
    assert report.ok, _show(report)
    assert report.results[0].reclaimed["segments"] >= 1


# ---- the campaign can fail -------------------------------------------------------------------


@pytest.mark.slow
def test_the_campaign_catches_a_damaged_commit(tmp_path: Path) -> None:
    """Damage the newest checkpoint between two points: the next point must report it."""
    damaged: list[str] = []

    def tamper(result: PointResult) -> None:
        if result.point is not None and result.point.index == 0 and result.latest:
            shard = Location.parse(result.latest).join("model-00002-of-00002.safetensors")
            data = bytearray(shard.read_bytes())
            data[-1] ^= 0xFF
            shard.publish(bytes(data))
            damaged.append(result.latest)

    points = [
        CrashPoint(0, "sync", "trainer", "commit", "after_remove", MARKER_NAME, hook_in="trainer"),
        CrashPoint(1, "sync", "trainer", "streaming", "mid_write", nbytes=100, hook_in="trainer"),
    ]
    report = run_points(str(tmp_path), points, on_result=tamper)
    assert damaged, "the first point committed nothing to damage"
    assert not report.ok and report.checkpoints_lost >= 1
    assert any("fails deep verification" in text for text in report.results[1].lost)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm")
@pytest.mark.slow
def test_retention_killed_right_after_its_marker_went(tmp_path: Path) -> None:
    """On tmpfs readdir lists the newest file first: a tree removal took the (re-written)
    marker first, and a crash then left index and shards without marker or manifest - a
    "legacy" checkpoint that find_latest_checkpoint returned. The marker must go last."""
    root = Path("/dev/shm") / f"ckptsvc-crashtest-{os.getpid()}-{tmp_path.name}"
    point = CrashPoint(
        0, "sync", "trainer", "retention", "unlink", MARKER_NAME, hook_in="trainer", saves_before=2
    )
    try:
        report = run_points(str(root), [point])
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    assert report.ok, _show(report)


# ---- the full campaign -----------------------------------------------------------------------

full = pytest.mark.skipif(not FULL, reason="set CKPTSVC_FULL_CRASHTEST=1 for the full campaign")


@full
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_full_campaign_local(tmp_path: Path) -> None:
    report = run_campaign(str(tmp_path), points=FULL_POINTS, seed=SEED)
    print(report.summary())
    assert_campaign_passed(report, FULL_POINTS)


@full
@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.cloud
def test_full_campaign_s3(s3_root: StorageRoot) -> None:
    report = run_campaign(
        s3_root.url, points=FULL_POINTS, seed=SEED, storage_options=s3_root.storage_options
    )
    print(report.summary())
    assert_campaign_passed(report, FULL_POINTS)
