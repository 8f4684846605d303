"""The crash-consistency campaign: kill -9 the trainer or the node writer at seeded random
points of real saves, then prove that nothing committed was lost.

One *point* = one child trainer process (``python -m ckptsvc.crashtest PLAN``) that runs a
few saves on the campaign's root (the synchronous API or ``AsyncCheckpointer``), each
followed by retention (``maybe_delete_oldest_checkpoint``, keep 2), and is interrupted in
one of them. Where the interruption lands:

- a *hook* (the precise points, :func:`ckptsvc.faultinject.install_hooks`): a wrapper
  around the storage layer (``Location.publish/remove/open_sink``, ``os.replace``,
  ``os.unlink``), the snapshot copy or the job submission stops the process at one exact
  step of the armed save - marker written, byte N of the shard stream, shard closed,
  index/skeleton published, before or after the manifest, marker removed, each step of a
  retention delete - and waits to be killed; the node writer gets the same hooks because
  importing this module (its ``CKPTSVC_WRITER_PRELOAD``) installs what the environment
  asks for;
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

import contextlib
import json
import logging
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .faultinject import PLAN_ENV, PRELOAD_MODULE, install_from_env, install_hooks
from .manifest import MANIFEST_NAME, MARKER_NAME

__all__ = [
    "CampaignReport",
    "CrashPoint",
    "PointResult",
    "plan_points",
    "run_campaign",
    "run_points",
]

logger = logging.getLogger(__name__)

KEEP = 2  # retention in the child: max_checkpoints
MAX_SHARD_BYTES = 4 << 20
BIG_NUMEL = 3 << 19  # 6 MiB of float32: one shard > the 5 MiB S3 part: a real multipart upload
SAVE_NBYTES = BIG_NUMEL * 4 + 8 * 128 * 256 * 4 + 8
_TIMER_DELAY_S = (0.0, 0.9)
_WRITE_DELAY_S = 0.004  # per 64 KiB chunk when a timer point throttles writes: ~0.5 s a save


# ---- points --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrashPoint:
    """Where one point stops a save. ``hook_in`` is the process whose hook pauses
    (``None`` for timer points); ``victim`` what is killed: trainer, writer or node (both)."""

    index: int
    api: str  # "sync" | "async"
    victim: str
    phase: str  # "snapshot" | "streaming" | "commit" | "retention"
    event: str
    name: str | None = None
    nbytes: int = 0  # mid_write: cumulative byte of the save; unlink: n-th unlink
    delay_s: float = 0.0  # timer points
    hook_in: str | None = None
    saves_before: int = 1
    overwrite: bool = False

    def describe(self) -> str:
        what = self.event + (f" {self.name}" if self.name else "")
        if self.event == "mid_write" or (self.event == "unlink" and not self.name):
            what += f" #{self.nbytes}"
        if self.event == "timer":
            what += f" {self.delay_s:.2f}s"
        extra = " (overwrite)" if self.overwrite else ""
        return f"#{self.index} {self.api}/{self.victim} {self.phase}: {what}{extra}"


_SHARD1, _SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
_INDEX, _SKELETON = "model.safetensors.index.json", "ckptsvc_state.json"

# (api, victim, phase, event, name, hook_in); "local"/"remote" restrict a template.
_TEMPLATES: tuple[tuple[str, str, str, str, str | None, str | None], ...] = (
    ("sync", "trainer", "snapshot", "after_publish", MARKER_NAME, "trainer"),
    ("sync", "trainer", "streaming", "mid_write", None, "trainer"),
    ("sync", "trainer", "streaming", "after_shard", _SHARD1, "trainer"),
    ("sync", "trainer", "streaming", "timer", None, None),
    ("sync", "trainer", "commit", "after_publish", _INDEX, "trainer"),
    ("sync", "trainer", "commit", "before_publish", MANIFEST_NAME, "trainer"),
    ("sync", "trainer", "commit", "before_rename", MANIFEST_NAME, "trainer"),
    ("sync", "trainer", "commit", "after_publish", MANIFEST_NAME, "trainer"),
    ("sync", "trainer", "commit", "after_remove", MARKER_NAME, "trainer"),
    ("sync", "trainer", "retention", "after_publish", MARKER_NAME, "trainer"),
    ("sync", "trainer", "retention", "after_remove", MANIFEST_NAME, "trainer"),
    ("sync", "trainer", "retention", "unlink", None, "trainer"),
    ("sync", "trainer", "retention", "unlink", MARKER_NAME, "trainer"),
    ("sync", "trainer", "retention", "before_remove_tree", None, "trainer"),
    ("async", "trainer", "snapshot", "before_copy", None, "trainer"),
    ("async", "trainer", "snapshot", "after_copy", None, "trainer"),
    ("async", "trainer", "snapshot", "after_submit", None, "trainer"),
    ("async", "trainer", "streaming", "mid_write", None, "writer"),
    ("async", "trainer", "streaming", "timer", None, None),
    ("async", "trainer", "commit", "before_publish", MANIFEST_NAME, "writer"),
    ("async", "trainer", "retention", "after_publish", MARKER_NAME, "trainer"),
    ("async", "trainer", "retention", "unlink", None, "trainer"),
    ("async", "writer", "snapshot", "after_publish", MARKER_NAME, "writer"),
    ("async", "writer", "streaming", "mid_write", None, "writer"),
    ("async", "writer", "streaming", "after_shard", _SHARD2, "writer"),
    ("async", "writer", "streaming", "timer", None, None),
    ("async", "writer", "commit", "after_publish", _SKELETON, "writer"),
    ("async", "writer", "commit", "before_publish", MANIFEST_NAME, "writer"),
    ("async", "writer", "commit", "before_rename", MANIFEST_NAME, "writer"),
    ("async", "writer", "commit", "after_publish", MANIFEST_NAME, "writer"),
    ("async", "writer", "commit", "after_remove", MARKER_NAME, "writer"),
    ("async", "node", "snapshot", "after_copy", None, "trainer"),
    ("async", "node", "streaming", "mid_write", None, "writer"),
)
_LOCAL_ONLY = {"before_rename", "unlink"}  # os.replace / os.unlink: local disk only
_REMOTE_ONLY = {"before_remove_tree"}


def _templates(local: bool) -> list[tuple[str, str, str, str, str | None, str | None]]:
    drop = _REMOTE_ONLY if local else _LOCAL_ONLY
    return [t for t in _TEMPLATES if t[3] not in drop]


def plan_points(count: int, *, seed: int, local: bool) -> list[CrashPoint]:
    """``count`` seeded points; templates are dealt round-robin in a seeded order, so a
    small sample covers as many different steps as it can."""
    rng = random.Random(seed)
    templates = _templates(local)
    order: list[int] = []
    points = []
    for index in range(count):
        if not order:
            order = list(range(len(templates)))
            rng.shuffle(order)
        api, victim, phase, event, name, hook_in = templates[order.pop()]
        points.append(
            CrashPoint(
                index=index,
                api=api,
                victim=victim,
                phase=phase,
                event=event,
                name=name,
                nbytes=rng.randrange(1, SAVE_NBYTES)
                if event == "mid_write"
                else rng.randint(1, 3)
                if event == "unlink" and name is None
                else 0,
                delay_s=rng.uniform(*_TIMER_DELAY_S) if event == "timer" else 0.0,
                hook_in=hook_in,
                saves_before=rng.choice((0, 1, 1, 2)),
                overwrite=phase != "retention" and rng.random() < 0.12,
            )
        )
    return points


# ---- the state every save writes (a pure function of its seed) ------------------------------


def crash_state(seed: int) -> dict[str, Any]:
    """7 MiB of float32 (one 6 MiB tensor + eight 128 KiB ones) and a counter, from ``seed``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {"big": torch.randn(BIG_NUMEL, generator=gen)}
    for i in range(8):
        state[f"layers.{i}.weight"] = torch.randn(128, 256, generator=gen)
    state["counter"] = torch.tensor(seed, dtype=torch.int64)
    return state


