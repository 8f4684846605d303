"""The crash-consistency campaign: kill -9 the trainer or the node writer at seeded random
points of real saves, then prove that nothing committed was lost.

One *point* = one child trainer process (``python -m ckptsvc.testing.crash_child PLAN``, see :mod:`ckptsvc.testing.crash_child`) that runs a
few saves on the campaign's root (the synchronous API or ``AsyncCheckpointer``), each
followed by retention (``maybe_delete_oldest_checkpoint``, keep 2), and is interrupted in
one of them. Where the interruption lands:

- a *hook* (the precise points, :func:`ckptsvc.testing.faultinject.install_hooks`): a wrapper
  around the storage layer (``Location.publish/remove/open_sink``, ``os.replace``,
  ``os.unlink``), the snapshot copy or the job submission stops the process at one exact
  step of the armed save - marker written, byte N of the shard stream, shard closed,
  index/skeleton published, before or after the manifest, marker removed, each step of a
  retention delete - and waits to be killed; the node writer gets the same hooks because
  its ``CKPTSVC_WRITER_PRELOAD`` (:mod:`ckptsvc.testing.writer_preload`) installs what the
  environment asks for;
- a *timer* (the random points): writes are throttled and the victim is killed a seeded
  random delay after its save started.

The victim is the trainer, the node writer, or both (a node dying). After each point the
campaign (this process) checks, before and after ``gc``:

1. ``find_latest_checkpoint`` returns the newest checkpoint that was committed (or the
   interrupted one, only if its manifest got out), and it passes
   ``verify_checkpoint(deep=True)`` and loads bit for bit as saved;
2. every checkpoint committed before the point is byte-identical (manifest and CRC-32C of
   every file), unless retention or an interrupted overwrite was entitled to remove it;
3. no directory of ours shows up as a manifest-less "legacy" checkpoint;
4. ``gc`` leaves no incomplete directory, temp file, unfinished S3 upload or shared-memory
   segment of the point's processes; the next point's saves prove that saving works again.

Run it with ``ckptsvc crashtest`` or :func:`run_campaign` / :func:`run_points`. Call order
of one point (``_Campaign.run_point``, in the campaign process): ``plan`` -> ``_run_child``
(the child runs ``_child_main``; ``_act`` kills) -> ``_check`` -> ``collect_garbage`` ->
``_gc_and_check``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.ops.gc import collect_garbage, unfinished_uploads
from ckptsvc.read.component_load import load_state
from ckptsvc.read.discovery import CheckpointStatus, list_checkpoints
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.sharded_checkpoint import load_checkpoint
from ckptsvc.storage import Location
from ckptsvc.testing.crash_child import INDEX_NAME as _INDEX
from ckptsvc.testing.crash_child import (
    KEEP,
    WRITE_DELAY_S,
    CrashPoint,
    Outcome,
    crash_state,
    plan_points,
    run_child,
)
from ckptsvc.testing.crash_child import SEED_DOC_NAME as _SEED_DOC
from ckptsvc.testing.faultinject import PLAN_ENV, PRELOAD_MODULE
from ckptsvc.workers.shm import segment_prefix

__all__ = [
    "CampaignReport",
    "CrashPoint",
    "PointResult",
    "plan_points",
    "run_campaign",
    "run_points",
]

logger = logging.getLogger(__name__)


# ---- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointResult:
    """One point's outcome. ``lost`` lists committed checkpoints lost or damaged (must be
    empty); ``problems`` anything else that broke a promise (or the harness)."""

    point: CrashPoint | None  # None: the final run that must save cleanly
    killed: tuple[str, ...]
    paused_at: str
    committed_seeds: tuple[int, ...]
    latest: str | None
    lost: tuple[str, ...]
    problems: tuple[str, ...]
    reclaimed: dict[str, int]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.lost and not self.problems

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ok"] = self.ok
        doc["point"] = None if self.point is None else self.point.describe()
        return doc


@dataclass(frozen=True)
class CampaignReport:
    """The whole campaign on one storage root."""

    root: str
    seed: int
    results: tuple[PointResult, ...]

    @property
    def points(self) -> list[PointResult]:
        return [r for r in self.results if r.point is not None]

    @property
    def checkpoints_lost(self) -> int:
        return sum(len(r.lost) for r in self.results)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def tally(self, attribute: str) -> dict[str, int]:
        """Points by a :class:`CrashPoint` field (``api``, ``victim``, ``phase``, ``event``)."""
        out: dict[str, int] = {}
        for r in self.points:
            key = str(getattr(r.point, attribute))
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))

    def reclaimed(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for r in self.results:
            for k, v in r.reclaimed.items():
                total[k] = total.get(k, 0) + v
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "seed": self.seed,
            "ok": self.ok,
            "points": len(self.points),
            "killed": sum(1 for r in self.points if r.killed),
            "checkpoints_lost": self.checkpoints_lost,
            "by_api": self.tally("api"),
            "by_victim": self.tally("victim"),
            "by_phase": self.tally("phase"),
            "reclaimed": self.reclaimed(),
            "failures": [r.to_dict() for r in self.results if not r.ok],
        }

    def summary(self) -> str:
        d = self.to_dict()
        lines = [
            f"crashtest {self.root}: {'OK' if self.ok else 'FAILED'}: {d['points']} points "
            f"(seed {self.seed}), {d['killed']} kills, checkpoints lost: {d['checkpoints_lost']}",
            f"  by api {d['by_api']}, by victim {d['by_victim']}, by phase {d['by_phase']}",
            f"  gc reclaimed {d['reclaimed']}",
        ]
        for r in self.results:
            if not r.ok:
                what = r.point.describe() if r.point else "final run"
                for text in (*r.lost, *r.problems):
                    lines.append(f"  FAIL {what}: {text}")
        return "\n".join(lines)


# ---- the campaign --------------------------------------------------------------------------


def _tensors_equal(got: Any, want: Any) -> bool:
    import torch

    if isinstance(want, torch.Tensor):
        return (
            isinstance(got, torch.Tensor)
            and got.dtype == want.dtype
            and got.shape == want.shape
            and torch.equal(got, want)
        )
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and sorted(got) == sorted(want)
            and all(_tensors_equal(got[k], want[k]) for k in want)
        )
    return bool(got == want)


class _Campaign:
    """The campaign's state across points: the root, the commit log, counters."""

    def __init__(
        self, root: str, storage_options: dict[str, Any], *, seed: int, timeout_s: float
    ) -> None:
        self.url = root
        self.opts = storage_options
        self.loc = Location.parse(root, storage_options)
        self.seed = seed
        self.timeout_s = timeout_s
        self.log: list[tuple[int, str]] = []  # (seed, checkpoint dir) in commit order
        self.next_step = 1
        self.next_seed = 1000 + 1000 * seed
        self.tag = f"ct{uuid.uuid4().hex[:8]}"
        self.ctl_root = tempfile.mkdtemp(prefix="ckptsvc-crashtest-")

    # -- state of the root --
    def _complete(self) -> dict[str, Any]:
        self.loc.fs.invalidate_cache()
        infos = list_checkpoints(self.loc)
        return {i.location.name: i for i in infos if i.status is CheckpointStatus.COMPLETE}

    def _manifests(self) -> dict[str, tuple[bytes, tuple[float, int]]]:
        """Each complete checkpoint's manifest bytes and commit order key."""
        return {
            n: (i.location.join(MANIFEST_NAME).read_bytes(), i.sort_key())
            for n, i in self._complete().items()
        }

    def _seed_of(self, info: Any) -> int | None:
        try:
            doc = json.loads(info.location.join(_INDEX).read_bytes())
            return int(doc["metadata"]["crashtest_seed"])
        except Exception:  # a damaged index: reported by verify
            return None

    # -- one point --
    def plan(self, point: CrashPoint | None, ctl: str) -> dict[str, Any]:
        complete = self._complete()
        saves_before = 0 if point is None else point.saves_before
        if point is not None and point.phase == "retention":
            saves_before = max(saves_before, KEEP - len(complete))
        saves = []
        for _ in range(saves_before):
            saves.append((self.next_step, self.next_seed))
            self.next_step, self.next_seed = self.next_step + 1, self.next_seed + 1
        newest = [n for s, n in reversed(self.log) if n in complete]
        if point is not None and point.overwrite and newest:
            killed_step = int(newest[0].split("-", 1)[1])
        else:
            killed_step, self.next_step = self.next_step, self.next_step + 1
        saves.append((killed_step, self.next_seed))
        self.next_seed += 1
        if point is not None and point.victim == "writer":  # the same run goes on saving
            saves.append((self.next_step, self.next_seed))
            self.next_step, self.next_seed = self.next_step + 1, self.next_seed + 1
        api = "sync" if point is None else point.api
        return {
            "root": self.url,
            "storage_options": self.opts,
            "api": api,
            "saves": saves,
            "step": killed_step,
            "killed_seed": saves[-2 if point is not None and point.victim == "writer" else -1][1],
            "phase": "none" if point is None else point.phase,
            "event": "none" if point is None else point.event,
            "name": None if point is None else point.name,
            "nbytes": 0 if point is None else point.nbytes,
            "hook_in": None if point is None else point.hook_in,
            "throttle": None
            if point is None or point.event != "timer"
            else ("trainer" if api == "sync" else "writer"),
            "write_delay_s": WRITE_DELAY_S,
            "ctl": ctl,
        }

    def env(self, plan: dict[str, Any], node: str) -> dict[str, str]:
        env = dict(os.environ)
        preload = [p for p in env.get("CKPTSVC_WRITER_PRELOAD", "").split(",") if p.strip()]
        env.update(
            {
                "CKPTSVC_NODE_ID": node,
                "CKPTSVC_WRITER_LINGER_S": "0.5",
                "CKPTSVC_WRITER_PRELOAD": ",".join([*preload, PRELOAD_MODULE]),
                "CKPTSVC_WRITER_LOG_LEVEL": "ERROR",
                "CKPTSVC_IO_THREADS": "1",  # shards in order: byte offsets are well defined
                "CKPTSVC_WRITE_CHUNK_BYTES": str(64 << 10),
                "CKPTSVC_PART_SIZE_BYTES": str(5 << 20),
                "PYTHONUNBUFFERED": "1",
                PLAN_ENV: json.dumps(plan),
            }
        )
        return env

    def run_point(self, point: CrashPoint | None) -> PointResult:
        started = time.monotonic()
        index = "final" if point is None else str(point.index)
        ctl = os.path.join(self.ctl_root, f"point-{index}")
        os.makedirs(ctl)
        node = f"{self.tag}p{index}"
        before = self._manifests()
        plan = self.plan(point, ctl)
        outcome = run_child(plan, point, self.env(plan, node), timeout_s=self.timeout_s)
        problems = list(outcome.problems)
        if point is None and [s for _, s in outcome.committed] != [s for _, s in plan["saves"]]:
            problems.append(f"the final run did not commit every save: {outcome.committed}")
        lost, latest = self._check(before, plan, outcome, problems)
        reclaimed = self._gc_and_check(node, latest, problems)
        return PointResult(
            point=point,
            killed=tuple(outcome.killed),
            paused_at=outcome.paused_at,
            committed_seeds=tuple(s for _, s in outcome.committed),
            latest=latest,
            lost=tuple(lost),
            problems=tuple(problems),
            reclaimed=reclaimed,
            seconds=round(time.monotonic() - started, 3),
        )

    def _check(
        self,
        before: dict[str, tuple[bytes, tuple[float, int]]],
        plan: dict[str, Any],
        outcome: Outcome,
        problems: list[str],
    ) -> tuple[list[str], str | None]:
        self.loc.fs.invalidate_cache()
        lost: list[str] = []
        infos = list_checkpoints(self.loc)
        for info in infos:
            if info.status is CheckpointStatus.LEGACY:
                problems.append(
                    f"{info.url} shows up as a manifest-less legacy checkpoint (a partial "
                    "save or deletion that discovery may return)"
                )
        complete = {i.location.name: i for i in infos if i.status is CheckpointStatus.COMPLETE}
        seeds: dict[str, int | None] = {}
        for ckpt in complete.values():
            lost += self._verify_and_load(ckpt, seeds)
        # the saves of this run that committed, in order: those the child reported, and
        # the interrupted one if its manifest got out before the kill
        killed_dir = f"checkpoint-{plan['step']}"
        reported = {seed for _, seed in outcome.committed}
        killed_committed = seeds.get(killed_dir) == plan["killed_seed"]
        commits = [
            (seed, f"checkpoint-{step}")
            for step, seed in plan["saves"]
            if seed in reported or (seed == plan["killed_seed"] and killed_committed)
        ]
        self.log += commits
        committed_now = [name for _, name in commits]
        retired = killed_dir if killed_dir in before else None
        order = sorted(before, key=lambda n: before[n][1])
        newest = list(dict.fromkeys(reversed([*order, *committed_now])))[:KEEP]
        for name, (raw, _) in before.items():
            was = complete.get(name)
            intact = was is not None and was.location.join(MANIFEST_NAME).read_bytes() == raw
            if intact or name == retired or name in committed_now:
                continue
            if name in newest:
                status = "gone" if was is None else "re-committed"
                lost.append(f"{name}: committed before the point and protected, now {status}")
        latest = find_latest_checkpoint(self.url, storage_options=self.opts)
        survivors = [(s, n) for s, n in self.log if seeds.get(n) == s]
        expected = survivors[-1][0] if survivors else None
        latest_name = None if latest is None else latest.rstrip("/").rsplit("/", 1)[-1]
        got = seeds.get(latest_name) if latest_name else None
        if got != expected:
            problems.append(
                f"find_latest_checkpoint returned {latest} (seed {got}); expected the newest "
                f"committed checkpoint (seed {expected})"
            )
        self.log = [(s, n) for s, n in self.log if seeds.get(n) == s]
        return lost, latest

    def _verify_and_load(self, info: Any, seeds: dict[str, int | None]) -> list[str]:
        name = info.location.name
        report = verify_checkpoint(info.location, deep=True)
        seed = self._seed_of(info)
        seeds[name] = seed
        if not report.ok:
            return [f"{name}: fails deep verification: {[p.detail for p in report.problems]}"]
        if seed is None:
            return [f"{name}: its index carries no crashtest seed"]
        files = {f.path for f in info.manifest.files}
        try:
            if _SEED_DOC in files:  # an async save: {"model": ..., "seed": ...}
                got = load_state(info.url, storage_options=self.opts)
                same = _tensors_equal(got["model"], crash_state(seed)) and got["seed"] == seed
            else:
                same = _tensors_equal(
                    load_checkpoint(info.url, storage_options=self.opts), crash_state(seed)
                )
        except Exception as e:
            return [f"{name}: verifies but does not load: {type(e).__name__}: {e}"]
        return [] if same else [f"{name}: loads, but not the bytes seed {seed} saved"]

    def _gc_and_check(self, node: str, latest: str | None, problems: list[str]) -> dict[str, int]:
        report = collect_garbage(self.url, storage_options=self.opts, node=node)
        for url, why in report.kept:
            problems.append(f"gc kept {url}: {why}")
        self.loc.fs.invalidate_cache()
        for info in list_checkpoints(self.loc):
            if info.status is not CheckpointStatus.COMPLETE:
                problems.append(f"after gc, {info.url} is still {info.status.value}")
            elif info.location.is_local:
                tmp = [c.name for c in info.location.list_children() if c.name.endswith(".tmp")]
                if tmp:
                    problems.append(f"after gc, {info.url} still holds temp files {tmp}")
        uploads = unfinished_uploads(self.url, storage_options=self.opts)
        if uploads:
            problems.append(f"after gc, unfinished uploads remain: {uploads}")
        prefix = segment_prefix(node)
        shm = (
            [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
            if os.path.isdir("/dev/shm")
            else []
        )
        if shm:
            problems.append(f"after gc, shared-memory segments remain: {shm}")
        if find_latest_checkpoint(self.url, storage_options=self.opts) != latest:
            problems.append("gc changed what find_latest_checkpoint returns")
        dirs = sum(
            1 for u in report.removed if u.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint-")
        )
        return {
            "directories": dirs,
            "files": len(report.removed) - dirs,
            "uploads": len(report.aborted_uploads),
            "segments": len(report.reclaimed_segments),
        }

    def close(self) -> None:
        shutil.rmtree(self.ctl_root, ignore_errors=True)


def run_campaign(
    root: str,
    *,
    points: int = 120,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    timeout_s: float = 300.0,
    on_result: Callable[[PointResult], None] | None = None,
) -> CampaignReport:
    """Run ``points`` seeded crash points (:func:`plan_points`) under a fresh
    ``<root>/crashtest-<id>``, then one clean run that must save; see :func:`run_points`."""
    local = Location.parse(root, storage_options).is_local
    return run_points(
        root,
        plan_points(points, seed=seed, local=local),
        seed=seed,
        storage_options=storage_options,
        timeout_s=timeout_s,
        on_result=on_result,
    )


def run_points(
    root: str,
    points: list[CrashPoint],
    *,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    timeout_s: float = 300.0,
    on_result: Callable[[PointResult], None] | None = None,
) -> CampaignReport:
    """Run ``points`` in order on one fresh root ``<root>/crashtest-<id>`` (removed at the
    end if every point passed), then a final run that must save cleanly.

    ``on_result(result)`` is called after each point (progress; a test may also tamper
    with the root there). ``report.ok`` is the verdict, ``report.checkpoints_lost`` the
    figure that must be zero.
    """
    base = Location.parse(root, storage_options)
    run_root = base.join(f"crashtest-{uuid.uuid4().hex[:10]}")
    url = run_root.path if run_root.is_local else run_root.url
    campaign = _Campaign(url, dict(storage_options or {}), seed=seed, timeout_s=timeout_s)
    results: list[PointResult] = []
    try:
        for point in [*points, None]:
            result = campaign.run_point(point)
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        campaign.close()
    report = CampaignReport(root=url, seed=seed, results=tuple(results))
    if report.ok:
        run_root.remove(recursive=True, missing_ok=True)
    return report
