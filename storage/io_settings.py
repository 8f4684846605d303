"""Per-job storage settings that a :class:`~.location.Location` carries: :class:`IOSettings`.

One process may write for several jobs at once with different settings (the node writer
serves trainers of several jobs). So the settings of a write travel with the location it
writes to, not through the process environment: a ``Location`` made with ``settings``
(kept by ``join`` and ``parent``) applies them to every request and sink made from it. A
location without settings reads the ``CKPTSVC_*`` knobs at the moment of use, as the
trainer-side code always did.
"""

from __future__ import annotations

from dataclasses import dataclass

from .direct_io import DirectIOMode
from .retry import RetryPolicy

__all__ = ["IOSettings"]


@dataclass(frozen=True)
class IOSettings:
    """How one job's files are written and its requests retried (the knobs of the same
    names: ``CKPTSVC_FSYNC``, ``CKPTSVC_WRITE_CHUNK_BYTES``, ...), already resolved."""

    fsync: bool
    write_chunk_bytes: int
    part_size_bytes: int
    upload_parts_in_flight: int
    direct_io: DirectIOMode
    direct_io_min_bytes: int
    direct_io_buffer_bytes: int
    retry: RetryPolicy
    #: the writes copy most bytes into bounce slots (a sync save of heap tensors): take
    #: slots of huge pages, physically contiguous (``storage.bounce``); otherwise slots
    #: hold a header block or a tail, and a huge page would cost 2 MiB of memory for it
    huge_bounce_slots: bool = False
