"""RedisGuard: a Redis outage is one warning, a gauge at 0, backoff between tries, and
one more line when Redis is back; other errors are not swallowed."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from streamfuse.metrics import RedisMetrics
from streamfuse.redis_guard import RedisGuard


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_an_outage_is_logged_once_backs_off_and_ends_when_a_call_succeeds(caplog):
    reg, clock = CollectorRegistry(), Clock()
    guard = RedisGuard("worker w1", RedisMetrics(reg).up.labels("worker"), first_backoff_s=1.0, max_backoff_s=4.0,
                       clock=clock)
    calls = []
    down = True

    def hgetall():
        calls.append(clock.t)
        if down:
            raise RedisConnectionError("Connection refused")
        return {"image": "v1"}

    def up() -> float:
        return reg.get_sample_value("streamfuse_redis_up", {"process": "worker"})

    assert up() == 1.0 and guard.call(lambda: 7) == (True, 7)
    with caplog.at_level(logging.WARNING, logger="streamfuse.redis_guard"):
        for _ in range(40):  # 20 s of a loop that tries every 0.5 s
            assert guard.call(hgetall) == (False, None)
            clock.t += 0.5
        assert up() == 0.0 and not guard.reachable
        # tries at 0, +1, +3, +7, +11, ... (backoff 1, 2, 4, then capped at 4)
        assert [t - 100 for t in calls] == [0.0, 1.0, 3.0, 7.0, 11.0, 15.0, 19.0]
        down = False
        clock.t = calls[-1] + 4.0
        assert guard.call(hgetall) == (True, {"image": "v1"})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "Redis unreachable" in lines[0] and "w1" in lines[0]
    assert "reachable again after 23.0 s (7 failed tries)" in lines[1]
    assert up() == 1.0 and guard.reachable and guard.ready()


def test_errors_other_than_a_lost_connection_are_raised():
    guard = RedisGuard("worker w1")

    def wrong_type():
        raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    with pytest.raises(ResponseError):
        guard.call(wrong_type)
    assert guard.reachable
