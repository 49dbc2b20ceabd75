"""Living with a Redis that comes and goes: retries with backoff, one log line per
outage, and the ``streamfuse_redis_up{process}`` gauge.

Redis holds shared state (status, claims, the registry's pointers, the alert outbox);
no process needs it to move data. So a Redis call that fails for want of Redis must
not kill a process. One :class:`RedisLink` per process tracks whether Redis answered
on its last try and offers three ways to call it:

- :meth:`RedisLink.call` retries until the call succeeds (or ``deadline_s`` passes,
  then :class:`~streamfuse.errors.RedisUnavailable`), sleeping with exponential
  backoff: for a thread that may wait (a status writer, an intake loop);
- :meth:`RedisLink.acall` does the same for ``redis.asyncio`` coroutines;
- :meth:`RedisLink.reach` tries once (not at all while an outage is known and the
  next retry is not due, so a hot path never waits on a dead Redis) and says whether
  Redis was reached; :meth:`RedisLink.attempt` returns a default instead: for callers
  that keep their work for later or have a fallback (the inference worker).

Only outage errors are retried (connection refused or reset, timeouts, a Redis still
loading its data); any other error (a bad command, a wrong type) is a bug and is
raised at once. The first failure of an outage is logged as a warning, the recovery
once more with its length; nothing in between.

:class:`StatusWriter` is the write-behind queue for state that only needs to arrive
eventually (status, audit, claims): callers never wait for Redis, writes are applied in
order by one thread, and those made during an outage land when Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any, Awaitable, Callable

from streamfuse.errors import RedisUnavailable

log = logging.getLogger(__name__)


def backoff_s(failures: int, initial_s: float = 0.1, max_s: float = 5.0, factor: float = 2.0) -> float:
    """Seconds to wait after ``failures`` consecutive failed tries (``failures >= 1``).

    Examples:
        >>> [backoff_s(n) for n in (1, 2, 3, 7, 8, 50)]
        [0.1, 0.2, 0.4, 5.0, 5.0, 5.0]
    """
    if failures < 1:
        return 0.0
    return min(max_s, initial_s * factor ** min(failures - 1, 64))


def redis_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "Redis is not reachable right now" (retried), for the
    sync and the asyncio client alike."""
    from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

    return (ConnectionError, TimeoutError, BusyLoadingError, OSError)


