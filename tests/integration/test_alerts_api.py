"""The alerts HTTP API, the `alerts` commands, and intake idempotency, on the real Redis."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer
from typer.testing import CliRunner

from streamfuse.alerts.api import make_app
from streamfuse.alerts.config import AlertSettings
from streamfuse.alerts.cli import alerts_app
from streamfuse.alerts.intake import Intake, Record
from webhook_receiver import WebhookReceiver
from streamfuse.alerts.subscriptions import AlertKeys
from alertlib import DispatcherThread, cleanup, isolated_settings, make_alert, publish, resolved
from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.events import encode, headers
from streamfuse.store import connect

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_settings():
    """Settings for tests that need Redis but no broker."""
    s = isolated_settings("127.0.0.1:9", allow_private_targets=False)
    yield s
    r = connect(s)
    keys = list(r.scan_iter(match=f"{s.redis_prefix}*"))
    if keys:
        r.delete(*keys)


def run_api(settings: Settings, scenario) -> None:
    async def main() -> None:
        async with TestClient(TestServer(make_app(settings))) as client:
            await scenario(client)

    asyncio.run(main())


def test_subscription_and_silence_crud_never_returns_secrets(redis_settings):
    async def scenario(client) -> None:
        assert (await client.get("/healthz")).status == 200
        spec = await (await client.get("/openapi.json")).json()
        assert spec["openapi"].startswith("3.") and {"/subscriptions", "/silences", "/events"} <= set(spec["paths"])
        resp = await client.post("/subscriptions", json={"url": "http://8.8.8.8/hook", "matchers": ["modality=image"],
                                                         "min_severity": "warning", "secret": "hunter2", "id": "ops"})
        created = await resp.json()
        assert resp.status == 201 and created["signed"] is True and "hunter2" not in json.dumps(created)
        listed = await (await client.get("/subscriptions")).json()
        assert [s["id"] for s in listed] == ["ops"] and "hunter2" not in json.dumps(listed)
        assert (await (await client.get("/subscriptions/ops")).json())["matchers"] == ["modality=image"]
        # Refused URLs and bad input: 400 with the reason.
        for body, words in [({"url": "http://169.254.169.254/"}, "metadata"),
                            ({"url": "http://127.0.0.1:1/"}, "ALLOW_PRIVATE_TARGETS"),
                            ({"url": "https://u:p@8.8.8.8/"}, "credentials"),
                            ({"url": "gopher://8.8.8.8/"}, "http or https"),
                            ({"url": "http://8.8.8.8/", "matchers": ["modality"]}, "NAME=VALUE"),
                            ({"url": "http://8.8.8.8/", "min_severity": "fatal"}, "info, warning, critical"),
                            ({"matchers": []}, "url")]:
            resp = await client.post("/subscriptions", json=body)
            assert resp.status == 400 and words in (await resp.json())["error"], body
        not_json = await client.post("/subscriptions", data=b"nope", headers={"Content-Type": "application/json"})
        assert not_json.status == 400
        assert (await client.delete("/subscriptions/ops")).status == 204
        assert (await client.delete("/subscriptions/ops")).status == 404
        resp = await client.post("/silences", json={"matchers": ["modality=audio"], "duration": "2h", "comment": "x"})
        silence = await resp.json()
        assert resp.status == 201 and silence["ends_ms"] - silence["starts_ms"] == 7_200_000
        assert [s["id"] for s in await (await client.get("/silences")).json()] == [silence["id"]]
        assert (await client.delete(f"/silences/{silence['id']}")).status == 200
        assert await (await client.get("/silences")).json() == []
        assert (await client.post("/silences", json={"matchers": [], "duration": "1h"})).status == 400

    run_api(redis_settings, scenario)


def test_api_token(redis_settings):
    alerts = AlertSettings(**{**redis_settings.alerts.model_dump(), "api_token": "t0k"})
    s = redis_settings.model_copy(update={"alerts": alerts})

    async def scenario(client) -> None:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/subscriptions")).status == 401
        assert (await client.get("/subscriptions", headers={"Authorization": "Bearer t0k"})).status == 200

    run_api(s, scenario)


def test_server_sent_events_stream_lifecycle_changes(broker):
    s = isolated_settings(broker.bootstrap)
    a = make_alert(scope_id="a1")

    async def scenario(client) -> None:
        resp = await client.get("/events")
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events: list[tuple[str, dict]] = []
        name = ""
        await asyncio.to_thread(publish, s, [a, a, resolved(a)])  # the duplicate is not a change
        async with asyncio.timeout(20):
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
                    if len(events) == 3:
                        break
        resp.close()
        assert events[0] == ("snapshot", [])
        assert [(n, e["fingerprint"], e["status"]) for n, e in events[1:]] == [
            ("alert", a.fingerprint, "firing"), ("alert", a.fingerprint, "resolved")]
        firing = await (await client.get("/alerts")).json()
        assert firing == []

    try:
        with DispatcherThread(s):
            run_api(s, scenario)
    finally:
        cleanup(s)


def test_cli_subscribe_list_silence_unsubscribe(redis_settings, monkeypatch):
    monkeypatch.setenv("STREAMFUSE_REDIS_PREFIX", redis_settings.redis_prefix)
    monkeypatch.setenv("STREAMFUSE_ALERTS__SECRET_KEY", redis_settings.alerts.secret_key.get_secret_value())
    runner = CliRunner()
    ok = runner.invoke(alerts_app, ["subscribe", "--url", "http://8.8.8.8/hook", "--match", "modality=audio",
                                    "--match", "scope=~global|line", "--min-severity", "warning",
                                    "--secret", "hunter2", "--id", "ops"])
    assert ok.exit_code == 0, ok.output
    assert "subscribed ops" in ok.output and "hunter2" not in ok.output
    listed = runner.invoke(alerts_app, ["list", "--json"])
    data = json.loads(listed.output)
    assert data["subscriptions"][0]["matchers"] == ["modality=audio", "scope=~global|line"]
    assert "hunter2" not in listed.output
    table = runner.invoke(alerts_app, ["list"])
    assert "ops" in table.output and "hunter2" not in table.output
    silenced = runner.invoke(alerts_app, ["silence", "--match", "modality=audio", "--for", "2h", "--comment", "fix"])
    assert silenced.exit_code == 0 and "modality=audio for 2h" in silenced.output
    silences = json.loads(runner.invoke(alerts_app, ["list", "--json"]).output)["silences"]
    assert len(silences) == 1 and silences[0]["ends_ms"] - silences[0]["starts_ms"] == 7_200_000
    assert runner.invoke(alerts_app, ["silence", "--expire", silences[0]["id"]]).exit_code == 0
    assert runner.invoke(alerts_app, ["unsubscribe", "ops"]).exit_code == 0
    assert json.loads(runner.invoke(alerts_app, ["list", "--json"]).output) == {"subscriptions": [], "silences": []}
    # Errors: exit code 2 and a message that says what to do.
    for args, words in [(["unsubscribe", "ops"], "alerts list"),
                        (["subscribe", "--url", "http://10.0.0.1/x"], "ALLOW_PRIVATE_TARGETS"),
                        (["subscribe", "--url", "http://169.254.169.254/x"], "metadata"),
                        (["silence", "--match", "modality=audio", "--for", "2 hours"], "90s, 30m, 2h"),
                        (["subscribe", "--url", "x", "--receiver", "pager"], "webhook, alertmanager, redis")]:
        bad = runner.invoke(alerts_app, args)
        assert bad.exit_code == 2 and words in " ".join(bad.output.split()), (args, bad.output)


def test_intake_is_idempotent_across_restarts(redis_settings):
    s = redis_settings
    r = connect(s)
    r.hset(AlertKeys(s.redis_prefix).subscriptions, "ops", json.dumps(
        {"id": "ops", "receiver": "redis", "url": "chan", "matchers": [], "min_severity": "info"}))
    a = make_alert(scope_id="a1")
    records = [Record("t.alerts", 0, i, b"k", encode(e), headers()) for i, e in enumerate([a, resolved(a)])]
    records.append(Record("t.alerts", 0, 2, b"k", b"\xc1 not msgpack", []))
    dead: list = []
    now = now_ms()
    assert Intake(s, r).process(records, now, dead.extend) == {"ops"}
    assert [d.reason for d in dead] == ["undecodable"]
    # A restarted dispatcher that re-reads the batch (crash before the Kafka commit) adds nothing.
    again = Intake(s, r)
    assert again.process(records, now + 1, dead.extend) == set() and len(dead) == 1
    # Without the remembered offsets (a new consumer group), the lifecycle still drops the duplicates.
    again.forget_offset("t.alerts", 0)
    assert again.process(records[:2], now + 2, dead.extend) == set()
    stats = {k.decode(): int(v) for k, v in r.hgetall(AlertKeys(s.redis_prefix).stats).items()}
    assert stats["notifications"] == 2 and stats["skipped"] == 3 and stats["duplicates"] == 2


def test_receiver_refuses_unsigned_and_stale_requests():
    import urllib.error
    import urllib.request

    from streamfuse.alerts.signing import signed_headers

    with WebhookReceiver(secret="k") as rx:
        body = b'{"version":"4","alerts":[]}'
        for hdrs, reason in [({}, "missing"), (signed_headers(body, "k", int(time.time()) - 3600), "stale")]:
            req = urllib.request.Request(rx.url, data=body, headers=hdrs, method="POST")
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=5)
            assert info.value.code == 401
            assert rx.refused[-1] == reason
        req = urllib.request.Request(rx.url, data=body, headers=signed_headers(body, "k", int(time.time())))
        assert urllib.request.urlopen(req, timeout=5).status == 200
