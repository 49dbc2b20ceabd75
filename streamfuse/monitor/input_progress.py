"""How far the monitor has read its input partitions, against what they hold: the KPI
engine's ``input_behind`` (see :class:`~streamfuse.monitor.kpis.KpiEngine`).

A monitor catching up a backlog (restarted after a kill, or started after its inputs)
gets its partitions unevenly: faust may hand it a minute of predictions before that
minute's labels, or one predictions partition long before another. The label join would
then take the labels for late ones (measured in the kill-and-restart scenario: 280 labels
of each of two assets read after their windows had closed), and a partition not read yet
would find its windows closed (a redundant monitor that started behind the other
detected the same fault 10 s of plant time later, under another alert id). While a
predictions or labels partition still holds records the monitor has not read, its
watermark waits for the event times read from that partition.

Adapter side (it asks the faust consumer and Kafka): where the monitor stands in each
partition is the offset after the last record it handled, or, before its first one, the
group's committed offset, read once from Kafka when the monitor restores; what the
partition holds is the consumer's high watermark from its latest fetch.
"""

from __future__ import annotations

import logging
import time

from streamfuse.config import Settings
from streamfuse.kafka import make_consumer

log = logging.getLogger(__name__)
ASSIGNMENT_TTL_S = 1.0  # how long the input partitions assigned are taken as known
ANSWER_TTL_S = 0.02  # how long an answer stands (asked for every event: a few µs each time saved)


class InputProgress:
    """Per input partition ``(topic, partition)``: the next offset to read and the newest
    event time read."""

    def __init__(self, topics: tuple[str, ...]) -> None:
        self.topics = topics
        self.next: dict[tuple[str, int], int] = {}
        self.newest: dict[tuple[str, int], int] = {}
        self._tps: list = []
        self._tps_at = float("-inf")
        self._answer: int | None = None
        self._answer_at = float("-inf")

    def started(self, committed: dict[tuple[str, int], int]) -> None:
        """Where the monitor starts in each partition (the group's committed offsets)."""
        for tp, offset in committed.items():
            self.next.setdefault(tp, offset)

    def read(self, topic: str, partition: int, offset: int, ts_ms: int | None = None) -> None:
        """The record at ``offset`` was handled (``ts_ms`` None: dead-lettered, no time)."""
        tp = (topic, partition)
        self.next[tp] = offset + 1
        if ts_ms is not None:
            self.newest[tp] = max(self.newest.get(tp, ts_ms), ts_ms)

    def behind(self, consumer) -> int | None:
        """The newest event time read from the partitions the monitor has not read to
        their end (0 where none was read yet), or None when it has read them all."""
        now = time.monotonic()
        if now - self._answer_at <= ANSWER_TTL_S:
            return self._answer
        if now - self._tps_at > ASSIGNMENT_TTL_S:
            self._tps = [tp for tp in consumer.assignment() if tp.topic in self.topics]
            self._tps_at = now
        reached = None
        for tp in self._tps:
            try:
                end = consumer.highwater(tp)
            except (KeyError, AssertionError):  # revoked since the assignment was read
                continue
            start = self.next.get((tp.topic, tp.partition))
            if end is None or start is None or end <= start:
                continue
            t = self.newest.get((tp.topic, tp.partition), 0)
            reached = t if reached is None else min(reached, t)
        self._answer, self._answer_at = reached, now
        return reached


def committed_offsets(settings: Settings, group: str, topics: tuple[str, ...]) -> dict[tuple[str, int], int]:
    """The consumer group's committed offset in each partition of ``topics`` (0 where it
    has none: faust starts from the earliest); empty when Kafka cannot tell (logged)."""
    from kafka import TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = make_consumer(settings, group, client_id=f"{group}-input-progress")
        try:
            return {(t, p): consumer.committed(TopicPartition(t, p)) or 0
                    for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())}
        finally:
            consumer.close()
    except (KafkaError, OSError) as exc:
        log.warning("could not read the committed offsets of %s (%s): records a backlog holds may count as late",
                    ", ".join(topics), exc)
        return {}
