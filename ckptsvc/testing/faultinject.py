"""Fault injection for ckptsvc's own tests and crash campaign (no torch; the node writer
loads it too).

Two mechanisms, both switched on in a process by a call, and in the node writer through
its preload (``CKPTSVC_WRITER_PRELOAD=ckptsvc.testing.writer_preload``, whose import calls
:func:`install_from_env`):

- :func:`install_hooks` (``CKPTSVC_CRASHTEST_PLAN``): stop this process at one exact step
  of one save - a ``Location.publish/remove/open_sink`` call, the ``os.replace`` or
  ``os.unlink`` of a local file, the snapshot copy or the job submission, all hook points
  of :mod:`ckptsvc.hooks` - by writing ``paused.json`` into
  the plan's control directory and waiting for ``release`` (the crash campaign kills the
  process meanwhile). It can also throttle every shard write.
- :func:`install_os_faults` (``CKPTSVC_CRASHTEST_FAULTS``): a fault-injecting filesystem
  at the ``os`` level for local files under one directory (it patches ``os`` and
  ``builtins.open`` in this process: the only way to fail the OS calls themselves): errors (``EIO``, ``ENOSPC``,
  any errno), latency and hangs at each call type - open, write, close (fsync), publish
  (rename), list, read, remove - so the storage layer's real error paths run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ckptsvc import hooks

__all__ = [
    "FAULTS_ENV",
    "FAULT_OPS",
    "PLAN_ENV",
    "OsFault",
    "faults_env",
    "install_from_env",
    "install_hooks",
    "install_os_faults",
]

PLAN_ENV = "CKPTSVC_CRASHTEST_PLAN"
#: the module the node writer imports to get the hooks and faults of its environment
PRELOAD_MODULE = "ckptsvc.testing.writer_preload"


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
        self.throttle_s = (
            float(plan.get("write_delay_s", 0.0)) if plan.get("throttle") == role else 0.0
        )
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
        if event == "unlink" and plan.get("name") is None:
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
    """Install ``plan``'s pauses at the hook points of :mod:`ckptsvc.hooks` (the storage
    layer and, in the trainer, the snapshot copy and the job submission)."""
    state = _Hooks(plan, role)

    def hit(event: str) -> Callable[..., None]:
        def on_point(*, name: str | None = None, url: str | None = None, **_: Any) -> None:
            state.hit(event, name, url)

        return on_point

    def before_remove(
        *, recursive: bool, name: str | None = None, url: str | None = None, **_: Any
    ) -> None:
        if recursive:
            state.hit("before_remove_tree", None, None)
        else:  # one file: e.g. the marker's delete after the commit
            state.hit("before_remove", name, url)

    def before_rename(*, path: str) -> None:
        state.hit("before_rename", os.path.basename(path), path)

    def after_unlink(*, path: str) -> None:
        if state.phase == "retention":
            state.hit("unlink", os.path.basename(path), None)

    def open_sink(sink: Any, *, name: str, url: str) -> Any:
        return _PausingSink(sink, state, name=name, url=url)

    hooks.install("publish.before", hit("before_publish"))
    hooks.install("publish.after", hit("after_publish"))
    hooks.install("remove.before", before_remove)
    hooks.install("remove.after", hit("after_remove"))
    hooks.install("rename.before", before_rename)
    hooks.install("unlink.after", after_unlink)
    hooks.install("sink.open", open_sink)
    if role == "trainer" and plan["api"] == "async":
        hooks.install("snapshot.copy.before", lambda: state.hit("before_copy"))
        hooks.install("snapshot.copy.after", lambda: state.hit("after_copy"))
        hooks.install("job.submitted", lambda *, url: state.hit("after_submit", None, url))
    return state


class _PausingSink:
    """A sink whose writes the plan throttles or pauses mid-way (``mid_write``), and whose
    close is the ``after_shard`` event; everything else is the wrapped sink's."""

    def __init__(self, sink: Any, state: _Hooks, *, name: str, url: str) -> None:
        self._sink, self._state, self._name, self._url = sink, state, name, url

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._sink, attr)

    def write(self, data: Any) -> None:
        state = self._state
        view = memoryview(data).cast("B")
        if state.throttle_s:
            time.sleep(state.throttle_s)
        keep = state.written(self._url, view.nbytes)
        if keep is not None:
            self._sink.write(view[:keep])
            state.pause(f"mid_write {self._url} at byte {state.plan['nbytes']}")
            self._sink.write(view[keep:])
            return
        self._sink.write(view)

    def close(self) -> None:
        self._sink.close()
        self._state.hit("after_shard", self._name, self._url)

    def abort(self) -> None:
        self._sink.abort()


# ---- OS-level faults on local files (a fault-injecting filesystem, in this process) ------------

FAULTS_ENV = "CKPTSVC_CRASHTEST_FAULTS"
#: the ``os`` calls behind each storage operation on local disk
FAULT_OPS = ("open", "write", "close", "publish", "list", "read", "remove")


