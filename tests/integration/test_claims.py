"""The monitor's output claims in the real Redis: leases that make redundant monitors (or
a restarted one) publish each alert and command once, and take over from one that died."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from streamfuse.monitor.app import ClaimedPublisher
from streamfuse.store import RedisLink, StatusStore, StatusWriter, connect
from streamfuse.config import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def store():
    s = Settings(redis_prefix=f"streamfuse-test:{uuid.uuid4().hex[:8]}:")
    store = StatusStore(connect(s), s.redis_prefix)
    yield store
    store.clear()


def test_a_lease_is_taken_once_done_once_and_lapses_with_its_holder(store):
    assert store.lease("command", "c1", "a", 5_000) == "taken"
    assert store.lease("command", "c1", "a", 5_000) == "taken"  # its own lease, asked again
    assert store.lease("command", "c1", "b", 5_000) == "held"
    store.claim("command", "c1")
    assert store.lease("command", "c1", "b", 5_000) == "done"
    assert store.lease("command", "c2", "a", 100) == "taken"  # a dies holding it
    time.sleep(0.2)
    assert store.lease("command", "c2", "b", 5_000) == "taken"


class Topic:
    """Where the publishers' records go: each send acknowledged after a short delay, as a
    broker would, so that both publishers are in flight at once."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, key: bytes, value: bytes, headers) -> asyncio.Future:
        self.sent.append(value)
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, done.set_result, None)
        return done


def test_redundant_publishers_publish_each_output_once(store):
    topic = Topic()
    link = RedisLink("monitor")
    pubs = [ClaimedPublisher(link, store, StatusWriter(link, f"w-{name}"), name) for name in ("a", "b", "c")]

    async def run() -> list[bool]:
        return await asyncio.gather(*(p.publish("command", f"c{i}", topic, b"k", f"c{i}".encode())
                                      for i in range(20) for p in pubs))

    published = asyncio.run(run())
    assert sorted(topic.sent) == sorted(f"c{i}".encode() for i in range(20))  # once each
    assert sum(published) == 20


def test_a_publisher_takes_over_an_output_whose_holder_died(store):
    topic = Topic()
    link = RedisLink("monitor")
    assert store.lease("alert", "a1:firing", "dead-monitor", 300) == "taken"  # died before producing
    pub = ClaimedPublisher(link, store, StatusWriter(link, "w"), "survivor")
    started = time.monotonic()
    assert asyncio.run(pub.publish("alert", "a1:firing", topic, b"k", b"a1"))
    assert topic.sent == [b"a1"] and 0.2 < time.monotonic() - started < 3
    deadline = time.monotonic() + 5
    while store.lease("alert", "a1:firing", "another", 5_000) != "done" and time.monotonic() < deadline:
        time.sleep(0.02)  # the claim is written behind
    assert store.lease("alert", "a1:firing", "another", 5_000) == "done"


def test_with_redis_down_every_publisher_publishes_nothing_is_held_back():
    """A claim that cannot be taken counts as taken: each monitor publishes (the repeat is
    dropped downstream by its id), none waits on Redis, nothing is lost."""
    s = Settings(redis_url="redis://127.0.0.1:1/0", redis_prefix="streamfuse-test:down:")
    store = StatusStore(connect(s, check=False, timeout_s=0.5), s.redis_prefix)
    topic = Topic()
    link = RedisLink("monitor")
    pubs = [ClaimedPublisher(link, store, StatusWriter(link, f"w-{name}"), name) for name in ("a", "b")]

    async def run() -> list[bool]:
        return await asyncio.gather(*(p.publish("alert", "a1:firing", topic, b"k", b"a1") for p in pubs))

    started = time.monotonic()
    assert asyncio.run(run()) == [True, True] and topic.sent == [b"a1", b"a1"]
    assert time.monotonic() - started < 5 and not link.is_up