class RedisLink:
    """One process's view of Redis reachability.

    Args:
        process: the ``process`` label of the gauge, e.g. ``monitor``.
        up: the ``streamfuse_redis_up`` child for this process
            (``RedisMetrics(registry).up.labels(process)``), or None.
        initial_s, max_s: the backoff range (see :func:`backoff_s`).
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, process: str, up=None, *, initial_s: float = 0.1, max_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger = log) -> None:
        self.process = process
        self.up = up
        self.initial_s, self.max_s = initial_s, max_s
        self.clock = clock
        self.log = logger
        self.errors = redis_errors()
        self.down_since: float | None = None
        self.failures = 0  # consecutive failed tries in the current outage
        self.outages = 0  # outages seen since start (for tests and status)
        self._next_try = 0.0
        self._lock = threading.Lock()
        if up is not None:
            up.set(1)

    @property
    def is_up(self) -> bool:
        return self.down_since is None

    def succeeded(self) -> None:
        with self._lock:
            if self.down_since is not None:
                self.log.warning("%s: Redis reachable again after %.1f s (%d failed tries); catching up",
                                 self.process, self.clock() - self.down_since, self.failures)
            self.down_since, self.failures, self._next_try = None, 0, 0.0
        if self.up is not None:
            self.up.set(1)

    def failed(self, exc: BaseException, what: str) -> float:
        """Record a failed try; returns the seconds to wait before the next one."""
        with self._lock:
            now = self.clock()
            if self.down_since is None:
                self.down_since = now
                self.outages += 1
                self.log.warning("%s: Redis unreachable while %s (%s: %s); retrying with backoff up to %.0f s, "
                                 "logged again when it is back", self.process, what, type(exc).__name__, exc,
                                 self.max_s)
            self.failures += 1
            delay = backoff_s(self.failures, self.initial_s, self.max_s)
            self._next_try = now + delay
        if self.up is not None:
            self.up.set(0)
        return delay

    def call(self, fn: Callable[..., Any], *args: Any, what: str = "a Redis call", deadline_s: float | None = None,
             stop: threading.Event | None = None, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, retried through outages.

        Raises:
            RedisUnavailable: ``deadline_s`` passed, or ``stop`` was set, before a try succeeded.
        """
        end = None if deadline_s is None else self.clock() + deadline_s
        while True:
            try:
                result = fn(*args, **kwargs)
            except self.errors as exc:
                delay = self.failed(exc, what)
                if end is not None and self.clock() + delay > end:
                    raise RedisUnavailable(what, self.clock() - (self.down_since or self.clock())) from exc
                if stop is not None:
                    if stop.wait(delay):
                        raise RedisUnavailable(what, self.clock() - (self.down_since or self.clock())) from exc
                else:
                    time.sleep(delay)
                continue
            self.succeeded()
            return result

    async def acall(self, fn: Callable[..., Awaitable[Any]], *args: Any, what: str = "a Redis call",
                    deadline_s: float | None = None, **kwargs: Any) -> Any:
        """``await fn(*args, **kwargs)``, retried through outages (see :meth:`call`)."""
        end = None if deadline_s is None else self.clock() + deadline_s
        while True:
            try:
                result = await fn(*args, **kwargs)
            except self.errors as exc:
                delay = self.failed(exc, what)
                if end is not None and self.clock() + delay > end:
                    raise RedisUnavailable(what, self.clock() - (self.down_since or self.clock())) from exc
                await asyncio.sleep(delay)
                continue
            self.succeeded()
            return result

    def ready(self) -> bool:
        """False while a known outage's next retry is not due yet (skip the call)."""
        return self.down_since is None or self.clock() >= self._next_try

    def reach(self, fn: Callable[..., Any], *args: Any, what: str = "a Redis call",
              **kwargs: Any) -> tuple[bool, Any]:
        """One try of ``fn``: ``(True, result)``, or ``(False, None)`` when Redis was not
        reached (it failed, or a known outage's next retry is not due yet); the caller
        keeps its work for a later try."""
        if not self.ready():
            return False, None
        try:
            result = fn(*args, **kwargs)
        except self.errors as exc:
            self.failed(exc, what)
            return False, None
        self.succeeded()
        return True, result

    def attempt(self, fn: Callable[..., Any], *args: Any, what: str = "a Redis call", default: Any = None,
                **kwargs: Any) -> Any:
        """One try of ``fn`` (see :meth:`reach`); ``default`` when Redis was not reached."""
        reached, result = self.reach(fn, *args, what=what, **kwargs)
        return result if reached else default


class StatusWriter:
    """Write-behind queue for Redis writes that must land eventually, in order.

    ``submit`` never blocks on Redis; one daemon thread applies the writes, retrying
    each through an outage (:meth:`RedisLink.call`) before the next, so a claim is never
    written before the status it follows. Writes are idempotent (HSET, SET NX, XADD of
    audit entries), so one repeated after a reconnect does no harm.

    Args:
        link: the process's :class:`RedisLink`.
        name: thread name.
    """

    def __init__(self, link: RedisLink, name: str = "streamfuse-redis-writer") -> None:
        self.link = link
        self._queue: deque[tuple[str, Callable[..., Any], tuple, dict]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        with self._cond:
            self._queue.append((what, fn, args, kwargs))
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def flush(self, timeout_s: float) -> bool:
        """Wait until every write so far is applied; False at the deadline."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Apply what can be applied within ``timeout_s``, then stop the thread."""
        self.flush(timeout_s)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(1.0)
                if self._stop.is_set():
                    return
                what, fn, args, kwargs = self._queue.popleft()
                self._busy = True
            try:
                self.link.call(fn, *args, what=what, stop=self._stop, **kwargs)
            except RedisUnavailable:
                return  # stopping during an outage: the rest is lost with the process
            except Exception:  # a bug in one write must not stop the others
                log.exception("Redis write failed: %s", what)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