def async_state(seed: int) -> dict[str, Any]:
    return {"model": crash_state(seed), "seed": seed, "note": ("crashtest", 1.5)}


# ---- the child trainer -----------------------------------------------------------------------


def _say(*words: object) -> None:
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def _child_main(plan: dict[str, Any]) -> int:
    """Run the plan's saves, each followed by retention; report on stdout."""
    from .errors import WriterDiedError
    from .retention import maybe_delete_oldest_checkpoint
    from .sharded_checkpoint import next_checkpoint_path, save_checkpoint

    hooks = install_hooks(plan, "trainer")
    root, opts = plan["root"], plan["storage_options"]
    ckpt = None
    if plan["api"] == "async":
        from .async_checkpointer import AsyncCheckpointer

        ckpt = AsyncCheckpointer(root, storage_options=opts, max_shard_size=MAX_SHARD_BYTES)
        _say("WRITER", ckpt.writer_pid)
    for step, seed in plan["saves"]:
        hooks.step = step
        _say("START", step, seed)
        meta = {"crashtest_seed": seed}
        if ckpt is None:
            save_checkpoint(
                next_checkpoint_path(root, step), crash_state(seed), metadata=meta,
                safetensors=True, max_shard_size=MAX_SHARD_BYTES, storage_options=opts,
                step=step,
            )  # fmt: skip
        else:
            handle = ckpt.save(step, async_state(seed), metadata=meta)
            _say("WRITER", ckpt.writer_pid)
            try:
                handle.wait(600)
            except WriterDiedError as e:  # a writer victim: the next save starts a new one
                _say("WRITER_DIED", step, str(e).replace("\n", " "))
                continue
        _say("COMMITTED", step, seed)
        hooks.phase = "retention"
        maybe_delete_oldest_checkpoint(root, KEEP, storage_options=opts)
        hooks.phase = "save"
    if ckpt is not None:
        ckpt.close()
    _say("DONE")
    return 0


