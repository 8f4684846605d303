"""The child trainer of one crash-campaign point, and where points stop it.

:mod:`ckptsvc.testing.crashtest` (the campaign) plans points with :func:`plan_points` and runs
each as ``python -m ckptsvc.testing.crash_child PLAN``: this module's ``_child_main`` runs the
plan's saves (sync API or ``AsyncCheckpointer``), each followed by retention, and reports
on stdout; the hooks of :mod:`ckptsvc.testing.faultinject` pause it at the point's exact step.
This module is trainer-side (it imports torch); the node writer's preload is the torch-free
:mod:`ckptsvc.testing.writer_preload`. The saved state is a pure function of its seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.errors import WriterDiedError
from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME
from ckptsvc.liveness import pid_alive
from ckptsvc.ops.retention import maybe_delete_oldest_checkpoint
from ckptsvc.sharded_checkpoint import next_checkpoint_path, save_checkpoint
from ckptsvc.testing.faultinject import install_hooks

__all__ = [
    "SAVE_NBYTES",
    "WRITE_DELAY_S",
    "CrashPoint",
    "Outcome",
    "async_state",
    "crash_state",
    "plan_points",
    "run_child",
]

KEEP = 2  # retention in the child: max_checkpoints
MAX_SHARD_BYTES = 4 << 20
BIG_NUMEL = 3 << 19  # 6 MiB of float32: one shard > the 5 MiB S3 part: a real multipart upload
SAVE_NBYTES = BIG_NUMEL * 4 + 8 * 128 * 256 * 4 + 8
_TIMER_DELAY_S = (0.0, 0.9)
WRITE_DELAY_S = 0.004  # per 64 KiB chunk when a timer point throttles writes: ~0.5 s a save


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
INDEX_NAME = "model.safetensors.index.json"
#: the async save's document published as a file: the seed component's (no tensors; the
#: model's document is in the header of its first shard)
SEED_DOC_NAME = "seed_state.json"

# (api, victim, phase, event, name, hook_in); "local"/"remote" restrict a template.
_TEMPLATES: tuple[tuple[str, str, str, str, str | None, str | None], ...] = (
    ("sync", "trainer", "snapshot", "after_publish", MARKER_NAME, "trainer"),
    ("sync", "trainer", "streaming", "mid_write", None, "trainer"),
    ("sync", "trainer", "streaming", "after_shard", _SHARD1, "trainer"),
    ("sync", "trainer", "streaming", "timer", None, None),
    ("sync", "trainer", "commit", "after_publish", INDEX_NAME, "trainer"),
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
    ("async", "trainer", "snapshot", "after_publish", MARKER_NAME, "trainer"),  # the claim
    ("async", "writer", "streaming", "mid_write", None, "writer"),
    ("async", "writer", "streaming", "after_shard", _SHARD2, "writer"),
    ("async", "writer", "streaming", "timer", None, None),
    ("async", "writer", "commit", "after_publish", SEED_DOC_NAME, "writer"),
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
    hooks = install_hooks(plan, "trainer")
    root, opts = plan["root"], plan["storage_options"]
    ckpt = None
    if plan["api"] == "async":
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
class Outcome:
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


def _kill(pid: int, outcome: Outcome, who: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        outcome.killed.append(f"{who} {pid}")


def _wait_gone(pids: set[int], *, timeout_s: float) -> list[int]:
    """Wait for processes (not our children) to exit; SIGKILL the ones that do not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    stuck = [p for p in pids if pid_alive(p)]
    for pid in stuck:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return stuck


def run_child(
    plan: dict[str, Any], point: CrashPoint | None, env: dict[str, str], *, timeout_s: float
) -> Outcome:
    """Start the child, kill the victim at the point, let it finish, collect what it said."""
    outcome = Outcome()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptsvc.testing.crash_child", json.dumps(plan)],
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


def _act(point: CrashPoint, child_pid: int, paused: str, ctl: str, outcome: Outcome) -> None:
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


if __name__ == "__main__":  # the child trainer of one point
    logging.basicConfig(level=logging.WARNING)
    sys.exit(_child_main(json.loads(sys.argv[1])))
