"""The dispatcher's durable progress in Redis: alert states, intake offsets, per-subscription
outboxes, retry state, delivery records and counters.

Keys (``P`` = ``Settings.redis_prefix``; ``S`` a subscription id; ``G`` a group id, the first
12 hex digits of the SHA-1 of the group key):

* ``P alerts:state`` — hash, fingerprint → :class:`~streamfuse.alerts.lifecycle.AlertState` JSON;
* ``P alerts:offsets`` — hash, ``topic:partition`` → last offset taken in (a record at or
  below it is skipped, so a crash between this write and the Kafka commit repeats nothing);
* ``P alerts:outbox:S:G`` — hash, notification key → entry JSON, waiting for delivery;
* ``P alerts:due:S`` — sorted set, G scored by when to send it next (one per waiting group);
* ``P alerts:attempts:S`` — hash, G → failed attempts so far and the first failure's time;
* ``P alerts:last:S`` — hash, G → when it was last sent (for the group interval);
* ``P alerts:sent:S`` — sorted set, notification key scored by delivery time (30 days);
* ``P alerts:lock:S:G`` — the dispatcher instance sending G now (expires by itself);
* ``P alerts:stats`` — hash of counters (see :func:`delivery_stats`);
* ``P alerts:live`` — pub/sub channel of lifecycle changes, for ``/events``.

Intake writes states, outbox entries and offsets in one MULTI/EXEC; a delivery is recorded
(entries removed, keys marked sent, counters) by one Lua script, atomically.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from streamfuse.alerts.lifecycle import AlertState, group_due
from streamfuse.alerts.subscriptions import AlertKeys

SENT_RETENTION_MS = 30 * 24 * 3600 * 1000

# KEYS: outbox, due, sent, stats, attempts, last. ARGV: gid, now, next_ms, counter, sub_counter, keys...
_FINISH = """
local n = #ARGV - 5
for i = 6, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
  if ARGV[4] == 'sent' then redis.call('ZADD', KEYS[3], ARGV[2], ARGV[i]) end
end
redis.call('HINCRBY', KEYS[4], ARGV[4], n)
redis.call('HINCRBY', KEYS[4], ARGV[5], n)
if ARGV[4] == 'sent' and n > 0 then
  redis.call('HINCRBY', KEYS[4], 'requests', 1)
  redis.call('HSET', KEYS[6], ARGV[1], ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tonumber(ARGV[2]) - %d)
