"""Subscriptions and silences, stored in Redis under ``Settings.redis_prefix``.

Keys (``P`` = the prefix, ``streamfuse:`` by default):

* ``P alerts:subscriptions`` — hash, subscription id → JSON; a signing secret only sealed
  with ``STREAMFUSE_ALERTS__SECRET_KEY`` (:mod:`streamfuse.alerts.sealing`); the
  dispatcher opens it to sign; it is never logged and never returned by the API;
* ``P alerts:silences`` — hash, silence id → JSON.

The dispatcher's own keys are listed in :mod:`streamfuse.alerts.outbox`.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from streamfuse.alerts.config import AlertSettings
from streamfuse.alerts.errors import InvalidSubscription, SubscriptionExists, UnknownSilence, UnknownSubscription
from streamfuse.alerts.matchers import Matcher, Silence, matches_all, parse_matchers, severity_rank
from streamfuse.alerts.sealing import SecretBox
from streamfuse.alerts.targets import redact, validate_url

RECEIVERS: tuple[str, ...] = ("webhook", "alertmanager", "redis")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CHANNEL = re.compile(r"[A-Za-z0-9_.:/-]{1,200}")


class AlertKeys:
    """Every Redis key of the alert subsystem, under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.subscriptions = f"{prefix}alerts:subscriptions"
        self.silences = f"{prefix}alerts:silences"
        self.state = f"{prefix}alerts:state"
        self.offsets = f"{prefix}alerts:offsets"
        self.stats = f"{prefix}alerts:stats"
        self.live = f"{prefix}alerts:live"

    def outbox(self, sub_id: str, group: str) -> str:
        return f"{self.prefix}alerts:outbox:{sub_id}:{group}"

    def due(self, sub_id: str) -> str:
        return f"{self.prefix}alerts:due:{sub_id}"

    def attempts(self, sub_id: str) -> str:
        return f"{self.prefix}alerts:attempts:{sub_id}"

    def last_sent(self, sub_id: str) -> str:
        return f"{self.prefix}alerts:last:{sub_id}"

    def sent(self, sub_id: str) -> str:
        return f"{self.prefix}alerts:sent:{sub_id}"

    def lock(self, sub_id: str, group: str) -> str:
        return f"{self.prefix}alerts:lock:{sub_id}:{group}"

    def per_subscription(self, sub_id: str) -> list[str]:
        return [self.due(sub_id), self.attempts(sub_id), self.last_sent(sub_id), self.sent(sub_id)]


