"""Is the process that left a marker or a segment still running? (stdlib only, torch-free)

A process is named by ``(host, pid namespace, pid)``: a pid means something only on the
same host and in the same pid namespace (containers sharing a filesystem or ``/dev/shm``
each have their own). Used by the staging arenas (segments of dead owners are reclaimed),
the checkpoint claims (a claim of a dead process is taken over) and ``gc``.
"""

from __future__ import annotations

import os
import re
import socket

__all__ = ["owner_alive", "pid_alive", "pid_namespace"]


def pid_namespace() -> str:
    """This process's pid namespace as digits (``"0"`` where ``/proc`` does not say)."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return "0"
    return re.sub(r"\D", "", link) or "0"


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as dead: it can no longer use its arenas)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return os.path.exists(f"/proc/{pid}") or not os.path.isdir("/proc")
    return state not in (b"Z", b"X")


def owner_alive(host: object, pidns: object, pid: object) -> bool | None:
    """``True``/``False`` for a process of this host and pid namespace, ``None`` when this
    process cannot tell (another host or namespace, or a malformed record)."""
    if type(pid) is not int or pid <= 0 or host != socket.gethostname():
        return None
    if pidns is not None and str(pidns) != pid_namespace():
        return None
    return pid_alive(pid)
