"""``streamfuse alerts dispatch``: consume the alerts topic, notify every subscription.

Two halves share nothing but Redis: the intake thread (Kafka consumer in the group
``AlertSettings.group``; see :mod:`streamfuse.alerts.intake`) queues notifications and
commits offsets after Redis has them; the delivery loop (asyncio, one task per
subscription; see :mod:`streamfuse.alerts.delivery`) sends them and records each delivery
in Redis. A restart therefore neither loses nor repeats a notification; the one exception
is a crash between a receiver's reply and the Redis record (a single round trip), which
is why each request carries ``X-Streamfuse-Notification-Id``.

A Redis outage pauses both halves, it does not stop them: the intake waits to record its
batch (offsets stay uncommitted), each receiver's loop backs off and looks again, and a
delivery that succeeded is recorded once Redis is back (retried, never re-sent). One
:class:`~streamfuse.redislink.RedisLink` logs the outage once and drives
``streamfuse_redis_up{process="alerts-dispatch"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import threading
import uuid
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from streamfuse.alerts.delivery import GuardedResolver, Senders, backoff_s
from streamfuse.alerts.errors import DeliveryError
from streamfuse.alerts.intake import Intake, consume
from streamfuse.alerts.outbox import DeliveryStore, async_redis, delivery_stats
from streamfuse.alerts.sealing import SecretBox
from streamfuse.alerts.subscriptions import AlertKeys, Subscription
from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.events import DeadLetter, encode, headers
from streamfuse.metrics import AlertMetrics, ProducerMetrics, RedisMetrics
from streamfuse.redislink import RedisLink, redis_errors
from streamfuse.sends import TrackedProducer
from streamfuse.topics import Topics

log = logging.getLogger(__name__)



class ReceiverPool:
    """One delivery task per subscription; tasks follow the subscriptions in Redis."""

    def __init__(self, settings: Settings, producer, metrics: AlertMetrics, rng: random.Random,
                 link: RedisLink | None = None) -> None:
        self.settings = settings
        self.link = link or RedisLink("alerts-dispatch")
        self.outage = redis_errors()
        self.a = settings.alerts
        self.keys = AlertKeys(settings.redis_prefix)
        self.producer = producer
        self.metrics = metrics
        self.rng = rng
        self.subs: dict[str, Subscription] = {}
        self.box = SecretBox.from_settings(self.a)  # opens the subscriptions' sealed secrets
        self.wakers: dict[str, asyncio.Event] = {}
        self.stopping = asyncio.Event()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def wake(self, sub_ids) -> None:
        for s in sub_ids:
            if s in self.wakers:
                self.wakers[s].set()

    async def run(self, stop: threading.Event) -> None:
        self.aredis = async_redis(self.settings)
        self.store = DeliveryStore(self.aredis, self.keys)
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.a.allow_private_targets), limit=100)
        tasks: dict[str, asyncio.Task] = {}
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                self.senders = Senders(self.a, session, self.aredis)
                while not stop.is_set():
                    try:
                        raw = await self.aredis.hgetall(self.keys.subscriptions)
                        self.link.succeeded()
                        self.subs = {k.decode(): Subscription.from_json(v, self.box) for k, v in raw.items()}
                        await self._gauge()
                    except self.outage as exc:  # keep the subscriptions we know; look again soon
                        self.link.failed(exc, "reading subscriptions")
                    for sid, t in list(tasks.items()):
                        if t.done():
                            tasks.pop(sid)
                            if not t.cancelled() and t.exception() is not None:
                                raise t.exception()  # a Redis failure: stop loudly, a restart resumes
                    for sid in self.subs.keys() - tasks.keys():
                        self.wakers[sid] = asyncio.Event()
                        tasks[sid] = asyncio.create_task(self._drain(sid), name=f"receiver-{sid}")
                    for sid in tasks.keys() - self.subs.keys():
                        tasks.pop(sid).cancel()
                        self.wakers.pop(sid, None)
                    await asyncio.sleep(0.5)
                # Let sends in flight finish (bounded by the request timeout): cancelling one
                # after the receiver got it would repeat it after the restart.
                self.stopping.set()
                self.wake(list(self.wakers))
                if tasks:
                    await asyncio.wait(tasks.values(), timeout=self.a.request_timeout_s + 2)
        finally:
            for t in tasks.values():
                t.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            await self.aredis.aclose()

    async def _gauge(self) -> None:
        queued: dict[str, int] = {"webhook": 0, "alertmanager": 0, "redis": 0}
        for sid, sub in self.subs.items():
            queued[sub.receiver] = queued.get(sub.receiver, 0) + await self.store.pending(sid)
        for receiver, n in queued.items():
            self.metrics.queued.labels(receiver).set(n)

    async def _drain(self, sid: str) -> None:
        while not self.stopping.is_set():
            try:
                if not await self._drain_once(sid):
                    return  # unsubscribed meanwhile
            except self.outage as exc:  # nothing was sent on this turn: wait, then look again
                delay = self.link.failed(exc, f"delivering to subscription {sid}")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=delay)

    async def _drain_once(self, sid: str) -> bool:
        """Deliver the next due group of ``sid``, or wait a little for one; False when
        ``sid`` is no longer subscribed."""
        nxt = await self.store.next_group(sid)
        self.link.succeeded()  # Redis answered (a turn that only waited proves nothing)
        now = now_ms()
        if nxt is None or nxt[1] > now:
            wait_s = 1.0 if nxt is None else min(1.0, (nxt[1] - now) / 1000)
            await self._nap(sid, wait_s)  # woken early or not: look again
            return True
        sub = self.subs.get(sid)
        if sub is None:
            return False
        ttl_ms = int((self.a.request_timeout_s + 30) * 1000)
        if not await self.store.lock(sid, nxt[0], self.owner, ttl_ms):  # another dispatcher sends it
            await self._nap(sid, 0.5)
            return True
        try:
            await self._deliver(sub, nxt[0])
        finally:
            await self._recorded(self.store.unlock, sid, nxt[0], self.owner, what="unlocking a delivery")
        return True

    async def _nap(self, sid: str, wait_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wakers[sid].wait(), timeout=max(0.01, wait_s))
        self.wakers[sid].clear()

    async def _recorded(self, fn, *args, what: str):
        """A Redis write that must land after a send (retried through an outage, so that a
        delivered notification is never sent again)."""
        return await self.link.acall(fn, *args, what=what)

    async def _deliver(self, sub: Subscription, gid: str) -> None:
        entries = await self.store.entries(sub.id, gid)
        now = now_ms()
        if not entries:
            await self.store.finish(sub.id, gid, [], now, now, "sent")
            return
        first = next(iter(entries.values()))
        notices = [e["notice"] for e in entries.values()]
        keys = list(entries)
        attempts = await self.store.attempts(sub.id, gid)
        notification_id = f"{sub.id}/{gid}/{keys[0]}/{len(keys)}"
        try:
            await self.senders.send(sub, first["group_key"], first["group_labels"], notices, notification_id)
        except DeliveryError as exc:
            now = now_ms()
            attempts["n"] += 1
            attempts["first_ms"] = attempts["first_ms"] or now
            attempts["error"] = str(exc)
            # Give up on a notification once it has waited give_up_s (or at once when retrying is futile).
            limit = self.a.give_up_s * 1000
            dead = [k for k in keys if not exc.retryable or now - entries[k]["created_ms"] >= limit]
            if dead:
                await asyncio.to_thread(self._dead_letter, sub, {k: entries[k] for k in dead}, attempts, now)
                await self._recorded(self.store.finish, sub.id, gid, dead, now, now, "dead",
                                     what="recording dead notifications")
                self.metrics.notifications.labels(sub.receiver, "dead").inc(len(dead))
            if len(dead) < len(keys):
                delay = backoff_s(attempts["n"], self.a.backoff_initial_s, self.a.backoff_max_s, self.rng.random())
                self.metrics.notifications.labels(sub.receiver, "failed").inc(len(keys) - len(dead))
                log.warning("delivery to %s failed (attempt %d, retry in %.1f s): %s", sub.describe(),
                            attempts["n"], delay, exc)
                await self._recorded(self.store.retry_later, sub.id, gid, attempts, now + int(delay * 1000),
                                     what="scheduling a retry")
            return
        now = now_ms()
        await self._recorded(self.store.finish, sub.id, gid, keys, now, now + int(self.a.group_interval_s * 1000),
                             "sent", what="recording a delivery")
        self.metrics.notifications.labels(sub.receiver, "sent").inc(len(keys))
        for e in entries.values():
            self.metrics.delivery.labels(sub.receiver).observe(max(0.0, (now - e["created_ms"]) / 1000))
        log.info("delivered %d notifications to %s", len(keys), sub.describe())

    def _dead_letter(self, sub: Subscription, entries: dict[str, dict[str, Any]], attempts: dict[str, Any],
                     now: int) -> None:
        topic = Topics(self.settings.topic_prefix)
        waited = (now - (attempts["first_ms"] or now)) / 1000
        detail = (f"subscription {sub.describe()}: gave up after {attempts['n']} attempts in {waited:.0f} s; "
                  f"last error: {attempts.get('error', '')}")
        log.error("dead-lettering %d notifications: %s", len(entries), detail)
        for e in entries.values():
            dl = DeadLetter("undeliverable", detail, topic.alerts, json.dumps(e).encode(), "alerts-dispatch", now,
                            key=e["notice"]["fingerprint"].encode(), content_type="application/json")
            self.producer.send(topic.deadletter, key=dl.key, value=encode(dl), headers=headers())
        self.producer.flush()


def run_dispatcher(settings: Settings, stop: threading.Event | None = None, *,
                   registry: CollectorRegistry | None = None, ready: threading.Event | None = None,
                   seed: int | None = None) -> dict[str, Any]:
    """Run the dispatcher until ``stop`` is set (Ctrl-C / SIGTERM in the CLI).

    Args:
        settings: effective settings; ``settings.alerts`` holds the dispatcher's knobs.
        stop: set it to stop; in-flight requests finish first.
        registry: Prometheus registry for :class:`~streamfuse.metrics.AlertMetrics` (default: a new one).
        ready: set once the consumer has its partitions.
        seed: seed of the retry jitter.

    Returns:
        :func:`~streamfuse.alerts.outbox.delivery_stats` at exit.

    Raises:
        ConfigError: Redis does not answer. BrokerError / KafkaError: the broker is unreachable.
        redis.RedisError: a Redis error that is not an outage (outages are waited out).
    """
    from streamfuse.kafka import make_producer
    from streamfuse.metrics import serve
    from streamfuse.store import connect
    from streamfuse.topics import ensure_topics

    stop = stop or threading.Event()
    registry = registry or CollectorRegistry()
    metrics = AlertMetrics(registry)
    serve(registry, settings.alerts.metrics_port)
    ensure_topics(settings)
    link = RedisLink("alerts-dispatch", RedisMetrics(registry).up.labels("alerts-dispatch"))
    intake = Intake(settings, connect(settings), on_alert=lambda status: metrics.alerts.labels(status).inc(),
                    link=link, stop=stop)
    # dead letters only; a send the broker does not take is sent again, never dropped silently
    producer = TrackedProducer(make_producer(settings, "streamfuse-alerts"), "alerts-dispatch",
                               ProducerMetrics(registry).failures, max_attempts=None)
    failure: list[BaseException] = []
    log.info("alert dispatcher: group %s, topic %s", settings.alerts.group, Topics(settings.topic_prefix).alerts)
    try:
        asyncio.run(_dispatch(settings, intake, producer,
                              ReceiverPool(settings, producer, metrics, random.Random(seed), link),
                              stop, ready, failure))
    finally:
        producer.close()
    if failure:
        raise failure[0]
    return delivery_stats(settings)


async def _dispatch(settings: Settings, intake: Intake, producer: TrackedProducer, pool: ReceiverPool,
                    stop: threading.Event, ready: threading.Event | None, failure: list[BaseException]) -> None:
    """The intake (a consumer thread) feeds the receiver pool (this loop) until ``stop``; an
    intake failure stops both and is left in ``failure`` for the caller to raise."""
    loop = asyncio.get_running_loop()

    def wake(sub_ids) -> None:
        if sub_ids:
            loop.call_soon_threadsafe(pool.wake, set(sub_ids))

    def intake_thread() -> None:
        try:
            consume(settings, intake, producer, stop, wake, ready)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises
            failure.append(exc)
            stop.set()

    thread = threading.Thread(target=intake_thread, name="alerts-intake", daemon=True)
    thread.start()
    try:
        await pool.run(stop)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
