"""Exclusive checkpoint directories: a save claims its directory before a byte is written.

The claim *is* the in-progress marker ``.ckptsvc-in-progress``, created exclusively
(:meth:`~ckptsvc.storage.Location.create_exclusive`: ``O_EXCL`` locally, a conditional PUT
on S3 and GCS), so of two savers of one directory exactly one proceeds and the other gets
:class:`~ckptsvc.errors.CommitConflictError` at once. The marker holds who claimed it
(host, pid namespace, pid) and a random claim id.

Call order (which process and thread runs each step):

1. :func:`claim_checkpoint` (the saving process - a trainer's training thread, before its
   save is registered; the sync API's caller): refuse a committed directory; create the
   marker exclusively, or take over a *stale* one; check again that nobody committed in
   between. Returns a :class:`Claim`, which the process keeps alive: a background thread
   refreshes the marker's modification time every ``CKPTSVC_CLAIM_LEASE_S / 4``.
2. the writer writes the files (``begin_checkpoint`` refuses a committed directory too, so
   ranks that do not claim never write into one);
3. :func:`check_claim` (the committing writer, just before the manifest goes out): the
   marker still carries this save's claim id - a save whose claim was taken over is not
   committed;
4. :meth:`Claim.release` (the saving process, when the save finished either way): stop
   refreshing. The commit removed the marker; a failed save leaves it for ``gc``, and this
   process may claim the directory again.

A marker is stale, and may be taken over, when its owner is a dead process of this host
and pid namespace, or this very process with no save holding it (an earlier failed
save), or - for an owner this host cannot check (another host or container) - when it has
not been refreshed for ``CKPTSVC_CLAIM_LEASE_S``. Locally a takeover renames the stale
marker away (only one of two takers can) before creating its own; object stores have no
conditional delete, so two processes taking over the same stale marker within one round
trip could both proceed - the commit-time check then refuses the loser's manifest.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ckptsvc import knobs
from ckptsvc.errors import CommitConflictError, StorageNotFoundError
from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME, now_iso
from ckptsvc.liveness import owner_alive, pid_namespace
from ckptsvc.storage import Location

__all__ = ["Claim", "check_claim", "claim_checkpoint", "describe_claim", "read_marker"]

logger = logging.getLogger(__name__)

_MAX_MARKER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Claim:
    """This process's claim of one checkpoint directory (see the module docstring)."""

    location: Location
    claim_id: str

    @property
    def marker(self) -> Location:
        return self.location.join(MARKER_NAME)

    def release(self) -> None:
        """Stop refreshing the marker (the save is over; idempotent)."""
        _KEEPER.forget(self)

    def abandon(self) -> None:
        """Release, and remove the marker if it is still ours (nothing was written)."""
        _KEEPER.forget(self)
        try:
            _remove_own_marker(self)
        except Exception as e:  # the save's own error matters more; gc collects the rest
            logger.warning("could not remove the claim of %s: %s", self.location.url, e)


def claim_checkpoint(ckpt: Location, *, what: str = "save") -> Claim:
    """Claim ``ckpt`` for one save (step 1 of the module docstring); raises
    :class:`~ckptsvc.errors.CommitConflictError` if it is committed or claimed by a live
    save."""
    with _CLAIMING:  # this process's claims one at a time: "held by us" is then exact
        return _claim(ckpt, what=what)