@dataclass(frozen=True)
class Subscription:
    """Who gets which alerts, and how. ``url`` is a channel name for the ``redis`` receiver."""

    id: str
    receiver: str
    url: str
    matchers: tuple[Matcher, ...] = ()
    min_severity: str = "info"
    secret: str | None = field(default=None, repr=False)
    created_ms: int = 0

    def accepts(self, labels: Mapping[str, str]) -> bool:
        """True when the labels match every matcher and the severity is at least ``min_severity``.

        Examples:
            >>> s = Subscription("s1", "webhook", "https://x/", parse_matchers(["modality=~image|audio"]), "warning")
            >>> s.accepts({"modality": "audio", "severity": "critical"}), s.accepts({"modality": "audio",
            ...     "severity": "info"}), s.accepts({"modality": "series", "severity": "critical"})
            (True, False, False)
        """
        severity = labels.get("severity", "info")
        rank = severity_rank(severity) if severity in ("info", "warning", "critical") else 0
        return rank >= severity_rank(self.min_severity) and matches_all(self.matchers, labels)

    @property
    def shown_url(self) -> str:
        """The URL as shown to anyone: scheme, host and port (paths and queries often hold
        tokens); a ``redis`` channel name in full."""
        return self.url if self.receiver == "redis" else redact(self.url)

    def public(self) -> dict[str, Any]:
        """What the API and the CLI show: no secret, the URL redacted; ``url_sha256`` lets
        an operator check which URL a subscription has without revealing it."""
        return {"id": self.id, "receiver": self.receiver, "url": self.shown_url,
                "url_sha256": hashlib.sha256(self.url.encode()).hexdigest()[:16],
                "matchers": [str(m) for m in self.matchers], "min_severity": self.min_severity,
                "signed": self.secret is not None, "created_ms": self.created_ms}

    def describe(self) -> str:
        """A log-safe one-liner (the URL reduced to scheme, host and port)."""
        return f"{self.id} ({self.receiver} {self.shown_url})"

    def to_json(self, box: SecretBox) -> str:
        """The stored form: the secret sealed by ``box``, and with a key configured the URL
        too (webhook URLs often carry tokens); the shown URL beside it."""
        d = {"id": self.id, "receiver": self.receiver, "url": self.url, "matchers": [str(m) for m in self.matchers],
             "min_severity": self.min_severity, "created_ms": self.created_ms}
        if self.receiver != "redis" and box.enabled:
            d.update(url=self.shown_url, url_sealed=box.seal(self.url))
        if self.secret is not None:
            d["secret_sealed"] = box.seal(self.secret)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str | bytes, box: SecretBox) -> "Subscription":
        """Read the stored form; the secret is opened with ``box``.

        Raises:
            InvalidSubscription: a sealed secret that ``box`` cannot open.
        """
        d = json.loads(text)
        secret = box.open(d["secret_sealed"]) if d.get("secret_sealed") else d.get("secret")  # clear: legacy
        url = box.open(d["url_sealed"]) if d.get("url_sealed") else d["url"]
        return cls(d["id"], d["receiver"], url, parse_matchers(d["matchers"]), d["min_severity"],
                   secret, d.get("created_ms", 0))


def check_target(receiver: str, url: str, settings: AlertSettings, resolve=None) -> str:
    """Validate a receiver and its URL (or channel); return the normalized URL.

    Raises:
        InvalidSubscription: an unknown receiver or a bad channel name.
        UnsafeTarget: a refused URL (see :mod:`streamfuse.alerts.targets`).
    """
    if receiver not in RECEIVERS:
        raise InvalidSubscription(f"unknown receiver {receiver!r}; use one of {', '.join(RECEIVERS)}")
    if receiver == "redis":
        if not _CHANNEL.fullmatch(url):
            raise InvalidSubscription(f"redis channel {url!r} must be 1-200 of A-Z a-z 0-9 _ . : / -")
        if not url.startswith(settings.redis_channel_prefix):
            raise InvalidSubscription(
                f"redis channel {url!r} must start with {settings.redis_channel_prefix!r} (channels outside it "
                f"may be internal), e.g. {settings.redis_channel_prefix}ops, or set "
                "STREAMFUSE_ALERTS__REDIS_CHANNEL_PREFIX")
        return url
    kwargs = {} if resolve is None else {"resolve": resolve}
    return validate_url(url, settings.allow_private_targets, **kwargs)


