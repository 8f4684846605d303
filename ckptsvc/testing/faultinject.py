"""Fault injection for ckptsvc's own tests and crash campaign (no torch; the node writer
loads it too).

Two mechanisms, both switched on in a process by a call, and in the node writer through
its preload (``CKPTSVC_WRITER_PRELOAD=ckptsvc.testing.crash_child``, whose import calls
:func:`install_from_env`):

- :func:`install_hooks` (``CKPTSVC_CRASHTEST_PLAN``): stop this process at one exact step
  of one save - a ``Location.publish/remove/open_sink`` call, an ``os.replace`` or
  ``os.unlink``, the snapshot copy or the job submission - by writing ``paused.json`` into
  the plan's control directory and waiting for ``release`` (the crash campaign kills the
  process meanwhile). It can also throttle every shard write.
- :func:`install_os_faults` (``CKPTSVC_CRASHTEST_FAULTS``): a fault-injecting filesystem
  at the ``os`` level for local files under one directory: errors (``EIO``, ``ENOSPC``,
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
PRELOAD_MODULE = "ckptsvc.testing.crash_child"


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
    """Wrap the storage layer (and, in the trainer, the snapshot) with ``plan``'s hooks."""
    from ..storage import Location

    hooks = _Hooks(plan, role)
    real_publish, real_remove, real_open_sink, real_create = (
        Location.publish,
        Location.remove,
        Location.open_sink,
        Location.create_exclusive,
    )
    real_replace, real_unlink = os.replace, os.unlink

    def publish(self: Location, data: bytes) -> None:
        hooks.hit("before_publish", self.name, self.url)
        real_publish(self, data)
        hooks.hit("after_publish", self.name, self.url)

    def create_exclusive(self: Location, data: bytes) -> bool:  # a claim: a publish too
        hooks.hit("before_publish", self.name, self.url)
        created = real_create(self, data)
        hooks.hit("after_publish", self.name, self.url)
        return created

    def remove(self: Location, *, recursive: bool = False, missing_ok: bool = True) -> None:
        if recursive:
            hooks.hit("before_remove_tree", None, None)
        real_remove(self, recursive=recursive, missing_ok=missing_ok)
        hooks.hit("after_remove", self.name, self.url)

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        hooks.hit("before_rename", os.path.basename(str(dst)), str(dst))
        real_replace(src, dst, *args, **kwargs)

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        real_unlink(path, *args, **kwargs)
        if hooks.phase == "retention":
            hooks.hit("unlink", os.path.basename(str(path)), None)

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

        sink.write, sink.close = write, close  # type: ignore[method-assign]
        return sink

    Location.publish = publish  # type: ignore[method-assign]
    Location.create_exclusive = create_exclusive  # type: ignore[method-assign]
    Location.remove = remove  # type: ignore[method-assign]
    Location.open_sink = open_sink  # type: ignore[method-assign]
    os.replace = replace
    os.unlink = unlink
    if role == "trainer" and plan["api"] == "async":
        _install_snapshot_hooks(hooks)
    return hooks


def _install_snapshot_hooks(hooks: _Hooks) -> None:
    from .. import async_checkpointer
    from ..workers.client import WriterClient

    real_copy = async_checkpointer.copy_into
    real_submit = WriterClient.submit

    def copy_into(*args: Any, **kwargs: Any) -> None:
        hooks.hit("before_copy")
        real_copy(*args, **kwargs)
        hooks.hit("after_copy")

    def submit(self: WriterClient, job: Any, callback: Any) -> None:
        real_submit(self, job, callback)
        hooks.hit("after_submit", None, getattr(job, "ckpt_url", None))

    async_checkpointer.copy_into = copy_into
    WriterClient.submit = submit  # type: ignore[method-assign]


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

    wrapped = ("open", "write", "pwrite", "fsync", "replace", "scandir", "pread", "preadv")
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
        "open": os_open, "write": os_write, "pwrite": os_pwrite, "fsync": os_fsync,
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
