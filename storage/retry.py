"""Bounded retries with exponential backoff and full jitter for transient storage errors."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from ckptsvc import knobs
from ckptsvc.errors import CheckpointError

from .errors import classify, is_transient

__all__ = ["call_with_retries"]

logger = logging.getLogger(__name__)
R = TypeVar("R")


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
    attempts = knobs.RETRY_ATTEMPTS.get(attempts)
    max_s = knobs.RETRY_MAX_S.get(max_s)
    base_s = knobs.RETRY_BASE_S.get(base_s)
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except CheckpointError:
            raise  # already classified (or a format error): never retried, never re-wrapped
        except Exception as e:
            elapsed = time.monotonic() - start
            if not is_transient(e) or attempt == attempts or elapsed >= max_s:
                raise classify(e, url, action) from e
            delay = min(random.uniform(0, base_s * 2 ** (attempt - 1)), max(0.0, max_s - elapsed))
            logger.warning(
                "%s %s failed (attempt %d/%d, %s: %s); retrying in %.2fs",
                action,
                url,
                attempt,
                attempts,
                type(e).__name__,
                e,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover  (loop always returns or raises)
