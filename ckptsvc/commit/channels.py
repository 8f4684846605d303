"""Where the ranks of one save exchange keys: the job's ``torch.distributed`` store, or
fragment files when the job has none (:class:`~ckptsvc.commit.coordinator.Coordinator`
says which keys).

Both offer the same six operations, each one round trip on a store: ``put``, ``get_many``
(a ``multi_get`` of keys known to exist), ``add`` (an atomic counter, returns the new
value), ``wait`` (block until keys exist, bounded), ``present`` (which keys exist: only on
the error path) and ``delete``.

A :class:`StoreChannel` talks through a store connection that no other save uses at the
same time (a blocking ``wait`` holds its connection: two saves in flight on one client
deadlocked across ranks). The connections come from a :class:`StorePool`, one per
checkpointer: a save takes one when it first talks to the store and gives it back when its
background thread ends, so a rank opens as many connections as it ever has saves in
flight, not one per save.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from ckptsvc import hooks
from ckptsvc.errors import CoordinationError, StorageNotFoundError
from ckptsvc.storage import Location

__all__ = ["COORD_DIR", "Channel", "FileChannel", "StoreChannel", "StorePool"]

COORD_DIR = ".ckptsvc-coord"
_POLL_MIN_S = 0.005
_POLL_MAX_S = 0.2
#: keys per ``multi_get``: one round trip each, replies of a few MiB at most
GET_BATCH = 256


class Channel:
    """Keys and values (bytes) shared by the ranks of one save."""

    def put(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def get_many(self, keys: Sequence[str]) -> list[bytes]:
        """The values of ``keys``, which must exist."""
        raise NotImplementedError

    def add(self, key: str, amount: int) -> int:
        """Add ``amount`` to the counter ``key`` (0 reads it); return its new value."""
        raise NotImplementedError

    def wait(self, keys: Sequence[str], timeout_s: float) -> bool:
        """Block until every key exists (``True``) or ``timeout_s`` passed (``False``)."""
        raise NotImplementedError

    def present(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` exist (a cheap all-present check first)."""
        raise NotImplementedError

    def delete(self, keys: Sequence[str]) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """This save's thread is done with the channel for now: give back its connection
        (a later operation takes one again)."""

    def close(self) -> None:
        """Every key of this save was read by everyone: release what is left."""
        self.release()


class StorePool:
    """Connections to one ``torch.distributed`` store, each used by one save at a time.

    :meth:`take` hands out an idle connection or opens one (``Store.clone``: same keys,
    its own socket; a ``store.connect`` hook point each time); :meth:`give` takes it back.
    So the connections open at once never exceed the most saves in flight so far (plus
    rank 0's sweep of acknowledged outcomes). A store that cannot be cloned is shared as
    it is (then blocking waits of two saves in flight queue behind each other)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self.opened = 0

    def take(self) -> Any:
        """An idle connection, or a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        client = _own_connection(self._store)
        if client is not self._store:
            with self._lock:
                self.opened += 1
            hooks.point("store.connect")
        return client

    def give(self, client: Any) -> None:
        """``client`` (from :meth:`take`) is free again."""
        if client is not self._store:
            with self._lock:
                self._idle.append(client)


