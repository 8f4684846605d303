"""Which checkpoints survive: the N best by an eval metric, and background retention.

:class:`BestCheckpoints` keeps Forgather's ``update_best_checkpoints`` semantics with two
fixes: the *worst* of the current best is the minimum when greater is better (Forgather
took the maximum, so a better checkpoint could be refused), and a metric value of ``0.0``
counts (Forgather's ``metrics.get(k) or ...`` dropped it).

:class:`Retention` deletes old checkpoints in one background thread, after each save
commits, so the training thread never waits on storage for it. Rules:

- ``save_total_limit`` counts complete checkpoints only (incomplete ones are saves in
  flight or debris for ``ckptsvc gc``);
- the newest complete checkpoint and every preserved (best) one are never deleted;
- a checkpoint whose save is in flight is never deleted, and a save to a path that is
  being deleted waits for that delete to finish first;
- a delete removes the manifest first (``retention.delete_checkpoint``), so a crash
  halfway leaves an incomplete directory, never a torn "complete" one.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from ckptsvc.errors import StorageError
from ckptsvc.ops.retention import delete_checkpoint, select_for_deletion
from ckptsvc.read.discovery import list_checkpoints
from ckptsvc.storage import Location

__all__ = ["BestCheckpoints", "Retention"]

logger = logging.getLogger(__name__)

_LOWER_IS_BETTER = ("loss", "eval_loss")


class BestCheckpoints:
    """The best ``preserve_n_best`` checkpoints as ``[(path, metric)]``, best first.

    Mutated by the training thread only; :meth:`paths` may be read from any thread.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[str, float]] = []
        self.best_checkpoint: str | None = None  # Forgather's deprecated single best
        self._lock = threading.Lock()

    def update(
        self,
        checkpoint_path: str,
        metrics: Mapping[str, float],
        metric_key: str,
        greater_is_better: bool | None,
        preserve_n_best: int,
    ) -> bool:
        """Add ``checkpoint_path`` if its metric ranks among the best; True if it does."""
        key = metric_key if metric_key in metrics else f"eval_{metric_key}"
        if key not in metrics:
            logger.warning(
                "metric %r not found in evaluation metrics; available: %s",
                metric_key,
                sorted(metrics),
            )
            return False
        value = float(metrics[key])
        if math.isnan(value):
            logger.warning("metric %r of %s is NaN; not a best checkpoint", key, checkpoint_path)
            return False
        if greater_is_better is None:
            greater_is_better = metric_key not in _LOWER_IS_BETTER
        if preserve_n_best <= 0:
            return False
        with self._lock:
            entries = [e for e in self.entries if e[0] != checkpoint_path]
            if len(entries) < preserve_n_best:
                is_best = True
            else:
                worst = (min if greater_is_better else max)(e[1] for e in entries)
                is_best = value > worst if greater_is_better else value < worst
            if not is_best:
                return False
            entries.append((checkpoint_path, value))
            entries.sort(key=lambda e: e[1], reverse=greater_is_better)
            self.entries = entries[:preserve_n_best]
        logger.info(
            "new best checkpoint %s (%s=%.6g); best: %s",
            checkpoint_path,
            key,
            value,
            ", ".join(f"{p} ({m:.6g})" for p, m in self.entries),
        )
        return True

    def paths(self) -> list[str]:
        """Every path to preserve (the N best and the deprecated single best)."""
        with self._lock:
            out = [p for p, _ in self.entries]
        if self.best_checkpoint and self.best_checkpoint not in out:
            out.append(self.best_checkpoint)
        return out

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "best_checkpoints": [[p, m] for p, m in self.entries],
                "best_checkpoint": self.best_checkpoint,
            }

    def restore(self, doc: Mapping[str, Any], *, exists: Callable[[str], bool]) -> None:
        """Adopt a saved list, dropping checkpoints that no longer exist."""
        raw = doc.get("best_checkpoints") or []
        kept = [(str(p), float(m)) for p, m in raw if exists(str(p))]
        if len(kept) < len(raw):
            logger.warning("dropped %d best checkpoints that no longer exist", len(raw) - len(kept))
        best = doc.get("best_checkpoint")
        with self._lock:
            self.entries = kept
            self.best_checkpoint = str(best) if best and exists(str(best)) else None

    def summary(self, metric_key: str = "loss") -> str:
        if not self.entries:
            return "No best checkpoints tracked"
        lines = [f"Best checkpoints (N={len(self.entries)}):"]
        lines += [f"  {p}: {metric_key}={m:.4f}" for p, m in self.entries]
        return "\n".join(lines)


class _Handle(Protocol):
    path: str

    def exception(self, timeout_s: float | None = None) -> BaseException | None: ...


