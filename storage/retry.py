"""Bounded retries with capped exponential backoff and full jitter for transient errors.

The time budget (``CKPTSVC_RETRY_MAX_S``, 120 s) governs, not a count: one request keeps
retrying through an object-store outage of a minute or more (a restarted endpoint, a
failover), each delay at most ``CKPTSVC_RETRY_MAX_DELAY_S`` (5 s) so the request goes out
again soon after the store is back. ``CKPTSVC_RETRY_ATTEMPTS`` is only a backstop.

One policy, two drivers: :func:`call_with_retries` for blocking calls (any thread) and
:func:`acall_with_retries` for coroutines on a filesystem's event loop (parts of a
multipart upload, ranged GETs). Each retries *one request*; nothing here ever re-sends a
whole file or checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ckptsvc import knobs
from ckptsvc.errors import CheckpointError

from .errors import classify, is_transient

__all__ = ["RetryPolicy", "acall_with_retries", "call_with_retries"]

logger = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying one request. The time budget governs: retry while less than
    ``max_s`` seconds passed since the first try (and fewer than ``attempts`` tries, a
    backstop far above what the budget allows), sleeping ``uniform(0, min(max_delay_s,
    base_s * 2**(n-1)))`` after failure n (capped exponential backoff, full jitter), never
    past the budget. With the defaults (120 s, 5 s cap) a request rides out an outage of
    a minute and more; a permanent error (403, missing bucket) still fails on the first
    try. ``clock`` is injectable for tests (``time.monotonic``)."""

    attempts: int
    max_s: float
    base_s: float
    max_delay_s: float = 5.0
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def from_knobs(
        cls,
        *,
        attempts: int | None = None,
        max_s: float | None = None,
        base_s: float | None = None,
        max_delay_s: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> RetryPolicy:
        return cls(
            attempts=max(1, knobs.RETRY_ATTEMPTS.get(attempts)),
            max_s=max(0.0, knobs.RETRY_MAX_S.get(max_s)),
            base_s=max(0.0, knobs.RETRY_BASE_S.get(base_s)),
            max_delay_s=max(0.0, knobs.RETRY_MAX_DELAY_S.get(max_delay_s)),
            clock=clock or time.monotonic,
        )

    def delay_s(self, exc: BaseException, *, attempt: int, started_s: float) -> float | None:
        """Seconds to sleep before the next try, or ``None`` to give up (permanent error,
        time or attempts used up). ``started_s`` is ``clock()`` at the first try."""
        elapsed = self.clock() - started_s
        if not is_transient(exc) or attempt >= self.attempts or elapsed >= self.max_s:
            return None
        ceiling = min(self.max_delay_s, self.base_s * 2 ** min(attempt - 1, 64))
        return min(random.uniform(0, ceiling), max(0.0, self.max_s - elapsed))


def _log_retry(
    action: str, url: str, attempt: int, policy: RetryPolicy, e: BaseException, delay: float
) -> None:
    logger.warning(
        "%s %s failed (attempt %d/%d, %s: %s); retrying in %.2fs",
        action,
        url,
        attempt,
        policy.attempts,
        type(e).__name__,
        e,
        delay,
    )


def call_with_retries(
    fn: Callable[[], R],
    *,
    url: str,
    action: str,
    attempts: int | None = None,
    max_s: float | None = None,
    base_s: float | None = None,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> R:
    """Run ``fn`` and retry it while it fails transiently.

    Stops after ``max_s`` seconds (or ``attempts`` tries), whichever comes first; a
    permanent error (404, 403, bad input) is raised at once. Every failure leaves as a
    ``StorageError`` leaf naming ``url``. ``policy`` replaces the knobs and the three
    arguments before it; ``sleep`` is injectable for tests.
    """
    policy = policy or RetryPolicy.from_knobs(attempts=attempts, max_s=max_s, base_s=base_s)
    started = policy.clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except CheckpointError:
            raise  # already classified (or a format error): never retried, never re-wrapped
        except Exception as e:
            delay = policy.delay_s(e, attempt=attempt, started_s=started)
            if delay is None:
                raise classify(e, url, action) from e
            _log_retry(action, url, attempt, policy, e, delay)
            sleep(delay)


async def acall_with_retries(
    fn: Callable[[], Awaitable[R]],
    *,
    url: str,
    action: str,
    policy: RetryPolicy | None = None,
) -> R:
    """The coroutine twin of :func:`call_with_retries`: ``fn`` makes a fresh awaitable for
    each try; backoff sleeps yield the event loop. Cancellation is never retried."""
    policy = policy or RetryPolicy.from_knobs()
    started = policy.clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except CheckpointError:
            raise
        except Exception as e:  # asyncio.CancelledError is a BaseException: passes through
            delay = policy.delay_s(e, attempt=attempt, started_s=started)
            if delay is None:
                raise classify(e, url, action) from e
            _log_retry(action, url, attempt, policy, e, delay)
            await asyncio.sleep(delay)