class SubscriptionStore:
    """Create, read and delete subscriptions (sync Redis client)."""

    def __init__(self, client, prefix: str, settings: AlertSettings) -> None:
        self.r = client
        self.keys = AlertKeys(prefix)
        self.settings = settings
        self.box = SecretBox.from_settings(settings)

    def create(self, url: str, now_ms: int, receiver: str = "webhook", matchers: Iterable[str] = (),
               min_severity: str = "info", secret: str | None = None, sub_id: str | None = None,
               resolve=None, replace: bool = False) -> Subscription:
        """Validate and store a subscription. An existing id is a conflict unless ``replace``
        (the CLI's ``--replace``; the HTTP API never replaces).

        Raises:
            SubscriptionExists: the id is taken and ``replace`` is false.
            InvalidSubscription, InvalidMatcher, UnsafeTarget: what was wrong, and how to fix it.
        """
        sub_id = sub_id or secrets.token_hex(6)
        if not _ID.fullmatch(sub_id):
            raise InvalidSubscription(f"subscription id {sub_id!r} must be 1-64 of A-Z a-z 0-9 _ . - (not first)")
        severity_rank(min_severity)
        if secret is not None and not secret:
            raise InvalidSubscription("an empty secret signs nothing; leave --secret out or give a real one")
        sub = Subscription(sub_id, receiver, check_target(receiver, url, self.settings, resolve),
                           parse_matchers(matchers), min_severity, secret, now_ms)
        stored = sub.to_json(self.box)
        if replace:
            self.r.hset(self.keys.subscriptions, sub_id, stored)
        elif not self.r.hsetnx(self.keys.subscriptions, sub_id, stored):
            raise SubscriptionExists(sub_id)
        return sub

    def get(self, sub_id: str) -> Subscription:
        raw = self.r.hget(self.keys.subscriptions, sub_id)
        if raw is None:
            raise UnknownSubscription(sub_id)
        return Subscription.from_json(raw, self.box)

    def list(self) -> list[Subscription]:
        subs = [Subscription.from_json(v, self.box) for v in self.r.hgetall(self.keys.subscriptions).values()]
        return sorted(subs, key=lambda s: (s.created_ms, s.id))

    def delete(self, sub_id: str) -> None:
        """Remove a subscription and everything still queued for it.

        Raises:
            UnknownSubscription: no such id.
        """
        if not self.r.hexists(self.keys.subscriptions, sub_id):
            raise UnknownSubscription(sub_id)
        groups = [g.decode() for g in self.r.zrange(self.keys.due(sub_id), 0, -1)]
        self.r.delete(*[self.keys.outbox(sub_id, g) for g in groups], *self.keys.per_subscription(sub_id))
        self.r.hdel(self.keys.subscriptions, sub_id)


class SilenceStore:
    """Create, list and expire silences (sync Redis client)."""

    def __init__(self, client, prefix: str) -> None:
        self.r = client
        self.keys = AlertKeys(prefix)

    def create(self, matchers: Iterable[str], duration_s: float, now_ms: int, comment: str = "",
               created_by: str = "") -> Silence:
        """Mute alerts matching every matcher for ``duration_s`` from ``now_ms``.

        Raises:
            InvalidMatcher: a bad matcher. InvalidSubscription: no matcher (it would mute everything).
        """
        parsed = parse_matchers(matchers)
        if not parsed:
            raise InvalidSubscription("a silence needs at least one --match LABEL=VALUE (it would mute everything)")
        silence = Silence(secrets.token_hex(6), parsed, now_ms, now_ms + int(duration_s * 1000), comment, created_by)
        self.r.hset(self.keys.silences, silence.id, json.dumps(silence.to_dict()))
        return silence

    def list(self, now_ms: int, include_expired: bool = False) -> list[Silence]:
        """Silences still active (and pending), oldest first; long-expired ones are deleted."""
        out, stale = [], []
        for raw in self.r.hgetall(self.keys.silences).values():
            s = Silence.from_dict(json.loads(raw))
            if now_ms - s.ends_ms > 24 * 3600 * 1000:
                stale.append(s.id)
            elif include_expired or s.ends_ms > now_ms:
                out.append(s)
        if stale:
            self.r.hdel(self.keys.silences, *stale)
        return sorted(out, key=lambda s: (s.starts_ms, s.id))

    def expire(self, silence_id: str, now_ms: int) -> Silence:
        """End a silence now.

        Raises:
            UnknownSilence: no such id.
        """
        raw = self.r.hget(self.keys.silences, silence_id)
        if raw is None:
            raise UnknownSilence(silence_id)
        d = json.loads(raw)
        d["ends_ms"] = min(int(d["ends_ms"]), now_ms)
        self.r.hset(self.keys.silences, silence_id, json.dumps(d))
        return Silence.from_dict(d)
