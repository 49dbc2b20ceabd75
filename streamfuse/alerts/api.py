"""``streamfuse alerts serve``: the JSON API for subscriptions and silences, the alert state,
delivery counters, a server-sent-events stream for dashboards, and /openapi.json.

Store calls use the sync Redis client in worker threads (they are short; URL validation
resolves host names, which blocks). The live stream listens on the Redis channel the
dispatcher publishes lifecycle changes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from typing import Any

from aiohttp import web

from streamfuse.alerts.errors import AlertError, UnknownSilence, UnknownSubscription
from streamfuse.alerts.matchers import parse_duration
from streamfuse.alerts.openapi import SPEC
from streamfuse.alerts.subscriptions import AlertKeys, SilenceStore, SubscriptionStore
from streamfuse.config import Settings
from streamfuse.errors import StreamfuseError
from streamfuse.redislink import redis_errors

REDIS_OUTAGE = redis_errors()
log = logging.getLogger(__name__)
SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", object)
KEYS = web.AppKey("keys", AlertKeys)
TOKEN = web.AppKey("token", str)
SUBS = web.AppKey("subs", SubscriptionStore)
SILENCES = web.AppKey("silences", SilenceStore)
OPEN_PATHS = frozenset({"/healthz", "/openapi.json"})
KEEPALIVE_S = 15.0


def _now_ms() -> int:
    return int(time.time() * 1000)


def _error(status: int, exc: Exception | str) -> web.Response:
    kind = type(exc).__name__ if isinstance(exc, Exception) else "BadRequest"
    return web.json_response({"error": str(exc), "type": kind}, status=status)


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    token = request.app[TOKEN]
    if token and request.path not in OPEN_PATHS:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer <STREAMFUSE_ALERTS__API_TOKEN>)")
    try:
        return await handler(request)
    except (UnknownSubscription, UnknownSilence) as exc:
        return _error(404, exc)
    except AlertError as exc:
        return _error(400, exc)
    except StreamfuseError as exc:
        return _error(503, exc)
    except REDIS_OUTAGE as exc:  # the API keeps serving; this request can be retried
        resp = _error(503, f"Redis is unreachable ({type(exc).__name__}); retry shortly")
        resp.headers["Retry-After"] = "5"
        return resp


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text=json.dumps({"error": "the body is not JSON"}),
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "the body must be a JSON object"}),
                                 content_type="application/json")
    return body


def _list(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise web.HTTPBadRequest(text=json.dumps({"error": f"{name} must be a list of strings"}),
                                 content_type="application/json")
    return value


async def healthz(request: web.Request) -> web.Response:
    try:
        await asyncio.to_thread(request.app[REDIS].ping)
    except Exception as exc:  # any Redis client failure means "not healthy"; report it
        return _error(503, f"Redis does not answer: {type(exc).__name__}")
    return web.json_response({"status": "ok"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(SPEC)


async def list_subscriptions(request: web.Request) -> web.Response:
    subs = await asyncio.to_thread(request.app[SUBS].list)
    return web.json_response([s.public() for s in subs])


async def create_subscription(request: web.Request) -> web.Response:
    body = await _body(request)
    if not isinstance(body.get("url"), str):
        return _error(400, "url (a string) is required")
    secret = body.get("secret")
    sub = await asyncio.to_thread(
        request.app[SUBS].create, body["url"], _now_ms(), str(body.get("receiver", "webhook")),
        _list(body, "matchers"), str(body.get("min_severity", "info")), None if secret is None else str(secret),
        None if body.get("id") is None else str(body["id"]))
    log.info("subscription %s created via the API", sub.describe())
    return web.json_response(sub.public(), status=201)


async def get_subscription(request: web.Request) -> web.Response:
    sub = await asyncio.to_thread(request.app[SUBS].get, request.match_info["id"])
    return web.json_response(sub.public())


async def delete_subscription(request: web.Request) -> web.Response:
    await asyncio.to_thread(request.app[SUBS].delete, request.match_info["id"])
    return web.Response(status=204)


async def list_silences(request: web.Request) -> web.Response:
    silences = await asyncio.to_thread(request.app[SILENCES].list, _now_ms())
    return web.json_response([s.to_dict() for s in silences])


async def create_silence(request: web.Request) -> web.Response:
    body = await _body(request)
    if "duration_s" in body:
        duration = parse_duration(str(body["duration_s"]))
    else:
        duration = parse_duration(str(body.get("duration", "")))
    silence = await asyncio.to_thread(request.app[SILENCES].create, _list(body, "matchers"), duration, _now_ms(),
                                      str(body.get("comment", "")), str(body.get("created_by", "")))
    return web.json_response(silence.to_dict(), status=201)


async def expire_silence(request: web.Request) -> web.Response:
    silence = await asyncio.to_thread(request.app[SILENCES].expire, request.match_info["id"], _now_ms())
    return web.json_response(silence.to_dict())


def _firing(client, keys: AlertKeys) -> list[dict[str, Any]]:
    states = [json.loads(v) for v in client.hgetall(keys.state).values()]
    return sorted((s for s in states if s["status"] == "firing"), key=lambda s: (s["starts_ms"], s["fingerprint"]))


async def alerts(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(_firing, request.app[REDIS], request.app[KEYS]))


async def stats(request: web.Request) -> web.Response:
    from streamfuse.alerts.outbox import delivery_stats

    return web.json_response(await asyncio.to_thread(delivery_stats, request.app[SETTINGS]))


async def events(request: web.Request) -> web.StreamResponse:
    from streamfuse.alerts.outbox import async_redis

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    aredis = async_redis(request.app[SETTINGS])
    pubsub = aredis.pubsub()
    try:
        await pubsub.subscribe(request.app[KEYS].live)  # before the snapshot: nothing falls in between
        snapshot = await asyncio.to_thread(_firing, request.app[REDIS], request.app[KEYS])
        await resp.write(f"event: snapshot\ndata: {json.dumps(snapshot)}\n\n".encode())
        n = 0
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=KEEPALIVE_S)
            if msg is None:
                await resp.write(b": keep-alive\n\n")
                continue
            n += 1
            await resp.write(f"id: {n}\nevent: alert\ndata: {msg['data'].decode()}\n\n".encode())
    except (ConnectionResetError, ConnectionError):
        log.debug("event stream client went away")
    except REDIS_OUTAGE as exc:  # the client reconnects (EventSource does) and gets a new snapshot
        log.warning("event stream ended: Redis unreachable (%s)", exc)
    finally:
        with contextlib.suppress(*REDIS_OUTAGE):
            await pubsub.unsubscribe()
        await pubsub.aclose()
        await aredis.aclose()
    return resp


def make_app(settings: Settings) -> web.Application:
    """The aiohttp application (tests run it with ``aiohttp.web.AppRunner``)."""
    from streamfuse.store import connect

    app = web.Application(middlewares=[_errors])
    client = connect(settings)
    token = settings.alerts.api_token
    app[SETTINGS], app[REDIS], app[KEYS] = settings, client, AlertKeys(settings.redis_prefix)
    app[TOKEN] = token.get_secret_value() if token is not None else ""
    app[SUBS] = SubscriptionStore(client, settings.redis_prefix, settings.alerts)
    app[SILENCES] = SilenceStore(client, settings.redis_prefix)
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/openapi.json", openapi)
    r.add_get("/subscriptions", list_subscriptions)
    r.add_post("/subscriptions", create_subscription)
    r.add_get("/subscriptions/{id}", get_subscription)
    r.add_delete("/subscriptions/{id}", delete_subscription)
    r.add_get("/silences", list_silences)
    r.add_post("/silences", create_silence)
    r.add_delete("/silences/{id}", expire_silence)
    r.add_get("/alerts", alerts)
    r.add_get("/stats", stats)
    r.add_get("/events", events)
    return app


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Serve the API until interrupted."""
    host = host or settings.alerts.api_host
    port = settings.alerts.api_port if port is None else port
    log.info("alerts API on http://%s:%d (OpenAPI at /openapi.json)", host, port)
    web.run_app(make_app(settings), host=host, port=port, print=None, access_log=None)
