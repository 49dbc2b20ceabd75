"""The clients as configured by :mod:`streamfuse.kafka`, against the embedded broker."""

from __future__ import annotations

import os
import time

import pytest
from kafka import TopicPartition

from streamfuse.kafka import FETCH_PARTITION_BYTES, MAX_MESSAGE_BYTES, make_consumer, make_producer, make_rd_producer
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


def test_both_clients_put_a_key_on_the_same_partition(settings):
    """Samples (kafka-python) and predictions (librdkafka) of an asset are co-partitioned:
    the same key lands on the same partition number whichever client sent it."""
    ensure_topics(settings)
    topics = Topics(settings.topic_prefix)
    keys = [f"asset-{i}".encode() for i in range(24)]
    py = make_producer(settings, "copart-py")
    py_parts = {k: py.send(topics.samples, key=k, value=b"s").get(timeout=20).partition for k in keys}
    py.close()
    rd, rd_parts = make_rd_producer(settings, "copart-rd"), {}
    for k in keys:
        rd.produce(topics.predictions, key=k, value=b"p",
                   on_delivery=lambda err, msg: rd_parts.__setitem__(msg.key(), msg.partition()))
    rd.flush(20)
    assert len(set(py_parts.values())) > 1  # the keys spread over the partitions
    assert rd_parts == py_parts


def test_a_worker_without_its_topics_says_how_to_create_them(settings, trained_bundle):
    from streamfuse.errors import BrokerError
    from streamfuse.inference.worker import InferenceWorker
    from streamfuse.models.bundle_io import load_bundle

    fresh = settings.model_copy(update={"topic_prefix": settings.topic_prefix + "missing."})
    worker = InferenceWorker(fresh, load_bundle(trained_bundle, "cpu"), worker_id="no-topics")
    with pytest.raises(BrokerError, match="control topic .*streamfuse topics"):
        worker.run(max_samples=1)
