"""The worker's sends: a send the broker never acknowledged is counted, reported and sent
again (its batch stays uncommitted); dead letters of oversized records keep a bounded copy."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from streamfuse.config import Settings
from streamfuse.errors import BrokerError, InvalidEvent
from streamfuse.events import decode, encode
from streamfuse.inference import outbox
from streamfuse.inference.feeder import Record
from streamfuse.inference.outbox import DEADLETTER_COPY_BYTES, Delivery, Outbox, dead_letter
from streamfuse.kafka import rd_producer_config
from streamfuse.metrics import WorkerMetrics


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_undelivered_sends_are_counted_reported_and_sent_again(monkeypatch, caplog):
    monkeypatch.setattr(outbox, "RETRY_FIRST_S", 0.05)
    cfg = rd_producer_config(Settings(kafka_bootstrap=f"127.0.0.1:{closed_port()}", broker="kafka"), "t")
    cfg.update({"message.timeout.ms": 200, "logger": logging.getLogger("test.rdkafka")})
    reg = CollectorRegistry()
    out = Outbox(Producer(cfg), WorkerMetrics(reg).produce_failures, {"sf.predictions": "predictions"})
    delivery = Delivery()
    out.send_many("sf.predictions", [(b"a", b"1"), (b"b", b"2")], delivery)
    deadline = time.monotonic() + 10
    counted = 0.0
    with caplog.at_level(logging.WARNING, logger="streamfuse.inference.outbox"):
        while counted < 4 and time.monotonic() < deadline:  # two rounds of two failed sends
            out.producer.poll(0.05)
            assert not out.settled(delivery)
            counted = reg.get_sample_value("streamfuse_worker_produce_failures_total", {"topic": "predictions"}) or 0
    assert counted >= 4 and delivery.rounds >= 1
    assert any("2 sends not delivered" in r.getMessage() for r in caplog.records)
    assert delivery.pending == 2 or len(delivery.failed) == 2  # still trying, never given up
    out.producer.purge()
    out.producer.flush(1)


def test_a_record_the_client_refuses_is_counted_and_stops_the_worker_with_a_clear_error():
    cfg = rd_producer_config(Settings(kafka_bootstrap=f"127.0.0.1:{closed_port()}", broker="kafka"), "t")
    cfg["logger"] = logging.getLogger("test.rdkafka")
    reg = CollectorRegistry()
    out = Outbox(Producer(cfg), WorkerMetrics(reg).produce_failures, {"sf.deadletter": "deadletter"})
    with pytest.raises(BrokerError, match=r"refused a 9000000-byte record for 'sf.deadletter'.*message.max.bytes"):
        out.send("sf.deadletter", None, b"x" * 9_000_000, Delivery())
    assert reg.get_sample_value("streamfuse_worker_produce_failures_total", {"topic": "deadletter"}) == 1.0


def test_an_oversized_record_becomes_a_small_dead_letter_with_its_size():
    big = Record("sf.samples", 2, 41, b"asset-1", b"\x00" * 8_000_000, [("content-type", b"application/msgpack")])
    d = dead_letter(big, InvalidEvent("oversize", "8000000 bytes > limit 2000000"), 2_000_000, 5)
    assert len(d.original) == DEADLETTER_COPY_BYTES and d.original == big.value[:DEADLETTER_COPY_BYTES]
    assert "record of 8000000 bytes" in d.detail and (d.partition, d.offset, d.key) == (2, 41, b"asset-1")
    back = decode(encode(d))
    assert back.reason == "oversize" and back.content_type == "application/msgpack"
    small = Record("sf.samples", 0, 1, None, b"\xc1junk", None)
    assert dead_letter(small, InvalidEvent("undecodable", "x"), 2_000_000, 5).original == b"\xc1junk"


def test_a_batch_is_stamped_acknowledged_when_its_last_send_is():
    delivery = Delivery()
    delivery.sent(2)
    delivery.handed_at = time.monotonic()
    delivery.report(None, None)
    assert delivery.acked_at == 0.0 and delivery.pending == 1  # one still outstanding
    delivery.report(None, None)
    assert delivery.pending == 0 and delivery.acked_at >= delivery.handed_at
