"""The dispatcher is SIGKILLed mid-stream and restarted: no notification is lost or repeated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from streamfuse.alerts.outbox import delivery_stats
from webhook_receiver import WebhookReceiver
from streamfuse.alerts.subscriptions import SubscriptionStore
from alertlib import cleanup, isolated_settings, make_alert, publish, resolved, wait_until
from streamfuse.config import Settings
from streamfuse.kafka import make_producer
from streamfuse.store import connect
from streamfuse.topics import ensure_topics

pytestmark = pytest.mark.integration
N = 24  # alerts; each fires and resolves: 48 notifications


def spawn_dispatcher(settings: Settings, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update({
        "STREAMFUSE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "STREAMFUSE_BROKER": settings.broker_kind,
        "STREAMFUSE_TOPIC_PREFIX": settings.topic_prefix, "STREAMFUSE_REDIS_URL": settings.redis_url,
        "STREAMFUSE_REDIS_PREFIX": settings.redis_prefix, "STREAMFUSE_ALERTS": settings.alerts.model_dump_json(),
        # model_dump_json masks secrets: the sealing key travels on its own
        "STREAMFUSE_ALERTS__SECRET_KEY": settings.alerts.secret_key.get_secret_value(),
        "PYTHONUNBUFFERED": "1",
    })
    code = "from streamfuse.alerts.cli import alerts_app; alerts_app()"
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", code, "dispatch", "-v"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.fixture
def settings(broker):
    s = isolated_settings(broker.bootstrap, group_wait_s=0.05, group_interval_s=0.05, group_by=["scope_id"])
    yield s
    cleanup(s)


def test_dispatcher_killed_and_restarted_mid_stream_loses_and_repeats_nothing(settings, tmp_path):
    s = settings
    alerts = [make_alert(scope_id=f"a{i:02d}", starts_ms=1_000 + i) for i in range(N)]
    stream = [e for a in alerts for e in (a, resolved(a))]
    with WebhookReceiver(secret="k") as rx:
        SubscriptionStore(connect(s), s.redis_prefix, s.alerts).create(rx.url, 0, secret="k", sub_id="ops")
        ensure_topics(s)  # before the stream starts, or the broker auto-creates it with its own partitions
        first = spawn_dispatcher(s, tmp_path / "dispatch-1.log")
        second = None
        producer = make_producer(s, "alerts-test")
        done = threading.Event()

        def produce() -> None:  # the monitor keeps publishing, dispatcher or not
            for i in range(2, len(stream), 2):
                publish(s, stream[i:i + 2], producer)
                time.sleep(0.1)  # pacing of the stream, not synchronization
            done.set()

        feeder = threading.Thread(target=produce, daemon=True)
        try:
            publish(s, stream[:2], producer)
            rx.wait_for(lambda r: len(r.alerts()) == 2, 30, "the dispatcher to be up")
            feeder.start()
            rx.wait_for(lambda r: len(r.alerts()) >= 8, 30, "the first notifications of the stream")
            # Kill at a point where no request is in flight: a reply the dispatcher got but did
            # not record yet is the one window that can repeat (see the dispatcher's docstring).
            rx.status = 503
            wait_until(lambda: rx.in_flight == 0 and delivery_stats(s)["sent"] == len(rx.alerts()), 20,
                       "no request in flight and every accepted one recorded")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            killed_at = len(rx.alerts())
            assert not done.is_set(), "the stream ended before the kill: make it longer"
            second = spawn_dispatcher(s, tmp_path / "dispatch-2.log")
            rx.status = 200
            feeder.join(30)
            rx.wait_for(lambda r: len(r.alerts()) >= 2 * N, 60, "every notification after the restart")
        finally:
            for p in (first, second):
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    p.wait(20)
            producer.close()
    logs = "".join((tmp_path / f).read_text(errors="replace") for f in ("dispatch-1.log", "dispatch-2.log"))
    counts = Counter(rx.alerts())
    print(f"killed after {killed_at} of {2 * N} notifications; stats {delivery_stats(s)}")
    assert 8 <= killed_at < 2 * N
    assert set(counts) == {(a.fingerprint, st) for a in alerts for st in ("firing", "resolved")}, logs[-3000:]
    assert set(counts.values()) == {1}, [k for k, v in counts.items() if v > 1]
    assert second.returncode == 0 and "dispatcher stopped" in logs
    assert rx.refused == []


def test_two_dispatchers_in_one_group_notify_once(settings):
    from alertlib import DispatcherThread

    # Both instances see each group fall due at the same moment and the receiver is slowish:
    # without the per-group delivery lock they would both send it.
    s = settings.model_copy(update={"alerts": settings.alerts.model_copy(update={"group_wait_s": 0.5})})
    alerts = [make_alert(scope_id=f"b{i:02d}", starts_ms=5_000 + i) for i in range(12)]
    with WebhookReceiver(delay_s=0.1) as rx:
        SubscriptionStore(connect(s), s.redis_prefix, s.alerts).create(rx.url, 0, sub_id="ops")
        # One consumes (the partition may move to the second as it joins); both deliver.
        with DispatcherThread(s), DispatcherThread(s, wait_ready=False) as standby:
            publish(s, alerts + [resolved(a) for a in alerts])
            rx.wait_for(lambda r: len(r.alerts()) >= 24, 30, "every notification")
            assert standby.error is None
    counts = Counter(rx.alerts())
    assert len(counts) == 24 and set(counts.values()) == {1}
