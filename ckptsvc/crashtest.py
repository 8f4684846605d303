"""The crash-consistency campaign: kill -9 the trainer or the node writer at seeded random
points of real saves, then prove that nothing committed was lost.

One *point* = one child trainer process (``python -m ckptsvc.crashtest PLAN``) that runs a
few saves on the campaign's root (the synchronous API or ``AsyncCheckpointer``), each
followed by retention (``maybe_delete_oldest_checkpoint``, keep 2), and is interrupted in
one of them. Where the interruption lands:

- a *hook* (the precise points): a wrapper around the storage layer
  (``Location.publish/remove/open_sink``, ``os.replace``, ``os.unlink``), the snapshot copy
  or the job submission stops the process at one exact step of the armed save - marker
  written, byte N of the shard stream, shard closed, index/skeleton published, before or
  after the manifest, marker removed, each step of a retention delete - writes
  ``paused.json`` and waits; the node writer gets the same hooks through
  ``CKPTSVC_WRITER_PRELOAD=ckptsvc.crashtest``;
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

Run it with ``ckptsvc crashtest`` or :func:`run_campaign`. Call order of one point:
``_plan_point`` (campaign) -> ``_Child.run`` (campaign; the child runs ``_child_main``) ->
``_check_point`` -> ``collect_garbage`` -> ``_check_after_gc``.
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

from .manifest import MANIFEST_NAME, MARKER_NAME

__all__ = ["CampaignReport", "CrashPoint", "PointResult", "run_campaign"]

logger = logging.getLogger(__name__)

PLAN_ENV = "CKPTSVC_CRASHTEST_PLAN"
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
        if self.event in ("mid_write", "unlink"):
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
                if event == "unlink"
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


# ---- hooks (in the child trainer and, through the preload, in the node writer) ---------------


class _Hooks:
    """Pauses this process at the plan's event of the armed save (``step``), once.

    Pausing writes ``<ctl>/paused.json`` (this pid, what) and waits for ``<ctl>/release``;
    the campaign kills this or another process meanwhile. ``phase`` is set by the child
    around retention. Throttling (timer points) sleeps before every write of a shard.
    """

    def __init__(self, plan: dict[str, Any], role: str) -> None:
        self.plan = plan
        self.active = plan.get("hook_in") == role
        self.throttle_s = float(plan.get("write_delay_s", 0.0)) if plan.get("throttle") == role else 0.0
        self.phase = "save"
        self.step: int | None = None  # the save in progress in this process (trainer side)
        self._fired = False
        self._written = 0
        self._unlinks = 0
        self._lock = threading.Lock()

    def _armed(self, url: str | None) -> bool:
        if self.plan["phase"] == "retention":
            return self.phase == "retention"
        if self.phase != "save":
            return False
        if url is None:
            return self.step == self.plan["step"]
        return f"/checkpoint-{self.plan['step']}/" in url.replace(os.sep, "/") + "/"

    def hit(self, event: str, name: str | None = None, url: str | None = None) -> None:
        plan = self.plan
        if not self.active or self._fired or event != plan["event"]:
            return
        if plan.get("name") is not None and name != plan["name"]:
            return
        if not self._armed(url):
            return
        if event == "unlink":
            with self._lock:
                self._unlinks += 1
                if self._unlinks != plan["nbytes"]:
                    return
        self.pause(f"{event} {name or ''} {url or ''}".strip())

    def written(self, url: str, nbytes: int) -> int | None:
        """Count streamed bytes of the armed save; the prefix to write before pausing."""
        if not self.active or self._fired or self.plan["event"] != "mid_write":
            return None
        if not self._armed(url):
            return None
        with self._lock:
            before = self._written
            self._written += nbytes
        target = int(self.plan["nbytes"])
        return target - before if before <= target < before + nbytes else None

    def pause(self, why: str) -> None:
        self._fired = True
        ctl = self.plan["ctl"]
        tmp = os.path.join(ctl, f".paused.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "why": why}, f)
        os.replace(tmp, os.path.join(ctl, "paused.json"))
        release = os.path.join(ctl, "release")
        while not os.path.exists(release):
            time.sleep(0.01)


def install_hooks(plan: dict[str, Any], role: str) -> _Hooks:
    """Wrap the storage layer (and, in the trainer, the snapshot) with ``plan``'s hooks."""
    from .storage import Location

    hooks = _Hooks(plan, role)
    real_publish, real_remove, real_open_sink = Location.publish, Location.remove, Location.open_sink
    real_replace, real_unlink = os.replace, os.unlink

    def publish(self: Location, data: bytes) -> None:
        hooks.hit("before_publish", self.name, self.url)
        real_publish(self, data)
        hooks.hit("after_publish", self.name, self.url)

    def remove(self: Location, *, recursive: bool = False, missing_ok: bool = True) -> None:
        if recursive:
            hooks.hit("before_remove_tree", None, None)
        real_remove(self, recursive=recursive, missing_ok=missing_ok)
        hooks.hit("after_remove", self.name, self.url)

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        hooks.hit("before_rename", os.path.basename(str(dst)), str(dst))
        real_replace(src, dst, *args, **kwargs)

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if hooks.phase == "retention":
            hooks.hit("unlink", None, None)
        real_unlink(path, *args, **kwargs)

    def open_sink(self: Location, **kwargs: Any) -> Any:
        sink = real_open_sink(self, **kwargs)
        inner_write, inner_close = sink.write, sink.close

        def write(data: Any) -> None:
            view = memoryview(data).cast("B")
            if hooks.throttle_s:
                time.sleep(hooks.throttle_s)
            keep = hooks.written(self.url, view.nbytes)
            if keep is not None:
                inner_write(view[:keep])
                hooks.pause(f"mid_write {self.url} at byte {hooks.plan['nbytes']}")
                inner_write(view[keep:])
                return
            inner_write(view)

        def close() -> None:
            inner_close()
            hooks.hit("after_shard", self.name, self.url)

        sink.write, sink.close = write, close
        return sink

    Location.publish = publish  # type: ignore[method-assign]
    Location.remove = remove  # type: ignore[method-assign]
    Location.open_sink = open_sink  # type: ignore[method-assign]
    os.replace = replace
    os.unlink = unlink
    if role == "trainer" and plan["api"] == "async":
        _install_snapshot_hooks(hooks)
    return hooks


def _install_snapshot_hooks(hooks: _Hooks) -> None:
    from . import async_checkpointer
    from .workers.client import WriterClient

    real_copy = async_checkpointer.copy_into  # type: ignore[attr-defined]
    real_submit = WriterClient.submit

    def copy_into(*args: Any, **kwargs: Any) -> None:
        hooks.hit("before_copy")
        real_copy(*args, **kwargs)
        hooks.hit("after_copy")

    def submit(self: WriterClient, job: Any, callback: Any) -> None:
        real_submit(self, job, callback)
        hooks.hit("after_submit", None, getattr(job, "ckpt_url", None))

    async_checkpointer.copy_into = copy_into  # type: ignore[attr-defined]
    WriterClient.submit = submit  # type: ignore[method-assign]


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


def _writer_preload() -> None:
    """Imported by the node writer (``CKPTSVC_WRITER_PRELOAD``): install the plan's hooks."""
    raw = os.environ.get(PLAN_ENV)
    if raw:
        install_hooks(json.loads(raw), "writer")


if __name__ != "__main__":
    _writer_preload()
