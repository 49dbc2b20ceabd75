"""No silent producer loss: records that expire in a producer while the broker is frozen
(longer than the delivery timeout, short here) are sent again, or counted as lost."""

from __future__ import annotations

import threading

import pytest
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from chaoslib import freeze, thaw, wait_until
from streamfuse.config import Settings
from streamfuse.embedded import EmbeddedBroker
from streamfuse.kafka import make_consumer, producer_config
from streamfuse.metrics import ProducerMetrics
from streamfuse.sends import TrackedProducer
from streamfuse.sim.publish import SimPublisher
from streamfuse.topics import Topics, ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture
def own_broker():
    with EmbeddedBroker() as b:
        yield b


def short_timeout_producer(settings: Settings) -> KafkaProducer:
    cfg = producer_config(settings, "test-short")
    return KafkaProducer(**{**cfg, "delivery_timeout_ms": 1500, "request_timeout_ms": 1000, "retries": 1,
                            "max_block_ms": 1000, "reconnect_backoff_max_ms": 200})


def read_all(settings: Settings, topic: str, expect: int) -> list[bytes]:
    from kafka import TopicPartition

    consumer = make_consumer(settings, None, "test-read")
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    got: list[bytes] = []
    try:
        wait_until(lambda: got.extend(m.value for ms in consumer.poll(200).values() for m in ms) or len(got) >= expect,
                   30, f"{expect} records on {topic}")
        got.extend(m.value for ms in consumer.poll(500).values() for m in ms)
    finally:
        consumer.close()
    return got


def test_sends_expired_during_a_freeze_are_sent_again(own_broker, tmp_path):
    settings = Settings(kafka_bootstrap=own_broker.bootstrap, broker="tansu", topic_prefix="loss.")
    ensure_topics(settings)
    topic = Topics(settings.topic_prefix).labels
    registry = CollectorRegistry()
    sends = TrackedProducer(short_timeout_producer(settings), "test", ProducerMetrics(registry).failures,
                            max_attempts=None)
    sends.send(topic, key=b"k", value=b"before")
    assert sends.flush()
    freeze(own_broker.pid)
    try:
        for i in range(20):
            sends.send(topic, key=b"k", value=f"r{i}".encode())
        wait_until(lambda: sends.pending_failures >= 1, 20, "sends to fail while the broker is frozen")
    finally:
        thaw(own_broker.pid)
    assert sends.flush()
    sends.close()
    values = read_all(settings, topic, 21)
    assert {f"r{i}".encode() for i in range(20)} <= set(values)
    retried = registry.get_sample_value("streamfuse_producer_send_failures_total",
                                        {"process": "test", "outcome": "retried"})
    print(f"\nfrozen broker: 20 sends, {retried:.0f} failed sends retried, 0 lost, {len(values) - 1} delivered "
          "(a send that timed out may have reached the broker: at-least-once)")
    assert retried >= 1 and sends.lost == 0


def test_simulator_counts_what_it_cannot_deliver(own_broker):
    settings = Settings(kafka_bootstrap=own_broker.bootstrap, broker="tansu", topic_prefix="lost.",
                        sim={"assets": 2, "rate_hz": 5.0})
    ensure_topics(settings)
    registry = CollectorRegistry()
    pub = SimPublisher(settings, speed=None, run_id="lost")
    sends = TrackedProducer(short_timeout_producer(settings), "sim", ProducerMetrics(registry).failures,
                            max_attempts=1)
    freeze(own_broker.pid)
    thread = threading.Thread(target=pub.run, kwargs={"max_samples": 10, "producer": sends})
    try:
        thread.start()
        thread.join(30)
    finally:
        thaw(own_broker.pid)
    assert not thread.is_alive()
    lost = registry.get_sample_value("streamfuse_producer_send_failures_total", {"process": "sim", "outcome": "lost"})
    print(f"\nsimulator against a frozen broker, one attempt per record: {pub.stats.send_lost} records lost, "
          f"counted {lost:.0f}")
    assert pub.stats.send_lost > 0 and lost == pub.stats.send_lost
    sends.close()
