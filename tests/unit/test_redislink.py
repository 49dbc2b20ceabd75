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


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_reach_skips_calls_until_the_backoff_passed_and_logs_the_outage_once(caplog):
    reg, clock = CollectorRegistry(), Clock()
    link = RedisLink("worker w1", RedisMetrics(reg).up.labels("worker"), initial_s=1.0, max_s=4.0, clock=clock)
    calls = []
    down = True

    def hgetall():
        calls.append(clock.t)
        if down:
            raise redis.exceptions.ConnectionError("Connection refused")
        return {"image": "v1"}

    def gauge() -> float:
        return reg.get_sample_value("streamfuse_redis_up", {"process": "worker"})

    assert gauge() == 1.0 and link.reach(lambda: 7) == (True, 7)
    with caplog.at_level(logging.WARNING, logger="streamfuse.redislink"):
        for _ in range(40):  # 20 s of a loop that tries every 0.5 s
            assert link.reach(hgetall) == (False, None)
            clock.t += 0.5
        assert gauge() == 0.0 and not link.is_up
        # tries at 0, +1, +3, +7, +11, ... (backoff 1, 2, 4, then capped at 4)
        assert [t - 100 for t in calls] == [0.0, 1.0, 3.0, 7.0, 11.0, 15.0, 19.0]
        down = False
        clock.t = calls[-1] + 4.0
        assert link.reach(hgetall) == (True, {"image": "v1"})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "Redis unreachable" in lines[0] and "w1" in lines[0]
    assert "reachable again after 23.0 s (7 failed tries)" in lines[1]
    assert gauge() == 1.0 and link.is_up and link.ready()


def test_reach_raises_errors_other_than_a_lost_connection():
    link = RedisLink("worker w1")

    def wrong_type():
        raise redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    with pytest.raises(redis.exceptions.ResponseError):
        link.reach(wrong_type)
    assert link.is_up