def _claim(ckpt: Location, *, what: str) -> Claim:
    _refuse_committed(ckpt, what=what)
    claim = Claim(ckpt, uuid.uuid4().hex)
    marker = claim.marker
    doc = json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "pidns": pid_namespace(),
            "started": now_iso(),
            "claim": claim.claim_id,
        }
    ).encode()
    ckpt.makedirs()
    if not marker.create_exclusive(doc):
        owner = read_marker(ckpt)
        if owner is not None and owner.get("claim") == claim.claim_id:
            _KEEPER.hold(claim)  # our create went through; a retry of it was refused
            return claim
        why_live = _why_live(ckpt, owner)
        if why_live is not None:
            raise CommitConflictError(
                f"{ckpt.url}: another {why_live} is saving this checkpoint; wait for it, "
                "or save under another step"
            )
        logger.info("%s: taking over the stale claim %s", ckpt.url, owner)
        if not _take_over(ckpt, owner, doc):
            raise CommitConflictError(
                f"{ckpt.url}: another save claimed this checkpoint at the same moment; "
                "wait for it, or save under another step"
            )
    try:
        _refuse_committed(ckpt, what=what)  # a commit may have landed before our claim
    except CommitConflictError:
        _remove_own_marker(claim)
        raise
    _KEEPER.hold(claim)
    return claim


def check_claim(ckpt: Location, claim_id: str) -> None:
    """Step 3: raise :class:`~ckptsvc.errors.CommitConflictError` unless the marker of
    ``ckpt`` still carries ``claim_id``."""
    owner = read_marker(ckpt)
    if owner is None or owner.get("claim") != claim_id:
        by = _describe(owner) if owner else "nobody (the marker is gone)"
        raise CommitConflictError(
            f"{ckpt.url}: this save's claim was taken over by {by} while it was being "
            "written; it is not committed (the other save decides what the checkpoint holds)"
        )