class Retention:
    """Background retention for one model directory (see the module docstring).

    Call order: :meth:`begin_save` (training thread, before the save is submitted), then
    :meth:`after_save` with its handle; a waiter thread waits for the handle; if the save
    committed, the retention thread (one, so passes never overlap) deletes what the rules
    allow, calling ``on_deleted(url)`` after each (the tiered manager deletes the local
    copy there), and only then forgets the save as in flight. Commits that arrive while a
    pass is queued share it (the pass lists after them), so passes never pile up behind
    back-to-back saves: complete checkpoints never exceed ``keep`` + :meth:`in_flight`.
    :meth:`wait` joins the queued work and raises the first deletion error; :meth:`close`
    stops the thread.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        keep: int | None,
        preserved: Callable[[], Iterable[str]],
        storage_options: dict[str, Any] | None = None,
        on_deleted: Callable[[str], None] | None = None,
    ) -> None:
        self._root = Location.parse(model_dir, storage_options)
        self._on_deleted = on_deleted
        self._opts = dict(storage_options or {})
        self._keep = keep
        self._preserved = preserved
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._deleting: dict[str, threading.Event] = {}
        self._futures: list[Future[None]] = []
        self._waiters: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._committed: list[str] = []  # committed saves the next pass makes room for
        self._queued = False  # a pass is queued and has not started (it covers new commits)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptsvc-retention")

    def _url(self, path: str) -> str:
        return Location.parse(path, self._opts).url

    def begin_save(self, path: str) -> None:
        """Mark ``path`` in flight; wait first if retention is deleting it right now."""
        url = self._url(path)
        while True:
            with self._lock:
                event = self._deleting.get(url)
                if event is None:
                    self._in_flight[url] = self._in_flight.get(url, 0) + 1
                    return
            logger.info("waiting for the deletion of %s before saving there", url)
            event.wait()

    def cancel_save(self, path: str) -> None:
        """Undo :meth:`begin_save` for a save that was never submitted."""
        self._done(self._url(path))

    def _done(self, url: str) -> None:
        with self._lock:
            n = self._in_flight.get(url, 0) - 1
            if n > 0:
                self._in_flight[url] = n
            else:
                self._in_flight.pop(url, None)

    def after_save(self, handle: _Handle) -> None:
        """Run retention once ``handle`` commits (a waiter thread per save in flight, so a
        slow save never delays retention after a faster, later one)."""
        waiter = threading.Thread(
            target=self._await, args=(handle,), name="ckptsvc-retention-wait", daemon=True
        )
        with self._lock:
            self._waiters = [w for w in self._waiters if w.is_alive()] + [waiter]
        waiter.start()

    def in_flight(self) -> int:
        """Saves begun whose retention pass has not finished (a committed save counts
        until the pass that makes room for it is done): complete checkpoints never exceed
        ``keep`` plus this, apart from preserved ones."""
        with self._lock:
            return sum(self._in_flight.values())

    def _await(self, handle: _Handle) -> None:
        url = self._url(handle.path)
        error: BaseException | None = None
        try:
            error = handle.exception()
        finally:
            if error is not None or self._keep is None or self._keep <= 0:
                self._done(url)
        if error is not None or self._keep is None or self._keep <= 0:
            return
        with self._lock:
            self._committed.append(url)
            if self._queued:
                return  # the queued pass lists after this commit: it covers this save too
            self._queued = True
            self._futures = [f for f in self._futures if not f.done()]
            self._futures.append(self._pool.submit(self._run))

    def _run(self) -> None:
        with self._lock:
            batch, self._committed, self._queued = self._committed, [], False
        try:
            self._apply(batch)
        except Exception as e:
            logger.error("retention under %s failed: %s", self._root.url, e)
            self._errors.append(e)
        finally:
            for url in batch:
                self._done(url)

    def _apply(self, batch: list[str]) -> None:
        """One pass: list, delete the oldest beyond ``keep``; the saves of ``batch`` have
        committed (they are no longer writing, though still counted in flight)."""
        infos = list_checkpoints(self._root)
        preserved = list(self._preserved())
        for victim in select_for_deletion(infos, keep=int(self._keep or 0), preserved=preserved):
            with self._lock:
                if self._in_flight.get(victim.url, 0) > batch.count(victim.url):
                    logger.info("not deleting %s: a save to it is in flight", victim.url)
                    continue
                event = self._deleting[victim.url] = threading.Event()
            try:
                logger.info("retention: deleting %s (keeping %s)", victim.url, self._keep)
                delete_checkpoint(victim.location)
                if self._on_deleted is not None:
                    self._on_deleted(victim.url)
            finally:
                with self._lock:
                    self._deleting.pop(victim.url, None)
                event.set()

    def wait(self) -> None:
        """Wait for queued retention work; raise the first deletion error (once)."""
        with self._lock:
            waiters = list(self._waiters)
        for w in waiters:
            w.join()
        with self._lock:
            futures = list(self._futures)
        for f in futures:
            f.result()
        if self._errors:
            first, self._errors = self._errors[0], []
            raise StorageError(
                f"deleting old checkpoints failed: {first}",
                url=getattr(first, "url", None) or getattr(first, "filename", None),
                errno=getattr(first, "errno", None),
            ) from first

    def close(self) -> None:
        self._pool.shutdown(wait=True)
