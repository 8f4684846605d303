"""Bounded retries with exponential backoff and full jitter for transient storage errors.

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
    """How long to keep trying one request: ``attempts`` tries or ``max_s`` seconds,
    whichever ends first, sleeping ``uniform(0, base_s * 2**(n-1))`` after failure n."""

    attempts: int
    max_s: float
    base_s: float

    @classmethod
    def from_knobs(
        cls,
        *,
        attempts: int | None = None,
        max_s: float | None = None,
        base_s: float | None = None,
    ) -> RetryPolicy:
        return cls(
            attempts=max(1, knobs.RETRY_ATTEMPTS.get(attempts)),
            max_s=knobs.RETRY_MAX_S.get(max_s),
            base_s=knobs.RETRY_BASE_S.get(base_s),
        )

    def delay_s(self, exc: BaseException, *, attempt: int, started_s: float) -> float | None:
        """Seconds to sleep before the next try, or ``None`` to give up (permanent error,
        attempts or time used up)."""
        elapsed = time.monotonic() - started_s
        if not is_transient(exc) or attempt >= self.attempts or elapsed >= self.max_s:
            return None
        return min(
            random.uniform(0, self.base_s * 2 ** (attempt - 1)), max(0.0, self.max_s - elapsed)
        )


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
) -> R:
    """Run ``fn`` and retry it while it fails transiently.

    Stops after ``attempts`` tries or ``max_s`` seconds, whichever comes first; a
    permanent error (404, 403, bad input) is raised at once. Every failure leaves as a
    ``StorageError`` leaf naming ``url``.
    """
    policy = RetryPolicy.from_knobs(attempts=attempts, max_s=max_s, base_s=base_s)
    started = time.monotonic()
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
            time.sleep(delay)


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
    started = time.monotonic()
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
