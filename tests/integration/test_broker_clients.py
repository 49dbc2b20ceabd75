"""The clients as configured by :mod:`streamfuse.kafka`, against the embedded broker."""

from __future__ import annotations

import os
import time

import pytest
from kafka import TopicPartition

from streamfuse.kafka import FETCH_PARTITION_BYTES, MAX_MESSAGE_BYTES, make_consumer, make_producer
from streamfuse.topics import Topics, ensure_topics

pytestmark = pytest.mark.integration


def test_records_larger_than_a_fetch_get_through_in_order(settings):
    """Fetches are small (fast), but a record bigger than a whole fetch is still delivered."""
    ensure_topics(settings)
    topic = Topics(settings.topic_prefix).samples
    values = [os.urandom(100), os.urandom(3 * FETCH_PARTITION_BYTES), os.urandom(100), os.urandom(MAX_MESSAGE_BYTES // 2)]
    producer = make_producer(settings, "big-producer")
    for v in values:
        producer.send(topic, key=b"asset-0", value=v)  # one key: one partition, in order
    producer.flush()
    producer.close()
    consumer = make_consumer(settings, None, "big-reader")
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    got: list[bytes] = []
    deadline = time.monotonic() + 20
    while len(got) < len(values) and time.monotonic() < deadline:
        for msgs in consumer.poll(timeout_ms=500).values():
            got += [m.value for m in msgs]
    consumer.close()
    assert got == values


def test_a_worker_without_its_topics_says_how_to_create_them(settings, trained_bundle):
    from streamfuse.errors import BrokerError
    from streamfuse.inference.worker import InferenceWorker
    from streamfuse.models.bundle_io import load_bundle

    fresh = settings.model_copy(update={"topic_prefix": settings.topic_prefix + "missing."})
    worker = InferenceWorker(fresh, load_bundle(trained_bundle, "cpu"), worker_id="no-topics")
    with pytest.raises(BrokerError, match="control topic .*streamfuse topics"):
        worker.run(max_samples=1)
