"""Shared state in Redis: latest KPIs, open alerts, the command audit trail, readiness.

Every key starts with ``Settings.redis_prefix`` so that tests and replays can run
beside live traffic in the same Redis.
"""

from __future__ import annotations

import json
from typing import Any

from streamfuse.config import Settings, redact_secrets
from streamfuse.errors import ConfigError
from streamfuse.events import Ack, Alert, Command, KpiSnapshot, to_map
from streamfuse.redislink import RedisLink, StatusWriter, backoff_s, redis_errors

__all__ = ["RedisLink", "StatusStore", "StatusWriter", "backoff_s", "connect", "redis_errors"]


def connect(settings: Settings, *, check: bool = True, timeout_s: float = 5.0):
    """A Redis client; raises ConfigError with the fix when Redis does not answer.

    Args:
        check: ping now; a process that must start during a Redis outage passes False
            and goes through a :class:`RedisLink`.
        timeout_s: socket connect and read timeout.
    """
    import redis

    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    client = redis.Redis.from_url(settings.redis_url, password=password, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s)
    if not check:
        return client
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ConfigError(
            f"Redis at {redact_secrets(settings.redis_url)} does not answer ({exc}); start it with "
            "`redis-server --daemonize yes --port 6379 --save \"\"` or set STREAMFUSE_REDIS_URL"
        ) from None
    return client


class StatusStore:
    """Read and write the monitor's shared state."""

    def __init__(self, client, prefix: str) -> None:
        self.r = client
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def put_kpis(self, snaps: list[KpiSnapshot]) -> None:
        if not snaps:
            return
        pipe = self.r.pipeline(transaction=False)
        for s in snaps:
            if s.scope != "asset":  # per-asset snapshots are on the topic; keep Redis small
                pipe.hset(self.key("kpi:latest"), f"{s.scope}|{s.scope_id}|{s.modality}", json.dumps(to_map(s)))
        pipe.execute()

    def put_alert(self, alert: Alert) -> None:
        pipe = self.r.pipeline(transaction=False)
        if alert.status == "firing":
            pipe.hset(self.key("alerts:open"), alert.fingerprint, json.dumps(to_map(alert)))
        else:
            pipe.hdel(self.key("alerts:open"), alert.fingerprint)
        pipe.xadd(self.key("audit"), {"type": "alert", "id": alert.alert_id, "status": alert.status,
                                      "body": json.dumps(to_map(alert))}, maxlen=100_000, approximate=True)
        pipe.execute()

    def put_command(self, cmd: Command) -> None:
        self.r.xadd(self.key("audit"), {"type": "command", "id": cmd.command_id, "alert_id": cmd.alert_id or "",
                                        "body": json.dumps(to_map(cmd))}, maxlen=100_000, approximate=True)

    def put_ack(self, ack: Ack) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.key("workers"), ack.worker_id, json.dumps(to_map(ack)))
        pipe.xadd(self.key("audit"), {"type": "ack", "id": ack.command_id, "worker": ack.worker_id,
                                      "status": ack.status}, maxlen=100_000, approximate=True)
        pipe.execute()

    def lease(self, kind: str, ident: str, owner: str, ttl_ms: int) -> str:
        """Take the right to publish ``(kind, ident)`` for ``ttl_ms`` (SET NX with a TTL on
        its claim): ``"taken"`` (``owner`` holds it now), ``"done"`` (published before) or
        ``"held"`` (another owner is publishing it: ask again; its lease lapses if it died)."""
        key, mine = self.key(f"claimed:{kind}:{ident}"), f"lease:{owner}"
        for _ in range(3):  # the key can lapse between the SET and the GET
            if self.r.set(key, mine, nx=True, px=ttl_ms):
                return "taken"
            held = self.r.get(key)
            if held is not None:
                held = held.decode() if isinstance(held, bytes) else str(held)
                return "taken" if held == mine else "held" if held.startswith("lease:") else "done"
        return "held"

    def claim(self, kind: str, ident: str, ttl_s: int = 7 * 24 * 3600) -> None:
        """Record that ``(kind, ident)`` was published (after the broker acknowledged it),
        in place of the publisher's lease: a monitor that derives it again (restarted, or a
        redundant one) finds it done (:meth:`lease`) and does not publish it twice."""
        self.r.set(self.key(f"claimed:{kind}:{ident}"), "1", ex=ttl_s)

    def mark_ready(self, component: str, ident: str, ttl_s: int = 3600) -> None:
        self.r.set(self.key(f"ready:{component}:{ident}"), "1", ex=ttl_s)

    def ready(self, component: str) -> list[str]:
        pattern = self.key(f"ready:{component}:*")
        return sorted(k.decode().rsplit(":", 1)[-1] for k in self.r.scan_iter(match=pattern))

    def status(self) -> dict[str, Any]:
        def load(h: dict) -> dict[str, Any]:
            return {k.decode(): json.loads(v) for k, v in sorted(h.items())}

        audit = self.r.xrevrange(self.key("audit"), count=20)
        return {
            "kpis": load(self.r.hgetall(self.key("kpi:latest"))),
            "open_alerts": load(self.r.hgetall(self.key("alerts:open"))),
            "workers": load(self.r.hgetall(self.key("workers"))),
            "recent_audit": [{k.decode(): v.decode() for k, v in fields.items() if k != b"body"}
                             for _, fields in audit],
        }

    def clear(self, keep: tuple[str, ...] = ()) -> int:
        """Delete every key under the prefix except ``keep`` (names after the prefix)."""
        kept = {self.key(k).encode() for k in keep}
        keys = [k for k in self.r.scan_iter(match=f"{self.prefix}*") if k not in kept]
        return self.r.delete(*keys) if keys else 0
