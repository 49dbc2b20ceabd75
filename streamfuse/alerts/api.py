"""``streamfuse alerts serve``: the JSON API for subscriptions and silences, the alert state,
delivery counters, a server-sent-events stream for dashboards, and /openapi.json.

Closed by default: off a loopback address the API does not start without a bearer token
(``STREAMFUSE_ALERTS__API_TOKEN``) or client-certificate TLS (``__API_TLS_*``); with a
token, every path but /healthz and /openapi.json needs it (401 without). Without a token
(loopback only) requests must name a loopback host, so a web page cannot reach the API by
DNS rebinding. Bodies must be ``application/json`` (415 otherwise): browsers send forms
and ``text/plain`` cross-origin without asking, JSON they do not. Re-posting an existing
subscription id is a conflict (409), not a takeover. Webhook URLs are shown redacted.

Store calls use the sync Redis client in worker threads (they are short; URL validation
resolves host names, which blocks). The live stream listens on the Redis channel the
dispatcher publishes lifecycle changes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import ssl
from typing import Any

from aiohttp import web

from streamfuse.alerts.errors import AlertError, SubscriptionExists, UnknownSilence, UnknownSubscription
from streamfuse.alerts.matchers import parse_duration
from streamfuse.alerts.openapi import SPEC
from streamfuse.alerts.subscriptions import AlertKeys, SilenceStore, SubscriptionStore
from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.errors import ConfigError, StreamfuseError
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
JSON_TYPE = "application/json"
KEEPALIVE_S = 15.0



def _error(status: int, exc: Exception | str) -> web.Response:
    kind = type(exc).__name__ if isinstance(exc, Exception) else "BadRequest"
    return web.json_response({"error": str(exc), "type": kind}, status=status)


def is_loopback(host: str) -> bool:
    """True for a loopback address or ``localhost`` (what a browser on another host cannot reach).

    Examples:
        >>> [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "", "10.0.0.5", "api.local")]
        [True, True, True, False, False, False, False]
    """
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refusal(request: web.Request) -> web.Response | None:
    """401 / 403 / 415 for a request the API must not serve, else None."""
    token = request.app[TOKEN]
    if request.path in OPEN_PATHS:
        return None
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer <STREAMFUSE_ALERTS__API_TOKEN>)")
    elif not is_loopback(request.url.host or ""):
        return _error(403, "without STREAMFUSE_ALERTS__API_TOKEN the API answers only requests to a loopback host "
                           "name (localhost, 127.0.0.1, [::1])")
    if request.method in ("POST", "PUT", "PATCH") and request.content_type != JSON_TYPE:
        return _error(415, f"the body must be {JSON_TYPE} (Content-Type: {JSON_TYPE}), not "
                           f"{request.content_type or 'missing'}")
    return None


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    refused = _refusal(request)
    if refused is not None:
        return refused
    try:
        return await handler(request)
    except (UnknownSubscription, UnknownSilence) as exc:
        return _error(404, exc)
    except SubscriptionExists as exc:
        return _error(409, exc)
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
        request.app[SUBS].create, body["url"], now_ms(), str(body.get("receiver", "webhook")),
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
    silences = await asyncio.to_thread(request.app[SILENCES].list, now_ms())
    return web.json_response([s.to_dict() for s in silences])


async def create_silence(request: web.Request) -> web.Response:
    body = await _body(request)
    if "duration_s" in body:
        duration = parse_duration(str(body["duration_s"]))
    else:
        duration = parse_duration(str(body.get("duration", "")))
    silence = await asyncio.to_thread(request.app[SILENCES].create, _list(body, "matchers"), duration, now_ms(),
                                      str(body.get("comment", "")), str(body.get("created_by", "")))
    return web.json_response(silence.to_dict(), status=201)


async def expire_silence(request: web.Request) -> web.Response:
    silence = await asyncio.to_thread(request.app[SILENCES].expire, request.match_info["id"], now_ms())
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


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context: None without a certificate; with a client CA, clients must
    present a certificate that chains to it (mTLS).

    Raises:
        ConfigError: only one of certificate and key is set, or a file does not load.
    """
    a = settings.alerts
    if a.api_tls_certfile is None and a.api_tls_keyfile is None:
        if a.api_tls_client_cafile is not None:
            raise ConfigError("STREAMFUSE_ALERTS__API_TLS_CLIENT_CAFILE needs the server's own "
                              "STREAMFUSE_ALERTS__API_TLS_CERTFILE and __API_TLS_KEYFILE")
        return None
    if a.api_tls_certfile is None or a.api_tls_keyfile is None:
        raise ConfigError("set both STREAMFUSE_ALERTS__API_TLS_CERTFILE and STREAMFUSE_ALERTS__API_TLS_KEYFILE")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(a.api_tls_certfile, a.api_tls_keyfile)
        if a.api_tls_client_cafile is not None:
            ctx.load_verify_locations(a.api_tls_client_cafile)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"the alerts API's TLS files do not load ({exc}); check STREAMFUSE_ALERTS__API_TLS_*") \
            from None
    return ctx


def check_exposure(settings: Settings, host: str) -> None:
    """Refuse to listen off loopback without a token or client-certificate TLS.

    Raises:
        ConfigError: ``host`` is not a loopback address and the API would be open.
    """
    a = settings.alerts
    token = a.api_token.get_secret_value() if a.api_token is not None else ""
    if is_loopback(host) or token or a.api_tls_client_cafile is not None:
        return
    raise ConfigError(f"refusing to serve the alerts API on {host!r} without authentication: set "
                      "STREAMFUSE_ALERTS__API_TOKEN (clients send Authorization: Bearer <token>) or mTLS "
                      "(STREAMFUSE_ALERTS__API_TLS_CERTFILE, __API_TLS_KEYFILE, __API_TLS_CLIENT_CAFILE), "
                      "or listen on 127.0.0.1")


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Serve the API until interrupted.

    Raises:
        ConfigError: the address would expose an unauthenticated API, or bad TLS files.
    """
    host = settings.alerts.api_host if host is None else host
    port = settings.alerts.api_port if port is None else port
    check_exposure(settings, host)
    ctx = tls_context(settings)
    log.info("alerts API on %s://%s:%d (OpenAPI at /openapi.json)", "https" if ctx else "http", host, port)
    web.run_app(make_app(settings), host=host or None, port=port, ssl_context=ctx, print=None, access_log=None)
