"""What the bench's entry points share: sizes (``"1GiB"`` -> bytes) and the handling of
their worker processes (reap a worker's process group, the tail of its log).

:mod:`ckptsvc.tools.bench` (floors and peers), :mod:`ckptsvc.tools.bench_loop`,
:mod:`ckptsvc.tools.bench_budget` and :mod:`ckptsvc.tools.bench_incremental` import it;
it imports none of them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time

__all__ = ["GiB", "parse_size", "reap_group", "tail_log"]

GiB = 1 << 30

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"1GiB"``, ``"256MiB"``, ``"1.5G"``, ``"100MB"`` (decimal), ``"4096"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", text.lower())
    if not m:
        raise ValueError(f"cannot parse size {text!r}: use e.g. 1GiB, 256MiB, 8MiB")
    number, unit, binary, byte = m.groups()
    scale = _UNITS[unit] if (binary or not byte or not unit) else 1000 ** "bkmgt".index(unit)
    return int(float(number) * scale)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies awaiting their reaper don't)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def reap_group(pgid: int, *, grace_s: float = 10.0) -> None:
    """Wait for the worker's leftover processes (DCP daemon, writer) to stop by themselves,
    then kill what remains of its own process group, so the next measurement runs alone."""
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.05)


def tail_log(path: str, nchars: int = 1500) -> str:
    """The last ``nchars`` of a worker's log, its non-blank lines joined by `` / ``."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " / ".join(lines)[-nchars:]
