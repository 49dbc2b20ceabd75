"""Alert dispatcher throughput and latency against references measured in the same run.

Usage: python bench/alerts_delivery.py [--n 1000] [--out out/alerts.json]
"""
from __future__ import annotations

import argparse, asyncio, json, statistics, sys, time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the alert test harness

from alertlib import DispatcherThread, cleanup, isolated_settings, make_alert, publish, resolved  # noqa: E402
from streamfuse.alerts.outbox import delivery_stats  # noqa: E402
from streamfuse.alerts.subscriptions import SubscriptionStore  # noqa: E402
from streamfuse.embedded import EmbeddedBroker  # noqa: E402
from streamfuse.kafka import make_consumer  # noqa: E402
from streamfuse.store import connect  # noqa: E402
from streamfuse.topics import Topics, ensure_topics  # noqa: E402
from webhook_receiver import WebhookReceiver  # noqa: E402
from report import emit, machine  # noqa: E402


def raw_post_rate(url: str, n: int, body: bytes) -> float:
    async def main() -> float:
        async with aiohttp.ClientSession() as s:
            for _ in range(20):
                async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    r.status
            t0 = time.perf_counter()
            for _ in range(n):
                async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    r.status
            return n / (time.perf_counter() - t0)
    return asyncio.run(main())


def raw_consume_rate(settings, n: int) -> float:
    from kafka import TopicPartition
    c = make_consumer(settings, None, "bench-raw")
    topic = Topics(settings.topic_prefix).alerts
    c.assign([TopicPartition(topic, 0)]); c.seek_to_beginning()
    got, t0 = 0, time.perf_counter()
    while got < n:
        got += sum(len(v) for v in c.poll(timeout_ms=500).values())
    rate = got / (time.perf_counter() - t0)
    c.close()
    return rate


def run(settings, rx, events, expect) -> tuple[float, dict]:
    sub = SubscriptionStore(connect(settings), settings.redis_prefix, settings.alerts)
    sub.create(rx.url, 0, sub_id="bench", secret="k")
    ensure_topics(settings)
    publish(settings, events)  # all queued on the topic first: measures the dispatcher alone
    with DispatcherThread(settings, seed=0):
        t0 = time.perf_counter()  # the consumer has joined its group (about 1 s on this broker)
        rx.wait_for(lambda r: len(r.alerts()) >= expect, 300, "all notifications")
        dt = time.perf_counter() - t0
    return dt, delivery_stats(settings)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="alerts (each fires and resolves)")
    ap.add_argument("--out", default="alerts-bench.json")
    args = ap.parse_args()
    n = args.n
    alerts = [make_alert(scope_id=f"a{i:05d}", starts_ms=1_000 + i) for i in range(n)]
    events = alerts + [resolved(a) for a in alerts]
    out: dict = {**machine(), "n_events": 2 * n}
    with EmbeddedBroker() as broker:
        # 1) one group: intake-bound (few large requests). Reference: raw kafka-python consume of the same topic.
        with WebhookReceiver(secret="k") as rx:
            s = isolated_settings(broker.bootstrap, group_wait_s=0.0, group_interval_s=0.0, group_by=["kind"])
            try:
                dt, st = run(s, rx, events, 2 * n)
                raw = raw_consume_rate(s, 2 * n)
            finally:
                cleanup(s)
            out["one_group"] = {"seconds": dt, "events_per_s": 2 * n / dt, "requests": st["requests"],
                                "raw_consume_per_s": raw, "ratio_vs_raw_consume": (2 * n / dt) / raw}
        # 2) one group per alert: request-bound. Reference: sequential aiohttp POSTs of the same body size.
        with WebhookReceiver(secret="k") as rx:
            s = isolated_settings(broker.bootstrap, group_wait_s=0.0, group_interval_s=0.0, group_by=["scope_id"])
            try:
                dt, st = run(s, rx, events, 2 * n)
            finally:
                cleanup(s)
            body = json.dumps(rx.deliveries[0].body).encode()
        with WebhookReceiver() as raw_rx:
            raw = raw_post_rate(raw_rx.url, st["requests"], body)
        out["group_per_alert"] = {"seconds": dt, "requests": st["requests"],
                                  "requests_per_s": st["requests"] / dt, "raw_post_per_s": raw,
                                  "ratio_vs_raw_post": (st["requests"] / dt) / raw}
        # 3) latency: one alert at a time, publish -> receiver, group_wait 0.
        with WebhookReceiver(secret="k") as rx:
            s = isolated_settings(broker.bootstrap, group_wait_s=0.0, group_interval_s=0.0)
            try:
                SubscriptionStore(connect(s), s.redis_prefix, s.alerts).create(rx.url, 0, sub_id="lat", secret="k")
                lat = []
                with DispatcherThread(s):
                    for i in range(30):
                        a = make_alert(scope_id=f"l{i}", modality=("image", "audio", "series")[i % 3], starts_ms=i + 1)
                        t0 = time.perf_counter()
                        publish(s, [a])
                        rx.wait_for(lambda r: len(r.alerts()) >= i + 1, 30, "the alert")
                        lat.append(time.perf_counter() - t0)
            finally:
                cleanup(s)
        lat = lat[5:]  # warm-up
        out["latency_s"] = {"p50": statistics.median(lat), "max": max(lat), "n": len(lat)}
    emit(out, args.out)


if __name__ == "__main__":
    main()
