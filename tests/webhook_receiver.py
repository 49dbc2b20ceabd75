"""A small webhook receiver that checks signatures and records what it gets.

For the tests and benchmarks, and a reference for writing your own receiver: read the raw body,
call :func:`~streamfuse.alerts.signing.verify_signature`, answer 2xx quickly (the
dispatcher retries anything else), and drop repeats by ``X-Streamfuse-Notification-Id``
if a repeat would hurt.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

from streamfuse.alerts.errors import InvalidSignature
from streamfuse.alerts.signing import NOTIFICATION_HEADER, verify_signature


@dataclass
class Delivery:
    """One accepted request."""

    body: dict[str, Any]
    headers: dict[str, str]
    notification_id: str
    received_s: float
    signed: bool = False


@dataclass
class WebhookReceiver:
    """An HTTP receiver in a background thread.

    Args:
        secret: when set, requests without a valid signature are refused with 401.
        host, port: where to listen; port 0 takes a free one (kept across :meth:`stop`/:meth:`start`).
        path: the path to POST to.

    Set ``status`` to answer every request with that code instead (e.g. 503 to play a
    failing receiver); ``delay_s`` delays answers (a slow receiver).
    """

    secret: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    path: str = "/hook"
    status: int = 200
    delay_s: float = 0.0
    deliveries: list[Delivery] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _runner: web.AppRunner | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def start(self) -> "WebhookReceiver":
        """Listen (again); returns once the port accepts connections."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="webhook-receiver", daemon=True)
            self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        """Stop listening (connections are refused until :meth:`start`)."""
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
            self._runner = None

    def close(self) -> None:
        self.stop()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> "WebhookReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def alerts(self) -> list[tuple[str, str]]:
        """``(fingerprint, status)`` of every alert in every accepted body, in arrival order."""
        with self._lock:
            return [(a["fingerprint"], a["status"]) for d in self.deliveries for a in d.body.get("alerts", [])]

    def wait_for(self, predicate: Callable[["WebhookReceiver"], bool], timeout_s: float, what: str = "") -> None:
        """Return once ``predicate(self)`` holds.

        Raises:
            TimeoutError: not within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError(f"receiver: timed out after {timeout_s:.0f} s waiting for {what or predicate}")
            time.sleep(0.05)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            body = await request.read()
            if self.status != 200:
                return web.Response(status=self.status)
            hdrs = dict(request.headers)
            if self.secret is not None:
                try:
                    verify_signature(body, request.headers, self.secret)
                except InvalidSignature as exc:
                    with self._lock:
                        self.refused.append(exc.reason)
                    return web.json_response({"error": str(exc)}, status=401)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            with self._lock:
                self.deliveries.append(Delivery(json.loads(body), hdrs, hdrs.get(NOTIFICATION_HEADER, ""),
                                                time.time(), self.secret is not None))
            return web.Response(status=200)
        finally:
            self.in_flight -= 1
