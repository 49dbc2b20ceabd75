"""Health probes for container healthchecks (``streamfuse health``).

Two kinds: an HTTP endpoint answers 2xx (a process's ``/metrics`` or the alerts API's
``/healthz``), and a topic's newest record is recent (a producer such as the simulator
or a gateway is still publishing). Each returns what it saw; the CLI turns a failure
into exit status 1 with the reason.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from streamfuse.config import Settings
from streamfuse.errors import StreamfuseError


class Unhealthy(StreamfuseError):
    """A probe failed; the message says what it saw."""


def probe_http(url: str, timeout_s: float = 5.0) -> int:
    """The HTTP status of ``GET url`` when it is 2xx.

    Raises:
        Unhealthy: no answer, or not 2xx.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - an operator-given URL
            return resp.status
    except urllib.error.HTTPError as exc:
        raise Unhealthy(f"{url} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Unhealthy(f"{url} does not answer ({getattr(exc, 'reason', exc)})") from None


def newest_record_age_s(settings: Settings, topic: str, timeout_s: float = 10.0) -> float:
    """Seconds since the newest record on ``topic`` was written (its Kafka timestamp).

    Raises:
        Unhealthy: the topic does not exist or has no record.
    """
    from kafka import TopicPartition

    from streamfuse.kafka import make_consumer

    consumer = make_consumer(settings, None, "streamfuse-health", consumer_timeout_ms=int(timeout_s * 1000))
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise Unhealthy(f"topic {topic} does not exist")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        ends = consumer.end_offsets(tps)
        filled = [tp for tp in tps if ends[tp] > 0]
        if not filled:
            raise Unhealthy(f"topic {topic} has no record yet")
        consumer.assign(filled)
        for tp in filled:
            consumer.seek(tp, ends[tp] - 1)
        newest, deadline = None, time.monotonic() + timeout_s
        pending = set(filled)
        while pending and time.monotonic() < deadline:
            for tp, recs in consumer.poll(timeout_ms=200).items():
                pending.discard(tp)
                newest = max([newest or 0, *(r.timestamp for r in recs)])
        if newest is None:
            raise Unhealthy(f"could not read the newest record of {topic} within {timeout_s:g} s")
        return max(0.0, time.time() - newest / 1000)
    finally:
        consumer.close()
