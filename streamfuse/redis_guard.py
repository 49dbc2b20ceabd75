"""Calls to Redis that survive a Redis outage: retried with backoff, logged once per outage.

A process whose hot path does not need Redis (the inference worker serves its loaded
models) must not die when Redis does. :class:`RedisGuard` wraps each call: while Redis
answers, calls go through; when a call fails to connect, the outage starts — one warning,
the ``streamfuse_redis_up{process}`` gauge drops to 0, and further calls are skipped until
a backoff (doubling, capped) has passed; the first call that succeeds again ends the
outage with one more log line and the gauge back at 1. The caller keeps what it could not
write and tries again later (state catches up after Redis returns).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisGuard:
    """Args:
        what: names the process in the log lines (``"worker host-123"``).
        up: the ``streamfuse_redis_up`` gauge child of this process (``.set(0 | 1)``), or None.
        first_backoff_s: wait after the first failure before the next try; doubles per failure.
        max_backoff_s: the longest wait between tries.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, what: str, up: Any = None, first_backoff_s: float = 0.5, max_backoff_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.up = up
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self.down_since: float | None = None
        self.failures = 0  # calls that failed in the current outage
        self._backoff = first_backoff_s
        self._next_try = 0.0
        if up is not None:
            up.set(1)

    @property
    def reachable(self) -> bool:
        return self.down_since is None

    def ready(self) -> bool:
        """False while the backoff after a failed call has not passed (skip the call)."""
        return self.down_since is None or self.clock() >= self._next_try

    def call(self, fn: Callable[[], T]) -> tuple[bool, T | None]:
        """Run ``fn`` unless Redis is known down and the backoff has not passed.

        Returns:
            ``(True, result)``, or ``(False, None)`` when Redis was not reached (skipped or
            failed to connect); the caller keeps its work for a later try.

        Raises:
            Whatever ``fn`` raises other than a Redis connection or timeout error.
        """
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if not self.ready():
            return False, None
        try:
            result = fn()
        except (RedisConnectionError, RedisTimeoutError, ConnectionError) as exc:
            self._failed(exc)
            return False, None
        self._succeeded()
        return True, result

    def _failed(self, exc: BaseException) -> None:
        now = self.clock()
        self.failures += 1
        if self.down_since is None:
            self.down_since = now
            self._backoff = self.first_backoff_s
            if self.up is not None:
                self.up.set(0)
            log.warning("%s: Redis unreachable (%s); serving goes on, Redis writes are kept and retried "
                        "with backoff (up to %.0f s apart) until it returns", self.what, exc, self.max_backoff_s)
        else:
            self._backoff = min(self._backoff * 2, self.max_backoff_s)
        self._next_try = now + self._backoff

    def _succeeded(self) -> None:
        if self.down_since is None:
            return
        log.warning("%s: Redis reachable again after %.1f s (%d failed tries); catching up",
                    self.what, self.clock() - self.down_since, self.failures)
        self.down_since = None
        self.failures = 0
        if self.up is not None:
            self.up.set(1)
