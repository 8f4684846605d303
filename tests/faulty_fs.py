"""A local-disk fsspec filesystem with injectable faults, controlled across processes.

``faulty://<absolute path>`` behaves like an object store backed by local files (no
directories to create, ``open("wb")`` streams, ``discard`` aborts), so ckptsvc takes its
object-store code path. Faults are switched by *files*, so a test can steer a node
writer process it does not control:

- ``gate_path``: while this file exists, every write to a file whose path contains
  ``match`` blocks (polls every 20 ms);
- ``fail_path``: while this file exists, a write to a matching file fails with ``EIO``
  once the file has received ``fail_after_bytes`` bytes (a storage error mid-stream);
- ``delay_s``: sleep this long before every write to a matching file (slow storage).

The node writer imports this module through ``CKPTSVC_WRITER_PRELOAD=faulty_fs`` (the
writer inherits the test process's ``sys.path``, which holds ``tests/``).
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

__all__ = ["FaultyFileSystem"]

PROTOCOL = "faulty"


class _FaultyWriter:
    def __init__(self, fs: FaultyFileSystem, path: str) -> None:
        self._fs = fs
        self._path = path
        self._tmp = f"{path}.part-{os.getpid()}-{id(self)}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in close/discard
        self._nbytes = 0
        self.closed = False

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self._fs.before_write(self._path, self._nbytes, n)
        self._f.write(data)
        self._nbytes += n
        return n

    def close(self) -> None:  # like a multipart upload: visible only when complete
        if self.closed:
            return
        self.closed = True
        self._f.close()
        os.replace(self._tmp, self._path)

    def discard(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._f.close()
        os.unlink(self._tmp)

    def __enter__(self) -> _FaultyWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FaultyFileSystem(AbstractFileSystem):
    protocol = PROTOCOL
    root_marker = "/"

    def __init__(
        self,
        *,
        gate_path: str | None = None,
        fail_path: str | None = None,
        fail_after_bytes: int = 0,
        delay_s: float = 0.0,
        match: str = ".safetensors",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.local = LocalFileSystem()
        self.gate_path = gate_path
        self.fail_path = fail_path
        self.fail_after_bytes = fail_after_bytes
        self.delay_s = delay_s
        self.match = match

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = str(path)
        if text.startswith(f"{PROTOCOL}://"):
            text = text[len(PROTOCOL) + 3 :]
        return text.rstrip("/") or "/"

    def before_write(self, path: str, already: int, nbytes: int) -> None:
        if self.match not in path:
            return
        while self.gate_path and os.path.exists(self.gate_path):
            time.sleep(0.02)
        if self.delay_s:
            time.sleep(self.delay_s)
        if (
            self.fail_path
            and os.path.exists(self.fail_path)
            and already + nbytes > self.fail_after_bytes
        ):
            raise OSError(errno.EIO, f"injected I/O error writing {path}")

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        entries = self.local.ls(self._strip_protocol(path), detail=True)
        entries = [e for e in entries if ".part-" not in e["name"]]
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return dict(self.local.info(self._strip_protocol(path)))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if "w" in mode:
            return _FaultyWriter(self, path)
        return self.local._open(path, mode)

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kw: Any
    ) -> bytes:
        return bytes(self.local.cat_file(self._strip_protocol(path), start=start, end=end))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.local.mkdir(self._strip_protocol(path), create_parents=create_parents)

    def rm_file(self, path: str) -> None:
        self.local.rm_file(self._strip_protocol(path))

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self.local.rm(self._strip_protocol(path), recursive=recursive, maxdepth=maxdepth)

    def rmdir(self, path: str) -> None:
        self.local.rmdir(self._strip_protocol(path))


fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)