end
redis.call('HDEL', KEYS[5], ARGV[1])
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
return n
""" % SENT_RETENTION_MS


# KEYS: lock. ARGV: owner, ttl_ms. Take the lock, or extend it when we hold it.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def group_id(group_key: str) -> str:
    """Short, Redis-safe id of a group key.

    Examples:
        >>> group_id('{kind="degradation",modality="image"}')
        '1bbbbc3606d1'
    """
    return hashlib.sha1(group_key.encode()).hexdigest()[:12]


class IntakeStore:
    """The intake side (sync Redis client, one thread)."""

    def __init__(self, client, keys: AlertKeys) -> None:
        self.r = client
        self.keys = keys

    def load_states(self) -> dict[str, AlertState]:
        return {k.decode(): AlertState.from_dict(json.loads(v)) for k, v in self.r.hgetall(self.keys.state).items()}

    def offsets(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(self.keys.offsets).items()}

    def commit(self, states: dict[str, AlertState | None], entries: list[tuple[str, dict[str, Any]]],
               offsets: dict[str, int], counters: dict[str, int], live: Iterable[dict[str, Any]], now_ms: int,
               wait_ms: int, interval_ms: int) -> None:
        """Write one intake step atomically.

        Args:
            states: changed alert states (None = forget).
            entries: ``(subscription id, entry)`` with entry keys ``key``, ``group_key``, ...
            offsets: ``topic:partition`` → last offset taken in.
            counters: stats to add.
            live: lifecycle changes to publish for ``/events``.
        """
        groups = sorted({(sub, group_id(e["group_key"])) for sub, e in entries})
        pipe = self.r.pipeline(transaction=False)
        for sub, gid in groups:
            pipe.zscore(self.keys.due(sub), gid)
            pipe.hget(self.keys.last_sent(sub), gid)
        found = pipe.execute()
        pipe = self.r.pipeline(transaction=True)
        for i, (sub, gid) in enumerate(groups):
            pending, last = found[2 * i], found[2 * i + 1]
            due = group_due(now_ms, None if pending is None else int(pending), None if last is None else int(last),
                            wait_ms, interval_ms)
            pipe.zadd(self.keys.due(sub), {gid: due}, nx=True)
        for sub, e in entries:
            pipe.hset(self.keys.outbox(sub, group_id(e["group_key"])), e["key"], json.dumps(e))
        for fp, st in states.items():
            if st is None:
                pipe.hdel(self.keys.state, fp)
            else:
                pipe.hset(self.keys.state, fp, json.dumps(st.to_dict()))
        if offsets:
            pipe.hset(self.keys.offsets, mapping={k: str(v) for k, v in offsets.items()})
        for name, n in counters.items():
            if n:
                pipe.hincrby(self.keys.stats, name, n)
        for event in live:
            pipe.publish(self.keys.live, json.dumps(event))
        pipe.execute()


class DeliveryStore:
    """The delivery side (``redis.asyncio`` client, shared by every receiver task)."""

    def __init__(self, aclient, keys: AlertKeys) -> None:
        self.r = aclient
        self.keys = keys
        self._finish = aclient.register_script(_FINISH)
        self._acquire = aclient.register_script(_ACQUIRE)
        self._release = aclient.register_script(_RELEASE)

    async def lock(self, sub_id: str, gid: str, owner: str, ttl_ms: int) -> bool:
        """Take the delivery lock of one group, so that two dispatchers never send it both."""
        return bool(await self._acquire(keys=[self.keys.lock(sub_id, gid)], args=[owner, ttl_ms]))

    async def unlock(self, sub_id: str, gid: str, owner: str) -> None:
        await self._release(keys=[self.keys.lock(sub_id, gid)], args=[owner])

    async def next_group(self, sub_id: str) -> tuple[str, int] | None:
        """The group of ``sub_id`` due first, with its due time; None when nothing waits."""
        got = await self.r.zrange(self.keys.due(sub_id), 0, 0, withscores=True)
        return (got[0][0].decode(), int(got[0][1])) if got else None

    async def entries(self, sub_id: str, gid: str) -> dict[str, dict[str, Any]]:
        """The group's waiting entries, less any already delivered (those are dropped)."""
        raw = await self.r.hgetall(self.keys.outbox(sub_id, gid))
        entries = {k.decode(): json.loads(v) for k, v in raw.items()}
        if entries:
            keys = sorted(entries)
            scores = await self.r.zmscore(self.keys.sent(sub_id), keys)
            done = [k for k, s in zip(keys, scores) if s is not None]
            if done:
                await self.r.hdel(self.keys.outbox(sub_id, gid), *done)
                for k in done:
                    entries.pop(k)
        return dict(sorted(entries.items(), key=lambda kv: (kv[1]["created_ms"], kv[1].get("seq", 0), kv[0])))

    async def attempts(self, sub_id: str, gid: str) -> dict[str, Any]:
        raw = await self.r.hget(self.keys.attempts(sub_id), gid)
        return json.loads(raw) if raw else {"n": 0, "first_ms": None}

    async def retry_later(self, sub_id: str, gid: str, attempts: dict[str, Any], due_ms: int) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.keys.attempts(sub_id), gid, json.dumps(attempts))
        pipe.zadd(self.keys.due(sub_id), {gid: due_ms}, xx=True)
        pipe.hincrby(self.keys.stats, "failed_attempts", 1)
        await pipe.execute()

    async def finish(self, sub_id: str, gid: str, keys: list[str], now_ms: int, next_ms: int, outcome: str) -> int:
        """Record the group's ``keys`` as ``sent`` or ``dead``; leftovers are due at ``next_ms``."""
        k = self.keys
        return await self._finish(
            keys=[k.outbox(sub_id, gid), k.due(sub_id), k.sent(sub_id), k.stats, k.attempts(sub_id),
                  k.last_sent(sub_id)],
            args=[gid, now_ms, next_ms, outcome, f"{outcome}:sub:{sub_id}", *keys])

    async def pending(self, sub_id: str) -> int:
        gids = [g.decode() for g in await self.r.zrange(self.keys.due(sub_id), 0, -1)]
        return sum([await self.r.hlen(self.keys.outbox(sub_id, g)) for g in gids])


def async_redis(settings):
    """A ``redis.asyncio`` client with the same URL and password as :func:`streamfuse.store.connect`."""
    import redis.asyncio

    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    return redis.asyncio.Redis.from_url(settings.redis_url, password=password, socket_timeout=5)


def delivery_stats(settings) -> dict[str, Any]:
    """Delivery counters from Redis, for ``streamfuse status`` and the demo summary.

    Returns:
        ``received`` (alert events taken in), ``duplicates``, ``muted`` (silenced or inhibited),
        ``notifications`` (queued per subscription), ``sent`` (delivered), ``requests``
        (successful requests; a group is one request), ``failed_attempts``, ``dead``
        (dead-lettered), ``pending`` (waiting now), and ``by_subscription``:
        ``{id: {"sent": n, "dead": n, "pending": n}}``.
    """
    from streamfuse.store import connect

    r = connect(settings)
    keys = AlertKeys(settings.redis_prefix)
    raw = {k.decode(): int(v) for k, v in r.hgetall(keys.stats).items()}
    out: dict[str, Any] = {name: raw.get(name, 0) for name in (
        "received", "duplicates", "muted", "notifications", "sent", "requests", "failed_attempts", "dead")}
    by_sub: dict[str, dict[str, int]] = {}
    for sub in [s.decode() for s in r.hkeys(keys.subscriptions)]:
        gids = [g.decode() for g in r.zrange(keys.due(sub), 0, -1)]
        by_sub[sub] = {"sent": raw.get(f"sent:sub:{sub}", 0), "dead": raw.get(f"dead:sub:{sub}", 0),
                       "pending": sum(r.hlen(keys.outbox(sub, g)) for g in gids)}
    out["pending"] = sum(s["pending"] for s in by_sub.values())
    out["by_subscription"] = by_sub
    return out


def reset_progress(settings) -> int:
    """Forget alert states, queues, offsets and counters, keeping subscriptions and silences
    (for a run against a fresh broker, e.g. the demo). Returns the number of keys deleted."""
    from streamfuse.store import connect

    r = connect(settings)
    keys = AlertKeys(settings.redis_prefix)
    keep = {keys.subscriptions.encode(), keys.silences.encode()}
    doomed = [k for k in r.scan_iter(match=f"{settings.redis_prefix}alerts:*") if k not in keep]
    return r.delete(*doomed) if doomed else 0
