"""A canary secret set in every secret-bearing setting never appears in a log line,
`status --json`, `alerts list --json`, an API response, or a value stored in Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess

import pytest
from aiohttp.test_utils import TestClient, TestServer
from typer.testing import CliRunner

from streamfuse.alerts.api import make_app
from webhook_receiver import WebhookReceiver
from alertlib import DispatcherThread, isolated_settings, make_alert, publish, wait_until
from streamfuse.cli import app as cli_app
from streamfuse.config import Settings
from streamfuse.embedded import free_port

pytestmark = pytest.mark.integration
CANARY = "CANARY-4e1f9b2d"


@pytest.fixture
def private_redis():
    """A redis-server of this test's own that wants the canary as its password."""
    import redis

    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", CANARY,
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, password=CANARY)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_until(up, 10, "the private redis-server")
        yield port, client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def stored_values(client) -> str:
    """Every value of every key in the Redis database, as text."""
    out = []
    for key in client.scan_iter():
        kind = client.type(key).decode()
        if kind == "string":
            out.append(client.get(key))
        elif kind == "hash":
            out += [b"%s=%s" % kv for kv in client.hgetall(key).items()]
        elif kind == "list":
            out += client.lrange(key, 0, -1)
        elif kind == "set":
            out += list(client.smembers(key))
        elif kind == "zset":
            out += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            out += [json.dumps({k.decode(): v.decode() for k, v in f.items()}).encode()
                    for _, f in client.xrange(key)]
        out.append(key)
    return b"\n".join(out).decode(errors="replace")


def test_a_canary_secret_appears_nowhere(broker, private_redis, monkeypatch, caplog):
    port, raw = private_redis
    base = isolated_settings(broker.bootstrap)
    env = {"STREAMFUSE_KAFKA_BOOTSTRAP": broker.bootstrap, "STREAMFUSE_BROKER": "tansu",
           "STREAMFUSE_TOPIC_PREFIX": base.topic_prefix, "STREAMFUSE_REDIS_PREFIX": base.redis_prefix,
           "STREAMFUSE_REDIS_URL": f"redis://:{CANARY}@127.0.0.1:{port}/0", "STREAMFUSE_REDIS_PASSWORD": CANARY,
           "STREAMFUSE_KAFKA_SECURITY__SASL_USERNAME": "sf", "STREAMFUSE_KAFKA_SECURITY__SASL_PASSWORD": CANARY,
           "STREAMFUSE_ALERTS__API_TOKEN": CANARY, "STREAMFUSE_ALERTS": base.alerts.model_dump_json(),
           "STREAMFUSE_ALERTS__SECRET_KEY": base.alerts.secret_key.get_secret_value()}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []
    runner = CliRunner()
    with WebhookReceiver(secret=CANARY) as rx:
        hook = f"{rx.url}?token={CANARY}"
        for args in (["alerts", "subscribe", "--url", hook, "--secret", CANARY, "--id", "canary"],
                     ["alerts", "list", "--json"], ["alerts", "list"], ["status", "--json"], ["status"]):
            out = runner.invoke(cli_app, args)
            assert out.exit_code == 0, out.output
            shown.append(out.output)
        settings = Settings()
        settings.log_effective(logging.getLogger("streamfuse.test"))
        shown.append(repr(settings))
        shown += asyncio.run(api_responses(settings))
        with DispatcherThread(settings):
            publish(settings, [make_alert(scope_id="a1")])
            rx.wait_for(lambda r: r.deliveries, 20, "the alert at the canary-signed webhook")
        assert rx.deliveries[0].signed  # the sealed secret was opened and signed with
        shown.append(stored_values(raw))
    shown.append(caplog.text)
    assert len(caplog.records) > 3 and "effective settings" in caplog.text
    leaks = [text[max(0, text.find(CANARY) - 80):text.find(CANARY) + 40] for text in shown if CANARY in text]
    assert leaks == []
    raw.flushdb()  # this test's own server


async def api_responses(settings: Settings) -> list[str]:
    auth = {"Authorization": f"Bearer {CANARY}"}
    texts = []
    async with TestClient(TestServer(make_app(settings))) as client:
        created = await client.post("/silences", json={"matchers": ["modality=audio"], "duration": "1h"},
                                    headers=auth)
        texts.append(await created.text())
        for path in ("/subscriptions", "/subscriptions/canary", "/silences", "/alerts", "/stats", "/openapi.json",
                     "/healthz"):
            resp = await client.get(path, headers=auth)
            assert resp.status == 200, path
            texts.append(await resp.text())
        texts.append(await (await client.get("/subscriptions")).text())  # the 401 body
    return texts
