"""Intake: alert events from Kafka → lifecycle → one outbox entry per (subscription, notice).

Runs in one thread with a sync Redis client. Each batch of records is written to Redis
in one transaction (states, outbox entries, offsets taken in) *before* the consumer
commits its Kafka offsets; malformed records go to the dead-letter topic before that.

Through a Redis outage the thread waits: every Redis call goes through the process's
:class:`~streamfuse.redislink.RedisLink` (retried with backoff, logged once), so a batch
taken into the lifecycle is recorded once Redis is back, and no offset is committed
before that. The reads come first and the transaction is retried whole, so a retry
never observes an alert twice.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from streamfuse.alerts.lifecycle import AlertTracker, Notice, group_key, group_labels
from streamfuse.alerts.matchers import InhibitRule
from streamfuse.alerts.outbox import IntakeStore
from streamfuse.alerts.subscriptions import AlertKeys, SilenceStore, Subscription, SubscriptionStore
from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.errors import InvalidEvent
from streamfuse.events import Alert, DeadLetter, content_type_of, decode, encode, headers
from streamfuse.redislink import RedisLink
from streamfuse.topics import Topics

log = logging.getLogger(__name__)
STATUSES = ("firing", "resolved")


@dataclass(frozen=True)
class Record:
    """The part of a Kafka record that intake needs (kafka-python's ConsumerRecord fits)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


class Intake:
    """Turns alert events into queued notifications, durably and once.

    Args:
        settings: the effective settings (Redis prefix, alert settings).
        client: a sync Redis client.
        on_alert: called with each alert event's status (for metrics).
    """

    def __init__(self, settings: Settings, client, on_alert: Callable[[str], None] | None = None,
                 link: RedisLink | None = None, stop: threading.Event | None = None) -> None:
        a = settings.alerts
        self.link = link or RedisLink("alerts-dispatch")
        self.stop = stop  # set: a wait for Redis ends with RedisUnavailable
        self.settings = settings
        self.keys = AlertKeys(settings.redis_prefix)
        self.store = IntakeStore(client, self.keys)
        self.subscriptions = SubscriptionStore(client, settings.redis_prefix, a)
        self.silences = SilenceStore(client, settings.redis_prefix)
        self.rules = tuple(InhibitRule.from_config(r.source, r.target, r.equal) for r in a.inhibit_rules)
        self.on_alert = on_alert or (lambda status: None)
        self.reload()

    def reload(self) -> None:
        """Read alert states and offsets from Redis (at start, and when taking over partitions)."""
        states = self._redis(self.store.load_states, what="loading alert states")
        self.tracker = AlertTracker(states, int(self.settings.alerts.repeat_interval_s * 1000), self.rules)
        self.taken = self._redis(self.store.offsets, what="loading intake offsets")

    def _redis(self, fn, *args, what: str):
        return self.link.call(fn, *args, what=what, stop=self.stop)

    def forget_offset(self, topic: str, partition: int) -> None:
        """The group has no committed offset here (a new group, or a recreated topic): do not
        skip by the offsets remembered in Redis; the lifecycle still drops duplicates."""
        self.taken.pop(f"{topic}:{partition}", None)

    def process(self, records: Iterable[Record], now_ms: int,
                dead_letter: Callable[[list[DeadLetter]], None]) -> set[str]:
        """Take in one batch.

        Args:
            records: the batch, in partition order.
            now_ms: wall-clock time.
            dead_letter: sends and flushes rejected records; called before the Redis write.

        Returns:
            The subscriptions that got new notifications.

        Raises:
            RedisUnavailable: stopped while waiting for Redis; the caller must not commit offsets.
        """
        silences = self._redis(self.silences.list, now_ms, what="reading silences")
        offsets: dict[str, int] = {}
        counters = {"received": 0, "duplicates": 0, "muted": 0, "skipped": 0}
        notices: list[Notice] = []
        dead: list[DeadLetter] = []
        live: list[dict[str, Any]] = []
        for rec in records:
            tp = f"{rec.topic}:{rec.partition}"
            if rec.offset <= self.taken.get(tp, -1):
                counters["skipped"] += 1
                continue
            offsets[tp] = rec.offset
            try:
                alert = decode(rec.value, content_type_of(rec.headers), expect=Alert)
                if alert.status not in STATUSES:
                    raise InvalidEvent("bad_field", f"alert status {alert.status!r}; use firing or resolved")
            except InvalidEvent as exc:
                dead.append(DeadLetter(exc.reason, exc.detail, rec.topic, rec.value, "alerts-dispatch", now_ms,
                                       rec.partition, rec.offset, rec.key, content_type_of(rec.headers)))
                continue
            counters["received"] += 1
            self.on_alert(alert.status)
            dups, muted = self.tracker.duplicates, self.tracker.muted
            new = self.tracker.observe(alert, now_ms, silences)
            counters["duplicates"] += self.tracker.duplicates - dups
            counters["muted"] += self.tracker.muted - muted
            notices += new
            if self.tracker.duplicates == dups:
                st = self.tracker.states[alert.fingerprint]
                live.append({"type": "alert", "fingerprint": st.fingerprint, "status": st.status,
                             "labels": st.labels, "annotations": st.annotations, "starts_ms": st.starts_ms,
                             "ends_ms": st.ends_ms, "muted_by": st.muted_by, "notified": bool(new)})
        if dead:
            dead_letter(dead)
        return self._commit(notices, now_ms, offsets, counters, live)

    def tick(self, now_ms: int) -> set[str]:
        """Queue repeats and formerly muted firings that are now due (see :meth:`AlertTracker.tick`)."""
        notices = self.tracker.tick(now_ms, self._redis(self.silences.list, now_ms, what="reading silences"))
        return self._commit(notices, now_ms, {}, {}, [])

    def _commit(self, notices: list[Notice], now_ms: int, offsets: dict[str, int], counters: dict[str, int],
                live: list[dict[str, Any]]) -> set[str]:
        subs = self._redis(self.subscriptions.list, what="reading subscriptions") if notices else []
        entries = self._route(notices, subs, now_ms) if notices else []
        states = self.tracker.take_dirty()
        if not (states or entries or offsets or live or any(counters.values())):
            return set()
        counters = {**counters, "notifications": len(entries)}
        a = self.settings.alerts
        self._redis(self.store.commit, states, entries, offsets, counters, live, now_ms, int(a.group_wait_s * 1000),
                    int(a.group_interval_s * 1000), what="recording taken-in alerts")
        self.taken.update(offsets)
        return {sub for sub, _ in entries}

    def _route(self, notices: list[Notice], subs: list[Subscription], now_ms: int) -> list[tuple[str, dict]]:
        group_by = self.settings.alerts.group_by
        out: list[tuple[str, dict]] = []
        for n in notices:
            for sub in subs:
                if sub.accepts(n.labels):
                    out.append((sub.id, {"key": n.key, "group_key": group_key(n.labels, group_by),
                                         "group_labels": group_labels(n.labels, group_by), "created_ms": now_ms,
                                         "seq": len(out), "notice": n.to_dict()}))
        if out:
            log.info("queued %d notifications for %d alert changes", len(out), len(notices))
        return out


def consume(settings: Settings, intake: Intake, producer, stop: threading.Event, wake,
            ready: threading.Event | None) -> None:
    """The intake thread: poll, take in (Redis first), commit, tick; until ``stop`` is set.

    Args:
        wake: called with the subscription ids that got new notifications.
        ready: set once the consumer has partitions.
    """
    from kafka.errors import CommitFailedError

    from streamfuse.kafka import make_consumer

    topics = Topics(settings.topic_prefix)
    consumer = make_consumer(settings, settings.alerts.group, "streamfuse-alerts", max_poll_records=500)
    consumer.subscribe([topics.alerts])
    known: set = set()

    def dead_letter(items: list[DeadLetter]) -> None:
        for dl in items:
            producer.send(topics.deadletter, key=dl.key, value=encode(dl), headers=headers())
        producer.flush()

    try:
        last_tick = 0
        while not stop.is_set():
            batch = consumer.poll(timeout_ms=200)
            assigned = consumer.assignment()
            if assigned - known:  # taking over: another dispatcher may have moved on meanwhile
                intake.reload()
                for tp in assigned - known:
                    if consumer.committed(tp) is None:
                        intake.forget_offset(tp.topic, tp.partition)
            known = set(assigned)
            if ready is not None and assigned:
                ready.set()
            records = [Record(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers or []))
                       for recs in batch.values() for r in recs]
            now = now_ms()
            if records:
                woken = intake.process(records, now, dead_letter)
                try:
                    consumer.commit()  # after Redis holds the batch
                except CommitFailedError as exc:  # a rebalance: the next owner skips by Redis offsets
                    log.warning("offset commit failed (%s); Redis holds the progress", exc)
                wake(woken)
            if assigned and now - last_tick >= 1000:  # only the instance that owns the topic ticks
                wake(intake.tick(now))
                last_tick = now
    finally:
        consumer.close(autocommit=False)