def read_marker(ckpt: Location) -> dict[str, Any] | None:
    """The in-progress marker's JSON object (``{}`` if damaged), ``None`` if there is none."""
    marker = ckpt.join(MARKER_NAME)
    try:
        if marker.is_local:
            raw = _read_local(marker.path)
        else:  # one bounded GET (no HEAD first: the commit waits on this round trip)
            raw = marker.read_range(0, _MAX_MARKER_BYTES + 1)
    except (StorageNotFoundError, FileNotFoundError):
        return None
    except Exception as e:  # a marker we cannot read is a damaged one, not a crash
        logger.warning("%s: unreadable in-progress marker: %s", marker.url, e)
        return {}
    if len(raw) > _MAX_MARKER_BYTES:
        return {}
    try:
        doc = json.loads(raw, parse_int=_small_int)
    except (ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def describe_claim(ckpt: Location) -> str:
    """Who holds ``ckpt``'s in-progress marker, for a message that refuses to load it: a
    save of this process still in flight, a live save elsewhere, or a dead owner."""
    owner = read_marker(ckpt)
    if owner is None:
        return "no in-progress marker"
    if not owner:
        return "its in-progress marker is damaged"
    if owner.get("pid") == os.getpid() and _KEEPER.holds(ckpt.url):
        return (
            f"this process (pid {os.getpid()}) is still saving it: wait for that save "
            "(its SaveHandle.wait()) first, or load through ckptsvc.load_state / "
            "load_checkpoint / load_components, which wait for this process's saves"
        )
    alive = owner_alive(owner.get("host"), owner.get("pidns"), owner.get("pid"))
    if alive is False:
        return f"its saver is gone ({_describe(owner)}): `ckptsvc gc` removes it"
    return f"a save may still be writing it ({_describe(owner)})"


# ---- staleness and takeover ------------------------------------------------------------------


def _refuse_committed(ckpt: Location, *, what: str) -> None:
    if ckpt.join(MANIFEST_NAME).exists():
        raise CommitConflictError(
            f"{ckpt.url} is already committed; a {what} never rewrites a committed "
            "checkpoint: pass overwrite=True to replace it (the old one stays until the new "
            "one commits), or save under another step"
        )


def _why_live(ckpt: Location, owner: dict[str, Any] | None) -> str | None:
    """A description of the live owner of ``ckpt``'s marker, ``None`` if it is stale."""
    if owner is None:
        return None  # removed since our attempt: retry through the takeover path
    alive = owner_alive(owner.get("host"), owner.get("pidns"), owner.get("pid"))
    if alive is False:
        return None
    if alive is True:
        if owner.get("pid") == os.getpid() and not _KEEPER.holds(ckpt.url):
            return None  # an earlier save of this process that failed
        return f"save ({_describe(owner)})"
    lease_s = knobs.CLAIM_LEASE_S.get()
    try:
        mtime = ckpt.join(MARKER_NAME).mtime_s()
    except StorageNotFoundError:
        return None
    if mtime is not None and time.time() - mtime > lease_s:
        return None
    return f"save ({_describe(owner)}, refreshed within CKPTSVC_CLAIM_LEASE_S={lease_s:g} s)"


def _take_over(ckpt: Location, stale: dict[str, Any] | None, doc: bytes) -> bool:
    """Replace a stale marker by ours; ``False`` if another process won the race."""
    marker = ckpt.join(MARKER_NAME)
    if marker.is_local:
        tomb = f"{marker.path}.stale-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(marker.path, tomb)  # of two takers, one rename finds nothing
        except FileNotFoundError:
            pass
        else:
            os.unlink(tomb)
        return marker.create_exclusive(doc)
    if read_marker(ckpt) != stale:  # changed since we judged it: someone took it
        return False
    marker.remove(missing_ok=True)
    return marker.create_exclusive(doc)


def _remove_own_marker(claim: Claim) -> None:
    owner = read_marker(claim.location)
    if owner is not None and owner.get("claim") == claim.claim_id:
        claim.marker.remove(missing_ok=True)


def _describe(owner: dict[str, Any]) -> str:
    return (
        f"pid {owner.get('pid', '?')} on {owner.get('host', 'an unknown host')}, "
        f"started {owner.get('started', 'at an unknown time')}"
    )


def _read_local(path: str) -> bytes:
    """At most one byte past the cap of a regular file (a FIFO or device is not read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b"\0" * (_MAX_MARKER_BYTES + 1)  # damaged: not a regular file
        return os.read(fd, _MAX_MARKER_BYTES + 1)
    finally:
        os.close(fd)


def _small_int(text: str) -> int:
    if len(text) > 32:
        raise ValueError("integer too long for a marker")
    return int(text)


# ---- keeping claims alive ----------------------------------------------------------------------


class _Keeper:
    """The claims this process holds, refreshed by one daemon thread (started on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, Claim] = {}
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def hold(self, claim: Claim) -> None:
        with self._lock:
            self._held[claim.location.url] = claim
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="ckptsvc-claims", daemon=True
                )
                self._thread.start()
        self._wake.set()  # re-reads the lease (the knob may have changed)

    def holds(self, url: str) -> bool:
        with self._lock:
            return url in self._held

    def forget(self, claim: Claim) -> None:
        with self._lock:
            if self._held.get(claim.location.url) == claim:
                del self._held[claim.location.url]

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._held = {}
        self._thread = None
        self._wake = threading.Event()

    def _run(self) -> None:
        while True:
            if self._wake.wait(max(0.05, knobs.CLAIM_LEASE_S.get() / 4)):
                self._wake.clear()  # a new claim: its marker is fresh; wait a whole period
                continue
            with self._lock:
                claims = list(self._held.values())
            for claim in claims:
                try:
                    _refresh(claim)
                except Exception as e:  # never let one store error stop the refresher
                    logger.warning("could not refresh the claim of %s: %s", claim.location.url, e)


def _refresh(claim: Claim) -> None:
    """Mark the claim as alive (its marker's modification time), if it is still ours."""
    marker = claim.marker
    if marker.is_local:
        owner = read_marker(claim.location)
        if owner is not None and owner.get("claim") == claim.claim_id:
            os.utime(marker.path)
        return
    owner = read_marker(claim.location)
    if owner is not None and owner.get("claim") == claim.claim_id:
        marker.publish(json.dumps(owner).encode())


_KEEPER = _Keeper()
_CLAIMING = threading.Lock()


def _after_fork_in_child() -> None:
    global _CLAIMING
    _CLAIMING = threading.Lock()
    _KEEPER.reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
