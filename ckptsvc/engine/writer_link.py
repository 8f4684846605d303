"""``WriterLink``: one checkpointer's connection to its node writer, restarted when needed.

1. ``__init__`` (training thread): connect to this node's writer, starting it if none runs.
2. ``submit`` (training thread, the overlapped-snapshot thread, rank 0's commit thread; one
   at a time): send a job; a writer found dead is replaced first (one declared wedged -
   no progress for ``CKPTSVC_WRITER_TIMEOUT_S`` - is killed and its socket name freed
   first), and a failed send is retried once on a new writer. ``run`` submits and waits
   for the outcome (the commit); the client's watchdog bounds that wait.
3. ``release_arena`` (any thread): the trainer unlinked an arena the writer may map.
4. ``close`` (the owner, once): disconnect; the writer lingers for other local trainers
   (a wedged one is killed).
"""

from __future__ import annotations

import logging
import threading

from ckptsvc.errors import WriterDiedError
from ckptsvc.workers.client import JobCallback, WriterClient
from ckptsvc.workers.protocol import JobDone, JobFailed, SaveJob

__all__ = ["WriterLink"]

logger = logging.getLogger(__name__)

Outcome = JobDone | JobFailed | WriterDiedError


class WriterLink:
    """See the module docstring for the call order."""

    def __init__(self, *, node: str, rank: int) -> None:
        self._node = node
        self._rank = rank
        self._lock = threading.Lock()
        self._client: WriterClient | None = WriterClient.connect_or_start(node=node, rank=rank)

    @property
    def writer_pid(self) -> int | None:
        client = self._client
        return client.writer_pid if client is not None else None

    def submit(self, job: SaveJob, on_outcome: JobCallback) -> WriterClient:
        """Send ``job``; ``on_outcome`` runs on the client's reader thread with the report.
        Returns the client that took it (a streamed save sends its pieces there)."""
        with self._lock:
            for attempt in (1, 2):
                client = self._client
                if client is None or not client.alive:
                    if client is not None:
                        logger.warning(
                            "node writer (pid %d) is gone; starting a new one", client.writer_pid
                        )
                        client.close()
                        if client.wedged is not None:
                            client.retire()
                    self._client = client = WriterClient.connect_or_start(
                        node=self._node, rank=self._rank
                    )
                try:
                    client.submit(job, on_outcome)
                    return client
                except WriterDiedError:
                    if attempt == 2:
                        raise
        raise WriterDiedError(f"no node writer took the job for {job.ckpt_url}")  # not reached

    def run(self, job: SaveJob) -> JobDone:
        """Submit ``job`` and wait for its report; raise its error."""
        box: list[Outcome] = []
        done = threading.Event()

        def on_outcome(outcome: Outcome) -> None:
            box.append(outcome)
            done.set()

        self.submit(job, on_outcome)
        done.wait()
        outcome = box[0]
        if isinstance(outcome, JobDone):
            return outcome
        if isinstance(outcome, JobFailed):
            raise outcome.error.to_exception()
        raise outcome

    def release_arena(self, name: str) -> None:
        client = self._client
        if client is not None:
            client.release_arena(name)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
            if client.wedged is not None:
                client.retire()
