"""RedisLink and StatusWriter against a real redis-server of the test's own that is
stopped and restarted: retries with backoff, one log line per outage, the gauge."""

from __future__ import annotations

import logging
import threading

import pytest
import redis
from prometheus_client import CollectorRegistry

from chaoslib import RedisServer, wait_until
from streamfuse.errors import RedisUnavailable
from streamfuse.metrics import RedisMetrics
from streamfuse.redislink import RedisLink, StatusWriter


@pytest.fixture
def own_redis(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        yield server


def make_link(registry):
    return RedisLink("test", RedisMetrics(registry).up.labels("test"), initial_s=0.02, max_s=0.2)


def up(registry) -> float:
    return registry.get_sample_value("streamfuse_redis_up", {"process": "test"})


def test_call_waits_out_an_outage_and_logs_it_once(own_redis, caplog):
    registry = CollectorRegistry()
    link = make_link(registry)
    client = redis.Redis.from_url(own_redis.url, socket_timeout=1, socket_connect_timeout=1)
    assert link.call(client.set, "k", "v", what="setting k") is True and up(registry) == 1
    own_redis.stop()
    result = {}
    caplog.set_level(logging.WARNING, "streamfuse.redislink")
    t = threading.Thread(target=lambda: result.update(v=link.call(client.incr, "n", what="counting")))
    t.start()
    wait_until(lambda: link.failures >= 5, 10, "several failed tries")
    assert up(registry) == 0 and t.is_alive()
    own_redis.start()
    t.join(10)
    assert result == {"v": 1} and up(registry) == 1 and link.is_up
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # one when it went, one when it came back
    assert "unreachable while counting" in lines[0] and "reachable again" in lines[1]


def test_deadline_and_attempt(own_redis):
    link = make_link(CollectorRegistry())
    client = redis.Redis.from_url(own_redis.url, socket_timeout=1, socket_connect_timeout=1)
    own_redis.stop()
    with pytest.raises(RedisUnavailable, match="while reading x"):
        link.call(client.get, "x", what="reading x", deadline_s=0.3)
    assert link.attempt(client.get, "x", default="fallback") == "fallback"
    assert link.outages == 1


def test_other_errors_are_not_retried(own_redis):
    link = make_link(CollectorRegistry())
    client = redis.Redis.from_url(own_redis.url, socket_timeout=1)
    client.set("s", "text")
    with pytest.raises(redis.ResponseError):  # a bug, not an outage
        link.call(client.incr, "s")
    assert link.is_up


def test_writer_applies_writes_made_during_an_outage_in_order(own_redis):
    link = make_link(CollectorRegistry())
    client = redis.Redis.from_url(own_redis.url, socket_timeout=1, socket_connect_timeout=1)
    writer = StatusWriter(link)
    try:
        own_redis.stop()
        for i in range(20):
            writer.submit(f"push {i}", client.rpush, "log", i)
        wait_until(lambda: not link.is_up, 5, "the writer to notice the outage")
        assert writer.pending == 20
        own_redis.start()
        assert writer.flush(10)
        assert [int(x) for x in client.lrange("log", 0, -1)] == list(range(20))
    finally:
        writer.close(1)