# ---- running one child -----------------------------------------------------------------------


@dataclass
class _Outcome:
    """What the campaign saw of one child run."""

    killed: list[str] = field(default_factory=list)  # "trainer 123", "writer 456"
    paused_at: str = ""
    committed: list[tuple[int, int]] = field(default_factory=list)  # (step, seed)
    writer_died: bool = False
    writer_pids: set[int] = field(default_factory=set)
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)


def _reader(stream: Any, out: queue.Queue[str | None]) -> None:
    for line in stream:
        out.put(line.rstrip("\n"))
    out.put(None)


def _drain(lines: queue.Queue[str | None], *, timeout_s: float) -> list[str]:
    out: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            item = lines.get(timeout=0.05)
        except queue.Empty:
            continue
        if item is None:
            break
        out.append(item)
    return out


def _kill(pid: int, outcome: _Outcome, who: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        outcome.killed.append(f"{who} {pid}")


def _wait_gone(pids: set[int], *, timeout_s: float) -> list[int]:
    """Wait for processes (not our children) to exit; SIGKILL the ones that do not."""
    from .staging import pid_alive

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    stuck = [p for p in pids if pid_alive(p)]
    for pid in stuck:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return stuck


def _run_child(
    plan: dict[str, Any], point: CrashPoint | None, env: dict[str, str], *, timeout_s: float
) -> _Outcome:
    """Start the child, kill the victim at the point, let it finish, collect what it said."""
    outcome = _Outcome()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptsvc.crashtest", json.dumps(plan)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    errors: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    threading.Thread(target=_reader, args=(proc.stderr, errors), daemon=True).start()
    paused = os.path.join(plan["ctl"], "paused.json")
    killed_step = plan["step"]
    fire_at: float | None = None
    acted = point is None
    deadline = time.monotonic() + timeout_s
    eof = False
    while not eof:
        if (
            not acted
            and point is not None
            and (os.path.exists(paused) or (fire_at is not None and time.monotonic() >= fire_at))
        ):
            acted = True
            _act(point, proc.pid, paused, plan["ctl"], outcome)
        if time.monotonic() > deadline:
            outcome.problems.append(f"the child did not finish within {timeout_s:.0f} s")
            _kill(proc.pid, outcome, "trainer (timeout)")
            break
        try:
            line = lines.get(timeout=0.01)
        except queue.Empty:
            continue
        if line is None:
            eof = True
            continue
        word, *rest = [*line.split(" ", 2), ""]
        if word == "WRITER" and rest[0].isdigit():
            outcome.writer_pids.add(int(rest[0]))
        elif word == "START" and point is not None and point.event == "timer":
            if int(rest[0]) == killed_step and fire_at is None:
                fire_at = time.monotonic() + point.delay_s
        elif word == "COMMITTED":
            outcome.committed.append((int(rest[0]), int(rest[1])))
        elif word == "WRITER_DIED":
            outcome.writer_died = True
    try:
        outcome.exit_code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _kill(proc.pid, outcome, "trainer (hung)")
        outcome.exit_code = proc.wait()
        outcome.problems.append("the child did not exit after its output ended")
    if os.path.exists(paused):
        with open(paused) as f:
            info = json.load(f)
        outcome.paused_at = str(info["why"])
        outcome.writer_pids.add(int(info["pid"]))
    outcome.writer_pids.discard(proc.pid)
    stuck = _wait_gone(outcome.writer_pids, timeout_s=30.0)
    if stuck:
        outcome.problems.append(f"node writer(s) {stuck} did not exit after the point")
    stderr = _drain(errors, timeout_s=10.0)
    if not acted and point is not None and point.event != "timer":
        outcome.problems.append(f"the kill point was never reached ({point.describe()})")
    trainer_killed = any(k.startswith("trainer") for k in outcome.killed)
    if outcome.exit_code != 0 and not trainer_killed:
        outcome.problems.append(
            f"the child failed (exit {outcome.exit_code}): " + " | ".join(stderr[-12:])
        )
    return outcome


def _act(point: CrashPoint, child_pid: int, paused: str, ctl: str, outcome: _Outcome) -> None:
    """Kill the point's victim(s); release a paused process that is not a victim."""
    hook_pid: int | None = None
    if os.path.exists(paused):
        with open(paused) as f:
            hook_pid = int(json.load(f)["pid"])
    writers = sorted(outcome.writer_pids - {child_pid})
    if point.victim in ("trainer", "node"):
        _kill(child_pid, outcome, "trainer")
    if point.victim in ("writer", "node"):
        target = hook_pid if point.hook_in == "writer" and hook_pid else None
        for pid in [target] if target else writers[-1:]:
            _kill(pid, outcome, "writer")
    if hook_pid is not None and point.hook_in != point.victim and point.victim != "node":
        time.sleep(0.2)  # ordering only: let the writer see the trainer's EOF first
        with open(os.path.join(ctl, "release"), "w"):
            pass


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
        from .storage import Location

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
        from .discovery import CheckpointStatus, list_checkpoints

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
            "write_delay_s": _WRITE_DELAY_S,
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
        outcome = _run_child(plan, point, self.env(plan, node), timeout_s=self.timeout_s)
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
        outcome: _Outcome,
        problems: list[str],
    ) -> tuple[list[str], str | None]:
        from .discovery import CheckpointStatus, find_latest_checkpoint, list_checkpoints

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
        from .flatten import load_state
        from .sharded_checkpoint import load_checkpoint
        from .verify import verify_checkpoint

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
            if _SKELETON in files:
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
        from .discovery import CheckpointStatus, find_latest_checkpoint, list_checkpoints
        from .gc import collect_garbage, unfinished_uploads
        from .staging import segment_prefix

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
    from .storage import Location

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
    from .storage import Location

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


if __name__ == "__main__":  # the child trainer of one point
    logging.basicConfig(level=logging.WARNING)
    sys.exit(_child_main(json.loads(sys.argv[1])))
else:  # imported: as the node writer's preload, install what its environment asks for
    install_from_env()
