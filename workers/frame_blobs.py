"""Large byte strings sent once per connection: later frames name them (protocol 7).

A later save of a state with 100,000 tensors sends the same shard header, HF index and
state document as the save before (about 29 MB): pickling and pushing them through the
socket cost the training thread 50-100 ms, and the socket holds the trainer until the
writer (at ``nice +10``) has read them. Each side of a connection keeps the byte strings
of at least :data:`MIN_BYTES` that the trainer sent:

1. :class:`SentBlobs` (trainer, one per connection, used under its send lock) pickles a
   frame; a byte string it sent before - the same object, or equal bytes of the same
   length - becomes the persistent id ``("ref", key)``, a new one ``("new", key, data,
   forget)``. It keeps at most ``capacity_bytes``: the least recently sent are dropped,
   and their keys travel in ``forget`` with the next new one. Nothing is registered for a
   frame that failed to pickle.
2. :class:`ReceivedBlobs` (writer, one per connection) resolves those ids while
   unpickling: it stores what ``new`` brings, drops what ``forget`` names and never
   evicts by itself, so it holds every key the trainer may still name. An unknown key is
   an error of the frame (the connection is then dropped).
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from typing import Any

__all__ = ["DEFAULT_CAPACITY_BYTES", "MIN_BYTES", "ReceivedBlobs", "SentBlobs"]

#: byte strings shorter than this are pickled in every frame
MIN_BYTES = 256 << 10
#: what each side keeps per connection (the sender decides what to drop): a save of
#: 100,000 tensors sends 29 MB of them, a changed document is kept beside its old one
DEFAULT_CAPACITY_BYTES = 64 << 20


class SentBlobs:
    """The trainer's side of one connection (see the module docstring)."""

    def __init__(self, *, capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> None:
        self._capacity = capacity_bytes
        self._blobs: OrderedDict[int, bytes] = OrderedDict()  # key -> data, LRU first
        self._by_id: dict[int, int] = {}  # id(data) -> key (data is held: ids stay unique)
        self._by_len: dict[int, list[int]] = {}  # len(data) -> keys
        self._nbytes = 0
        self._next_key = 1
        self._forget: list[int] = []

    @property
    def nbytes(self) -> int:
        """Bytes the peer holds for this connection."""
        return self._nbytes

    def dumps(self, message: object) -> bytes:
        """``message`` pickled, naming the byte strings the peer already holds."""
        buf = io.BytesIO()
        new: list[tuple[int, bytes]] = []
        forget = list(self._forget)
        emitting: list[bytes] = []  # a new byte string, pickled inside its own id

        def persistent_id(obj: Any) -> Any:
            if type(obj) is not bytes or len(obj) < MIN_BYTES:
                return None
            if emitting and obj is emitting[-1]:
                emitting.pop()
                return None
            key = self._find(obj)
            if key is None:
                for k, data in new:
                    if data is obj or data == obj:
                        key = k
                        break
            if key is not None:
                if key in self._blobs:
                    self._blobs.move_to_end(key)
                return ("ref", key)
            key = self._next_key + len(new)
            new.append((key, obj))
            emitting.append(obj)
            dropped = forget if len(new) == 1 else []
            return ("new", key, obj, dropped)

        pickler = pickle.Pickler(buf, protocol=5)
        pickler.persistent_id = persistent_id  # type: ignore[method-assign]
        pickler.dump(message)
        if new:
            self._next_key += len(new)
            self._forget = []
            for key, data in new:
                self._add(key, data)
            self._evict()
        return buf.getvalue()

    def _find(self, data: bytes) -> int | None:
        key = self._by_id.get(id(data))
        if key is not None:
            return key
        for k in self._by_len.get(len(data), ()):
            if self._blobs[k] == data:
                return k
        return None

    def _add(self, key: int, data: bytes) -> None:
        self._blobs[key] = data
        self._by_id.setdefault(id(data), key)
        self._by_len.setdefault(len(data), []).append(key)
        self._nbytes += len(data)

    def _evict(self) -> None:
        while self._nbytes > self._capacity and len(self._blobs) > 1:
            key, data = self._blobs.popitem(last=False)
            if self._by_id.get(id(data)) == key:
                del self._by_id[id(data)]
            same_len = self._by_len[len(data)]
            same_len.remove(key)
            if not same_len:
                del self._by_len[len(data)]
            self._nbytes -= len(data)
            self._forget.append(key)


class ReceivedBlobs:
    """The writer's side of one connection (see the module docstring)."""

    def __init__(self) -> None:
        self._blobs: dict[int, bytes] = {}

    @property
    def nbytes(self) -> int:
        return sum(map(len, self._blobs.values()))

    def persistent_load(self, pid: Any) -> bytes:
        """The byte string a persistent id of :class:`SentBlobs` stands for."""
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "new":
            _, key, data, forget = pid
            if not isinstance(data, bytes) or not isinstance(forget, list):
                raise pickle.UnpicklingError(f"malformed byte string id {pid[:2]!r}")
            for old in forget:
                self._blobs.pop(old, None)
            self._blobs[key] = data
            return data
        if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "ref":
            data = self._blobs.get(pid[1])
            if data is None:
                raise pickle.UnpicklingError(f"byte string {pid[1]!r} was never sent or dropped")
            return data
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
