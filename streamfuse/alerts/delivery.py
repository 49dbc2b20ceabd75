"""Delivery: one asyncio task per subscription drains that subscription's outbox, so a slow
or dead receiver holds up nobody else. Failed attempts are retried with exponential
backoff and jitter until ``give_up_s``; then the notifications go to the dead-letter topic.

Requests have a total timeout, never follow redirects (a redirect could lead to a refused
address) and never log response bodies; the target is re-validated before each attempt
and the HTTP connector refuses to connect to an address the rules forbid.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
from aiohttp.resolver import ThreadedResolver

from streamfuse.alerts.config import AlertSettings
from streamfuse.alerts.errors import DeliveryError, UnresolvableTarget, UnsafeTarget
from streamfuse.alerts.formats import alertmanager_alerts, webhook_body
from streamfuse.alerts.signing import NOTIFICATION_HEADER, signed_headers
from streamfuse.alerts.subscriptions import Subscription
from streamfuse.alerts.targets import check_address, validate_url
from streamfuse.clock import now_ms

log = logging.getLogger(__name__)
RETRYABLE_STATUS = frozenset({408, 425, 429})
USER_AGENT = "streamfuse-alerts/1"


def backoff_s(attempt: int, initial_s: float, cap_s: float, rand: float) -> float:
    """Delay before retry number ``attempt`` (1, 2, ...): ``initial_s`` doubling up to ``cap_s``,
    half of it fixed and half random ("equal jitter"), so that retries never synchronize but
    never come too early either. ``rand`` is a uniform draw in [0, 1).

    Examples:
        >>> [backoff_s(n, 0.5, 4.0, rand=0.0) for n in (1, 2, 3, 4, 5)]
        [0.25, 0.5, 1.0, 2.0, 2.0]
        >>> backoff_s(3, 0.5, 4.0, rand=0.999) <= 2.0
        True
    """
    base = min(cap_s, initial_s * 2 ** max(0, attempt - 1))
    return base / 2 + base / 2 * rand


class GuardedResolver(ThreadedResolver):
    """Resolves like aiohttp's threaded resolver, then drops every address the rules refuse
    (a host that passed validation cannot be re-pointed at a private address later)."""

    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self.allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        safe = []
        for info in await super().resolve(host, port, family):
            try:
                check_address(info["host"], host, self.allow_private)
            except UnsafeTarget:
                continue
            safe.append(info)
        if not safe:
            raise OSError(f"{host} resolves to no address receivers may use")
        return safe


class Senders:
    """Send one group of notifications to one subscription's receiver."""

    def __init__(self, settings: AlertSettings, session: aiohttp.ClientSession, aredis) -> None:
        self.settings = settings
        self.session = session
        self.aredis = aredis

    async def send(self, sub: Subscription, group_key: str, group_labels: dict[str, str],
                   notices: list[dict[str, Any]], notification_id: str) -> None:
        """Raises:
            DeliveryError: the attempt failed; ``retryable`` says whether to try again.
        """
        if sub.receiver == "redis":
            body = webhook_body(sub.id, group_key, group_labels, notices, self.settings.external_url)
            n = await self.aredis.publish(sub.url, json.dumps(body))
            if n == 0:
                raise DeliveryError(f"nobody listens on Redis channel {sub.url!r}")
            return
        await self._check(sub)
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, NOTIFICATION_HEADER: notification_id}
        if sub.receiver == "alertmanager":
            latest = {n["fingerprint"]: n for n in notices}  # Alertmanager only needs each alert's last state
            hold_ms = int(3 * self.settings.repeat_interval_s * 1000)
            payload: Any = alertmanager_alerts(latest.values(), now_ms(), hold_ms,
                                               self.settings.external_url)
            url = sub.url.rstrip("/") + "/api/v2/alerts"
        else:
            payload = webhook_body(sub.id, group_key, group_labels, notices, self.settings.external_url)
            url = sub.url
        body = json.dumps(payload, separators=(",", ":")).encode()
        if sub.secret:
            headers.update(signed_headers(body, sub.secret, int(time.time())))
        await self._post(sub, url, body, headers)

    async def _check(self, sub: Subscription) -> None:
        try:
            await asyncio.to_thread(validate_url, sub.url, self.settings.allow_private_targets)
        except UnresolvableTarget as exc:
            raise DeliveryError(str(exc)) from None  # DNS may come back
        except UnsafeTarget as exc:
            raise DeliveryError(str(exc), retryable=False) from None

    async def _post(self, sub: Subscription, url: str, body: bytes, headers: dict[str, str]) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout_s)
        try:
            async with self.session.post(url, data=body, headers=headers, timeout=timeout,
                                         allow_redirects=False) as resp:
                status = resp.status  # the body is not read: it is not ours to log
        except asyncio.TimeoutError:
            raise DeliveryError(f"no answer within {self.settings.request_timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise DeliveryError(f"request failed: {type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise DeliveryError(f"request failed: {exc}") from None
        if 200 <= status < 300:
            return
        retryable = status >= 500 or status in RETRYABLE_STATUS
        hint = " (redirects are not followed; subscribe the final URL)" if 300 <= status < 400 else ""
        raise DeliveryError(f"receiver answered HTTP {status}{hint}", retryable=retryable)