@dataclass(frozen=True)
class OsFault:
    """One injected fault: ``op`` on files whose path contains ``match`` under ``root``.

    ``errno_name`` (``"EIO"``, ``"ENOSPC"``, ...) makes the call fail; ``delay_s`` adds
    latency; ``hang_path`` blocks the call while that file exists. The fault is active only
    while ``switch_path`` exists (``None``: always). Ops: ``open`` (create for writing),
    ``write``, ``close`` (fsync), ``publish`` (rename into place), ``list``, ``read``,
    ``remove``.
    """

    root: str
    op: str
    errno_name: str | None = None
    delay_s: float = 0.0
    hang_path: str | None = None
    switch_path: str | None = None
    match: str = ""

    def applies(self, op: str, path: str) -> bool:
        return (
            op == self.op
            and path.startswith(self.root)
            and self.match in path
            and (self.switch_path is None or os.path.exists(self.switch_path))
        )

    def trigger(self, path: str) -> None:
        while self.hang_path and os.path.exists(self.hang_path):
            time.sleep(0.01)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.errno_name:
            import errno

            code = getattr(errno, self.errno_name)
            raise OSError(
                code, f"{os.strerror(code)} (injected by ckptsvc.testing.crashtest)", path
            )


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def install_os_faults(faults: list[OsFault]) -> Callable[[], None]:
    """Wrap this process's ``os``/``open`` calls with ``faults``; returns the undo function."""
    import builtins

    wrapped = (
        "open", "write", "pwrite", "pwritev", "fsync", "replace", "scandir", "pread", "preadv",
    )  # fmt: skip
    real = {name: getattr(os, name) for name in (*wrapped, "unlink")}
    real_open = builtins.open

    def check(op: str, path: Any) -> None:
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        for fault in faults:
            if text and fault.applies(op, text):
                fault.trigger(text)

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        check("open" if flags & (os.O_WRONLY | os.O_RDWR) else "read", path)
        return int(real["open"](path, flags, *args, **kwargs))

    def os_write(fd: int, data: Any) -> int:
        check("write", _fd_path(fd))
        return int(real["write"](fd, data))

    def os_pwrite(fd: int, data: Any, offset: int) -> int:
        check("write", _fd_path(fd))
        return int(real["pwrite"](fd, data, offset))

    def os_pwritev(fd: int, buffers: Any, offset: int, *args: Any) -> int:
        check("write", _fd_path(fd))
        return int(real["pwritev"](fd, buffers, offset, *args))

    def os_fsync(fd: Any) -> None:
        check("close", _fd_path(fd if isinstance(fd, int) else fd.fileno()))
        real["fsync"](fd)

    def os_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        check("publish", dst)
        real["replace"](src, dst, *args, **kwargs)

    def os_scandir(path: Any = ".") -> Any:
        check("list", path)
        return real["scandir"](path)

    def os_pread(fd: int, n: int, offset: int) -> bytes:
        check("read", _fd_path(fd))
        return bytes(real["pread"](fd, n, offset))

    def os_preadv(fd: int, buffers: Any, offset: int, *args: Any) -> int:
        check("read", _fd_path(fd))
        return int(real["preadv"](fd, buffers, offset, *args))

    def os_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        check("remove", path)
        real["unlink"](path, *args, **kwargs)

    def b_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        check("read" if "r" in mode and "+" not in mode else "open", file)
        return real_open(file, mode, *args, **kwargs)

    wrappers = {
        "open": os_open, "write": os_write, "pwrite": os_pwrite, "pwritev": os_pwritev,
        "fsync": os_fsync,
        "replace": os_replace,
        "scandir": os_scandir, "pread": os_pread, "preadv": os_preadv, "unlink": os_unlink,
    }  # fmt: skip
    for name, fn in wrappers.items():
        setattr(os, name, fn)
    builtins.open = b_open

    def undo() -> None:
        for name, fn in real.items():
            setattr(os, name, fn)
        builtins.open = real_open

    return undo


def faults_env(faults: list[OsFault]) -> dict[str, str]:
    """Environment that makes a node writer (started from it) inject ``faults`` too."""
    preload = [p for p in os.environ.get("CKPTSVC_WRITER_PRELOAD", "").split(",") if p.strip()]
    return {
        FAULTS_ENV: json.dumps([asdict(f) for f in faults]),
        "CKPTSVC_WRITER_PRELOAD": ",".join(dict.fromkeys([*preload, PRELOAD_MODULE])),
    }


def install_from_env() -> None:
    """Install the hooks (``CKPTSVC_CRASHTEST_PLAN``) and OS faults
    (``CKPTSVC_CRASHTEST_FAULTS``) this process's environment asks for, in the writer role."""
    raw = os.environ.get(PLAN_ENV)
    if raw:
        install_hooks(json.loads(raw), "writer")
    raw = os.environ.get(FAULTS_ENV)
    if raw:
        install_os_faults([OsFault(**f) for f in json.loads(raw)])
