"""Alert delivery against the embedded broker, the real Redis and real HTTP receivers."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

from streamfuse.alerts.outbox import delivery_stats
from webhook_receiver import WebhookReceiver
from streamfuse.alerts.signing import verify_signature
from streamfuse.alerts.subscriptions import SilenceStore, SubscriptionStore
from alertlib import (
    DispatcherThread,
    cleanup,
    isolated_settings,
    make_alert,
    publish,
    read_events,
    resolved,
    wait_until,
)
from streamfuse.clock import now_ms
from streamfuse.events import DeadLetter
from streamfuse.store import connect
from streamfuse.topics import Topics

pytestmark = pytest.mark.integration
DOWN_S = 5.0  # the receiver's real downtime; the backoff cap (1 s) makes several retries fit in it


@pytest.fixture
def make_settings(broker):
    made = []

    def make(**alerts):
        made.append(isolated_settings(broker.bootstrap, **alerts))
        return made[-1]

    yield make
    for s in made:
        cleanup(s)


@pytest.fixture
def receivers():
    made: list[WebhookReceiver] = []

    def make(**kwargs) -> WebhookReceiver:
        made.append(WebhookReceiver(**kwargs).start())
        return made[-1]

    yield make
    for rx in made:
        rx.close()


def subscribe(settings, url, **kwargs):
    return SubscriptionStore(connect(settings), settings.redis_prefix, settings.alerts).create(
        url, now_ms(), **kwargs)


def test_filters_route_each_alert_to_the_right_receivers_signed(make_settings, receivers):
    s = make_settings()
    images, critical = receivers(secret="k1"), receivers()
    subscribe(s, images.url, matchers=["modality=image"], secret="k1", sub_id="images")
    subscribe(s, critical.url, min_severity="critical", sub_id="critical")
    subscribe(s, f"{s.alerts.redis_channel_prefix}audio", receiver="redis",
              matchers=["modality=~aud.*", "scope!=global"], sub_id="audio")
    listener = connect(s).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(f"{s.alerts.redis_channel_prefix}audio")
    alerts = {
        "img-asset": make_alert(modality="image", scope_id="a1"),
        "img-global": make_alert(modality="image", scope="global", scope_id="", severity="critical"),
        "aud-asset": make_alert(modality="audio", scope_id="a2"),
        "aud-global": make_alert(modality="audio", scope="global", scope_id="", severity="critical"),
        "series-info": make_alert(modality="series", scope_id="a3", severity="info"),
    }
    fp = {name: a.fingerprint for name, a in alerts.items()}
    registry = CollectorRegistry()
    with DispatcherThread(s, registry=registry):
        publish(s, list(alerts.values()))
        got_redis: list[dict] = []

        def redis_has_all() -> bool:
            msg = listener.get_message(timeout=0.05)
            if msg is not None:
                got_redis.append(json.loads(msg["data"]))
            return len([a for b in got_redis for a in b["alerts"]]) >= 1

        images.wait_for(lambda r: len(r.alerts()) >= 2, 20, "the image alerts")
        critical.wait_for(lambda r: len(r.alerts()) >= 2, 20, "the critical alerts")
        wait_until(redis_has_all, 20, "the audio alert on Redis pub/sub")
    assert sorted(images.alerts()) == sorted([(fp["img-asset"], "firing"), (fp["img-global"], "firing")])
    assert sorted(critical.alerts()) == sorted([(fp["img-global"], "firing"), (fp["aud-global"], "firing")])
    assert [(a["fingerprint"], a["status"]) for b in got_redis for a in b["alerts"]] == [(fp["aud-asset"], "firing")]
    assert got_redis[0]["version"] == "4" and got_redis[0]["receiver"] == "audio"
    # Signed with the subscription's secret, checkable by a receiver with verify_signature.
    assert images.refused == [] and all(d.signed for d in images.deliveries)
    d = images.deliveries[0]
    body = json.dumps(d.body, separators=(",", ":")).encode()  # the dispatcher's exact serialization
    verify_signature(body, d.headers, "k1")
    assert "X-Streamfuse-Signature" not in critical.deliveries[0].headers  # no secret, no signature
    assert d.body["alerts"][0]["labels"]["modality"] == "image"
    stats = delivery_stats(s)
    assert stats["sent"] == 5 and stats["pending"] == 0 and stats["received"] == 5
    sample = registry.get_sample_value
    assert sample("streamfuse_alerts_received_total", {"status": "firing"}) == 5
    assert sample("streamfuse_alerts_notifications_total", {"receiver": "webhook", "outcome": "sent"}) == 4
    assert sample("streamfuse_alerts_notifications_total", {"receiver": "redis", "outcome": "sent"}) == 1
    assert sample("streamfuse_alerts_delivery_seconds_count", {"receiver": "webhook"}) == 4


def test_receiver_down_then_up_gets_every_notification_exactly_once(make_settings, receivers):
    s = make_settings(backoff_initial_s=0.2, backoff_max_s=1.0)
    rx = receivers(secret="k")
    subscribe(s, rx.url, secret="k", sub_id="ops")
    before = [make_alert(scope_id=f"a{i}", starts_ms=1_000 + i) for i in range(4)]
    while_down = [make_alert(modality="audio", scope_id=f"a{i}", starts_ms=2_000 + i) for i in range(4)]
    with DispatcherThread(s, seed=7):
        publish(s, before)
        rx.wait_for(lambda r: len(r.alerts()) == 4, 20, "the first alerts")
        rx.stop()  # down: connections are refused
        down_at = time.monotonic()
        # While down: new alerts, resolutions, and the monitor re-firing after a restart (duplicates).
        publish(s, while_down + [resolved(a) for a in before] + before + while_down)
        wait_until(lambda: delivery_stats(s)["failed_attempts"] >= 3
                   and time.monotonic() - down_at >= DOWN_S, DOWN_S + 20, "retries while the receiver is down")
        assert len(rx.alerts()) == 4
        rx.start()  # back on the same port
        rx.wait_for(lambda r: len(r.alerts()) == 12, 20, "every notification after the receiver came back")
    expected = {(a.fingerprint, "firing") for a in before + while_down} | {(a.fingerprint, "resolved") for a in before}
    counts = Counter(rx.alerts())
    assert set(counts) == expected and set(counts.values()) == {1}
    stats = delivery_stats(s)
    assert stats["sent"] == 12 and stats["duplicates"] == 8 and stats["pending"] == 0 and stats["dead"] == 0


def test_inhibition_and_silence(make_settings, receivers):
    s = make_settings()
    rx = receivers()
    subscribe(s, rx.url, sub_id="all")
    silences = SilenceStore(connect(s), s.redis_prefix)
    mute_audio = silences.create(["modality=audio"], 3600, now_ms(), "maintenance", "test")
    fault = make_alert(kind="sensor_fault", modality="image", scope_id="a1")
    explained = make_alert(modality="image", scope_id="a1")  # inhibited by the sensor fault
    unrelated = make_alert(modality="image", scope_id="a2")
    audio = make_alert(modality="audio", scope_id="a1")  # silenced
    with DispatcherThread(s):
        publish(s, [fault, explained, unrelated, audio])
        rx.wait_for(lambda r: len(r.alerts()) >= 2, 20, "the alerts nothing mutes")
        wait_until(lambda: delivery_stats(s)["muted"] == 2, 10, "two muted alerts")
        assert sorted(rx.alerts()) == sorted([(fault.fingerprint, "firing"), (unrelated.fingerprint, "firing")])
        publish(s, [resolved(fault)])  # the fault is gone: the degradation it explained is news now
        rx.wait_for(lambda r: (explained.fingerprint, "firing") in r.alerts(), 20, "the formerly inhibited alert")
        assert (audio.fingerprint, "firing") not in rx.alerts()
        silences.expire(mute_audio.id, now_ms())
        rx.wait_for(lambda r: (audio.fingerprint, "firing") in r.alerts(), 20, "the alert whose silence expired")
    assert Counter(rx.alerts()) == Counter([(fault.fingerprint, "firing"), (unrelated.fingerprint, "firing"),
                                            (fault.fingerprint, "resolved"), (explained.fingerprint, "firing"),
                                            (audio.fingerprint, "firing")])


def test_a_slow_receiver_does_not_hold_up_the_others(make_settings, receivers):
    s = make_settings(request_timeout_s=5.0, group_by=["scope_id"])
    slow, fast = receivers(delay_s=2.0), receivers()
    subscribe(s, slow.url, sub_id="slow")
    subscribe(s, fast.url, sub_id="fast")
    alerts = [make_alert(scope_id=f"a{i}") for i in range(4)]  # four groups: four requests each
    with DispatcherThread(s):
        t0 = time.monotonic()
        publish(s, alerts)
        fast.wait_for(lambda r: len(r.alerts()) == 4, 20, "the fast receiver's alerts")
        fast_s = time.monotonic() - t0
        assert len(slow.alerts()) <= 1, "the fast receiver had to wait for the slow one"
    assert fast_s < 4.0 and len(fast.deliveries) == 4


def test_give_up_and_rejections_go_to_the_dead_letter_topic(make_settings, receivers):
    s = make_settings(give_up_s=1.5, backoff_initial_s=0.2, backoff_max_s=0.4)
    failing, strict = receivers(status=503), receivers(secret="right")
    subscribe(s, failing.url, sub_id="failing")
    subscribe(s, strict.url, secret="Zq9-not-the-key", sub_id="rejected")
    a = make_alert(scope_id="a1")
    with DispatcherThread(s):
        publish(s, [a])
        wait_until(lambda: delivery_stats(s)["dead"] == 2, 20, "both notifications dead-lettered")
    dead = [e for e in read_events(s, Topics(s.topic_prefix).deadletter, 2, 10) if isinstance(e, DeadLetter)]
    by_sub = {json.loads(d.original)["key"]: d for d in dead}
    assert len(dead) == 2 and set(by_sub) == {f"{a.fingerprint}:{a.starts_ms}:firing"}
    details = sorted(d.detail for d in dead)
    assert all(d.reason == "undeliverable" and d.key == a.fingerprint.encode() for d in dead)
    assert "HTTP 503" in details[0] and "failing" in details[0] and "gave up after" in details[0]
    assert "HTTP 401" in details[1] and "after 1 attempts" in details[1]  # 4xx: no point retrying
    assert strict.refused == ["mismatch"] and "Zq9" not in " ".join(details)  # secrets are not in the reason
    stats = delivery_stats(s)
    assert stats["by_subscription"]["failing"]["dead"] == 1 and stats["sent"] == 0
