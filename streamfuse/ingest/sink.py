"""The gateways' Kafka side: sensor events and dead letters, acknowledged one by one.

Every record is produced with a delivery callback (librdkafka, ``acks=all``); the
gateway learns through ``on_done(token)`` that Kafka holds the record, and only then
acknowledges the message on the plant side. A failed delivery is counted
(``streamfuse_ingest_delivery_failures_total``), logged, and the record is produced again
after a pause: the sink never drops a record it was given. While records wait, the plant
side is not acknowledged, so an MQTT broker keeps (and eventually stops sending) them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from streamfuse.config import Settings
from streamfuse.events import MSGPACK, DeadLetter, SensorEvent, encode, headers
from streamfuse.kafka import make_rd_producer
from streamfuse.metrics import IngestMetrics
from streamfuse.topics import Topics

log = logging.getLogger(__name__)
HDRS = headers(MSGPACK)
RETRY_PAUSE_S = 1.0


class KafkaSink:
    """Produce gateway outputs; call ``on_done(token)`` once each is acknowledged.

    Args:
        settings: bootstrap, security, topic prefix.
        metrics: the gateway's metrics (events and dead letters count when acknowledged).
        component: ``mqtt`` or ``opcua`` (the client id's suffix).
        on_done: called with the token of every record Kafka acknowledged, on the thread
            that calls :meth:`poll`.
        producer: a confluent-kafka ``Producer``; default one from :func:`make_rd_producer`.
    """

    def __init__(self, settings: Settings, metrics: IngestMetrics, component: str,
                 on_done: Callable[[Any], None] | None = None, producer=None) -> None:
        self.topics = Topics(settings.topic_prefix)
        self.metrics = metrics
        self.on_done = on_done or (lambda token: None)
        self.producer = producer or make_rd_producer(settings, f"streamfuse-ingest-{component}")
        self._retry: list[tuple[float, tuple]] = []  # (when, produce args) of failed deliveries
        self._lock = threading.Lock()
        self._pending = 0
        self.acked = 0
        self.failures = 0

    @property
    def pending(self) -> int:
        """Records produced and not yet acknowledged (retries included)."""
        return self._pending

    def event(self, ev: SensorEvent, token: Any, received: float) -> None:
        """Produce a sensor event (key = asset_id) to its modality's topic.
        ``received`` is the monotonic time the message arrived (for the ack lag)."""
        self._send((self.topics.sensor(ev.modality), encode(ev), ev.asset_id.encode(), ev.modality, token, received))

    def dead(self, d: DeadLetter, token: Any, received: float) -> None:
        """Produce a dead letter to the dead-letter topic."""
        self._send((self.topics.deadletter, encode(d), d.key, None, token, received), reason=d.reason)

    def _send(self, args: tuple, reason: str | None = None) -> None:
        with self._lock:
            self._pending += 1
            self.metrics.pending.set(self._pending)
        self._produce(args, reason)

    def _produce(self, args: tuple, reason: str | None) -> None:
        topic, value, key, modality, token, received = args

        def delivered(err, _msg) -> None:
            if err is not None:
                self.failures += 1
                self.metrics.delivery_failures.inc()
                log.warning("Kafka did not take a record for %s (%s); sending it again in %.0f s",
                            topic, err, RETRY_PAUSE_S)
                self._retry.append((time.monotonic() + RETRY_PAUSE_S, (args, reason)))
                return
            with self._lock:
                self._pending -= 1
                self.metrics.pending.set(self._pending)
            self.acked += 1
            self.metrics.ack_lag.observe(time.monotonic() - received)
            if modality is not None:
                self.metrics.event(modality)
            else:
                self.metrics.dead(reason or "")
            self.on_done(token)

        while True:
            try:
                self.producer.produce(topic, value, key, headers=HDRS, on_delivery=delivered)
                return
            except BufferError:  # librdkafka's queue is full: let deliveries drain it
                self.producer.poll(0.05)

    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve delivery callbacks (up to ``timeout_s`` waiting for one); resend due retries."""
        self.producer.poll(timeout_s)
        if self._retry:
            now = time.monotonic()
            due = [r for r in self._retry if r[0] <= now]
            self._retry = [r for r in self._retry if r[0] > now]
            for _, (args, reason) in due:
                self._produce(args, reason)

    def flush(self, timeout_s: float = 10.0) -> int:
        """Wait until everything is acknowledged or ``timeout_s`` passed; returns what is still pending."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            self.poll(min(0.1, max(0.0, deadline - time.monotonic())))
        return self._pending