class StoreChannel(Channel):
    """A ``torch.distributed`` Store under a per-save prefix (``PrefixStore``), through a
    connection of ``pool`` (default: a pool of its own, so a connection of its own)."""

    def __init__(self, store: Any, prefix: str, *, pool: StorePool | None = None) -> None:
        self._pool = pool if pool is not None else StorePool(store)
        self._prefix = prefix
        self._client: Any = None
        self._held: Any = None
        self._lock = threading.Lock()

    @property
    def _store(self) -> Any:
        with self._lock:
            if self._held is None:
                from torch.distributed import PrefixStore

                self._client = self._pool.take()
                self._held = PrefixStore(self._prefix, self._client)
            return self._held

    def release(self) -> None:
        with self._lock:
            client, self._client, self._held = self._client, None, None
        if client is not None:
            self._pool.give(client)

    def _call(self, what: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as e:
            raise CoordinationError(
                f"the job's torch.distributed store failed during {what} under {self._prefix!r} "
                f"({type(e).__name__}: {e}); rank 0 (which hosts it) or the network is gone"
            ) from e

    def put(self, key: str, value: bytes) -> None:
        # Store.set takes bytes too (its stub says str): no decode/encode round trip
        self._call(f"set {key}", lambda: self._store.set(key, value))

    def get_many(self, keys: Sequence[str]) -> list[bytes]:
        out: list[bytes] = []
        for i in range(0, len(keys), GET_BATCH):
            batch = list(keys[i : i + GET_BATCH])
            values = self._call(
                f"multi_get {batch[0]}...", lambda b=batch: self._store.multi_get(b)
            )
            out.extend(bytes(v) for v in values)
        return out

    def add(self, key: str, amount: int) -> int:
        return int(self._call(f"add {key}", lambda: self._store.add(key, amount)))

    def wait(self, keys: Sequence[str], timeout_s: float) -> bool:
        try:
            self._store.wait(list(keys), timedelta(seconds=max(0.001, timeout_s)))
        except Exception as e:
            if "timeout" in str(e).lower() or "timed out" in str(e).lower():
                return False
            raise CoordinationError(
                f"the job's torch.distributed store failed while waiting for {list(keys)} under "
                f"{self._prefix!r} ({type(e).__name__}: {e}); rank 0 (which hosts it) or the "
                "network is gone"
            ) from e
        return True

    def present(self, keys: Sequence[str]) -> set[str]:
        if not keys:
            return set()
        if self._call("check", lambda: self._store.check(list(keys))):
            return set(keys)
        return {k for k in keys if self._call(f"check {k}", lambda k=k: self._store.check([k]))}

    def delete(self, keys: Sequence[str]) -> None:
        for k in keys:
            with contextlib.suppress(Exception):
                self._store.delete_key(k)


def _own_connection(store: Any) -> Any:
    """A new client of ``store`` (``Store.clone``: same keys, its own connection). A
    blocking ``wait`` holds its client's connection until it returns; with one client
    shared by two saves in flight, rank 0 waiting for the reports of save B blocked its own
    outcome of save A, while another rank, waiting for A's outcome, could not publish its
    report of B: a deadlock across ranks. A store that cannot be cloned is used as it is."""
    clone = getattr(store, "clone", None)
    if clone is None:
        return store
    try:
        return clone()
    except (NotImplementedError, RuntimeError):
        return store


class FileChannel(Channel):
    """Fragment files under ``<checkpoint>/.ckptsvc-coord/<seq>/`` (no store in the job).

    A counter is a run of files ``<key>.1``, ``<key>.2``, ... each created exclusively, so
    of two adders each gets its own value; waiting polls the listing."""

    def __init__(self, loc: Location) -> None:
        self._loc = loc

    def _file(self, key: str) -> Location:
        return self._loc.join(key.replace("/", "-"))

    def put(self, key: str, value: bytes) -> None:
        self._file(key).publish(value)

    def get_many(self, keys: Sequence[str]) -> list[bytes]:
        return [self._file(k).read_bytes() for k in keys]

    def _names(self) -> set[str]:
        try:
            return {c.name for c in self._loc.list_children()}
        except StorageNotFoundError:
            return set()

    def add(self, key: str, amount: int) -> int:
        base = key.replace("/", "-")
        names = self._names()
        value = sum(1 for n in names if n.startswith(base + ".") and n[len(base) + 1 :].isdigit())
        for _ in range(amount):
            value += 1
            while not self._loc.join(f"{base}.{value}").create_exclusive(b"1"):
                value += 1  # another adder took this value
        return value

    def wait(self, keys: Sequence[str], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        delay = _POLL_MIN_S
        while len(self.present(keys)) < len(keys):
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)
        return True

    def present(self, keys: Sequence[str]) -> set[str]:
        names = self._names()
        return {k for k in keys if k.replace("/", "-") in names}

    def delete(self, keys: Sequence[str]) -> None:
        for k in keys:
            with contextlib.suppress(Exception):
                self._file(k).remove(missing_ok=True)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(Exception):
            self._loc.remove(recursive=True, missing_ok=True)
        if self._loc.is_local:
            with contextlib.suppress(OSError):
                os.rmdir(self._loc.parent.path)  # only if no other save's keys are left
