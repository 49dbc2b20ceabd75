"""The worker's sends: predictions, dead letters and acks through one librdkafka producer.

Nothing is dropped silently. librdkafka retries a send by itself until
``message.timeout.ms``; a send it still could not deliver comes back in the delivery
report, is counted (``streamfuse_worker_produce_failures_total{topic}``), logged, and sent
again after a backoff. A batch's offsets are committed only when every one of its sends
is acknowledged (at-least-once). A send the client refuses at once (too large, an unknown
topic) is counted and stops the worker with a :class:`~streamfuse.errors.BrokerError`.

Dead letters keep the original record, but at most :data:`DEADLETTER_COPY_BYTES` of it
when the record was over the size limit (its full size is in the detail), so that a
poison record of any size becomes one small dead letter instead of a second failure.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError, KafkaException

from streamfuse.errors import BrokerError, InvalidEvent
from streamfuse.events import MSGPACK, DeadLetter, content_type_of, headers
from streamfuse.inference.feeder import Record

log = logging.getLogger(__name__)
HDRS = headers(MSGPACK)
DEADLETTER_COPY_BYTES = 64 * 1024  # the copy kept of a record over the size limit
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 30.0  # backoff between rounds of sending failed records again


def dead_letter(msg: Record, exc: InvalidEvent, max_bytes: int, ts_ms: int, component: str = "worker") -> DeadLetter:
    """The dead letter of ``msg``: the whole record, or for one larger than ``max_bytes``
    its first :data:`DEADLETTER_COPY_BYTES` bytes, with its size in the detail.

    Examples:
        >>> rec = Record("sf.samples", 0, 7, b"k", b"x" * 100_000, None)
        >>> d = dead_letter(rec, InvalidEvent("oversize", "100000 bytes > limit 2048"), 2048, 0)
        >>> len(d.original), d.detail
        (65536, '100000 bytes > limit 2048; record of 100000 bytes, the first 65536 kept')
    """
    value, detail = msg.value or b"", exc.detail
    if len(value) > max_bytes and len(value) > DEADLETTER_COPY_BYTES:
        detail = f"{detail}; record of {len(value)} bytes, the first {DEADLETTER_COPY_BYTES} kept"
        value = value[:DEADLETTER_COPY_BYTES]
    return DeadLetter(exc.reason, detail, msg.topic, value, component, ts_ms, msg.partition, msg.offset, msg.key,
                      content_type_of(msg.headers), exc.modality)


class Delivery:
    """One batch's sends, until the broker has acknowledged them all."""

    def __init__(self) -> None:
        self.pending = 0
        self.failed: list[tuple[str, bytes | None, bytes, str]] = []  # (topic, key, value, error)
        self.fatal: KafkaException | None = None
        self.rounds = 0  # rounds of sending failed records again
        self.retry_at = 0.0
        self.handed_at = 0.0  # time.monotonic() when the batch's last send was handed to the producer
        self.acked_at = 0.0  # ... and when the broker acknowledged the last one outstanding

    def sent(self, n: int = 1) -> None:
        self.pending += n

    def report(self, err, msg) -> None:  # librdkafka's delivery callback (from Outbox.poll/flush)
        self.pending -= 1
        if not self.pending:
            self.acked_at = time.monotonic()
        if err is None:
            return
        if err.fatal():
            self.fatal = self.fatal or KafkaException(err)
        self.failed.append((msg.topic(), msg.key(), msg.value(), err.str()))


class Outbox:
    """The worker's producer (librdkafka): sends with the msgpack header, reporting each
    delivery to the batch it belongs to.

    Args:
        producer: a confluent-kafka producer.
        failures: ``streamfuse_worker_produce_failures_total`` (labelled by topic kind), or None.
        kinds: topic name -> its kind (the metric label), e.g. ``{"sf.predictions": "predictions"}``.
    """

    def __init__(self, producer, failures=None, kinds: dict[str, str] | None = None) -> None:
        self.producer = producer
        self.failures = failures
        self.kinds = kinds or {}

    def send(self, topic: str, key: bytes | None, value: bytes, delivery: Delivery | None = None) -> None:
        self.send_many(topic, [(key, value)], delivery)

    def send_many(self, topic: str, records: list[tuple[bytes | None, bytes]], delivery: Delivery | None = None) -> None:
        """Queue ``(key, value)`` records for ``topic`` (one C call each; the client batches them)."""
        report = delivery.report if delivery is not None else self._report
        produce = self.producer.produce
        for key, value in records:
            while True:
                try:
                    produce(topic, value=value, key=key, headers=HDRS, on_delivery=report)
                    break
                except BufferError:  # the local queue is full: let deliveries drain
                    self.producer.poll(0.05)
                except KafkaException as exc:
                    self._count(topic)
                    raise BrokerError(f"the producer refused a {len(value)}-byte record for {topic!r}: "
                                      f"{exc.args[0].str()}; check the topic exists and message.max.bytes") from None
            if delivery is not None:
                delivery.sent()

    def settled(self, delivery: Delivery) -> bool:
        """True once every send of ``delivery`` is acknowledged; sends that failed are
        counted and sent again (after a backoff); a fatal producer error raises."""
        if delivery.fatal is not None:
            raise BrokerError(f"the producer failed for good: {delivery.fatal}; restart the worker "
                              "(its batch is not committed and is re-read)")
        if delivery.pending or not delivery.failed:
            return delivery.pending == 0 and not delivery.failed
        now = time.monotonic()
        if delivery.retry_at == 0.0:  # a new round of failures: count and report them, then back off
            for topic, *_ in delivery.failed:
                self._count(topic)
            log.warning("%d sends not delivered (%s); sending them again in %.1f s, the batch stays uncommitted",
                        len(delivery.failed), delivery.failed[0][3], self._backoff(delivery))
            delivery.retry_at = now + self._backoff(delivery)
        if now < delivery.retry_at:
            return False
        failed, delivery.failed = delivery.failed, []
        delivery.rounds += 1
        delivery.retry_at = 0.0
        for topic, key, value, _ in failed:
            self.send_many(topic, [(key, value)], delivery)
        return False

    @staticmethod
    def _backoff(delivery: Delivery) -> float:
        return min(RETRY_FIRST_S * 2 ** delivery.rounds, RETRY_MAX_S)

    def _report(self, err, msg) -> None:
        """Delivery report of a send outside any batch (acks): counted and logged on failure."""
        if err is not None:
            self._count(msg.topic())
            log.warning("a record for %s was not delivered: %s", msg.topic(), err.str())

    def _count(self, topic: str) -> None:
        if self.failures is not None:
            self.failures.labels(self.kinds.get(topic, "other")).inc()

    def poll(self) -> None:
        self.producer.poll(0)

    def flush(self, timeout_s: float = 60.0) -> None:
        left = self.producer.flush(timeout_s)
        if left:
            raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT,
                                            f"{left} records still undelivered after {timeout_s:.0f} s"))
