"""Sends that are never lost silently.

A kafka-python ``producer.send`` only buffers a record. If the broker does not take it
before ``delivery_timeout_ms`` (a broker outage longer than that), the record fails
inside the producer and ``flush()`` still returns normally: unless someone looks at
the future, the record is gone without a trace. :class:`TrackedProducer` looks: it
wraps a producer with the same ``send`` / ``flush`` calls, collects every failed send
(from the future's errback, or a ``send`` that raised because the buffer or the
metadata wait timed out), sends it again, and counts what it gives up on:

- ``streamfuse_producer_send_failures_total{process, outcome="retried"}`` for each
  failed send that was sent again;
- ``outcome="lost"`` for each record given up after ``max_attempts`` (never, for a
  process that must not lose anything: ``max_attempts=None`` retries until delivered),
  or at once when the error is not retriable (a record too large for the broker).

A re-sent record keeps its key, value and headers, so its event id is unchanged and
the consumers' deduplication applies; it may arrive out of order (late).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from streamfuse.redislink import backoff_s

log = logging.getLogger(__name__)


class TrackedProducer:
    """A kafka-python producer whose failed sends are retried or counted and reported.

    Args:
        producer: a ``KafkaProducer``.
        process: the ``process`` label (``sim``, ``sync``, ...).
        failures: the ``streamfuse_producer_send_failures_total`` counter
            (``ProducerMetrics(registry).failures``), or None.
        max_attempts: sends per record before it counts as lost; None = until delivered.
    """

    def __init__(self, producer, process: str, failures=None, max_attempts: int | None = 5) -> None:
        self.producer = producer
        self.process = process
        self.failures = failures
        self.max_attempts = max_attempts
        self.retried = 0
        self.lost = 0
        self._failed: deque[tuple[str, dict[str, Any], int, BaseException]] = deque()
        self._lock = threading.Lock()

    def send(self, topic: str, **record: Any) -> None:
        """Send ``key=, value=, headers=`` to ``topic``; failures are collected, never raised."""
        self.retry_failed()
        self._send(topic, record, 1)

    def _send(self, topic: str, record: dict[str, Any], attempt: int) -> None:
        from kafka.errors import KafkaError

        try:
            fut = self.producer.send(topic, **record)
        except (KafkaError, BufferError) as exc:  # buffer full or no metadata within max_block_ms
            self._on_error(topic, record, attempt, exc)
            return
        if fut is not None:  # None: a stand-in producer that reports nothing
            fut.add_errback(lambda exc: self._on_error(topic, record, attempt, exc))

    def _on_error(self, topic: str, record: dict[str, Any], attempt: int, exc: BaseException) -> None:
        with self._lock:  # may run on the producer's I/O thread
            self._failed.append((topic, record, attempt, exc))

    @property
    def pending_failures(self) -> int:
        with self._lock:
            return len(self._failed)

    def retry_failed(self) -> int:
        """Send every failed record again (or count it lost); returns how many were re-sent."""
        with self._lock:
            failed, self._failed = list(self._failed), deque()
        resent = 0
        for topic, record, attempt, exc in failed:
            # a record the broker will never take (too large, a bad topic) is not retried
            final = getattr(exc, "retriable", True) is False
            if final or (self.max_attempts is not None and attempt >= self.max_attempts):
                self.lost += 1
                self._count("lost")
                log.error("%s: gave up a record for %s after %d attempts (%s: %s); counted in "
                          "streamfuse_producer_send_failures_total{outcome=\"lost\"}", self.process, topic, attempt,
                          type(exc).__name__, exc)
                continue
            if attempt == 1 or self.retried == 0:
                log.warning("%s: a send to %s failed (%s: %s); sending it again", self.process, topic,
                            type(exc).__name__, exc)
            self.retried += 1
            self._count("retried")
            self._send(topic, record, attempt + 1)
            resent += 1
        return resent

    def flush(self, stop: threading.Event | None = None) -> bool:
        """Flush, re-sending failures until none is left (delivered or counted lost).

        Returns:
            True when everything sent so far was delivered or given up; False when
            ``stop`` was set first (the remaining failures stay queued).
        """
        rounds = 0
        while True:
            self.producer.flush()
            if not self.pending_failures:
                return True
            if stop is not None and stop.is_set():
                return False
            rounds += 1
            if rounds > 1:  # the broker is still away: do not spin
                delay = backoff_s(rounds - 1, 0.5, 5.0)
                if stop is not None:
                    stop.wait(delay)
                else:
                    time.sleep(delay)
            self.retry_failed()

    def close(self) -> None:
        self.producer.close()

    def _count(self, outcome: str) -> None:
        if self.failures is not None:
            self.failures.labels(self.process, outcome).inc()
