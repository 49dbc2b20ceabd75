"""The monitor's faust transport: the hook before every commit and a producer flush that
drains faust's buffer, on either profile."""

from __future__ import annotations

import asyncio
import uuid

import faust
from faust.transport.producer import ProducerBuffer

from streamfuse.config import Settings
from streamfuse.faust_transport import Buffer, DrainingTransport, Transport, install
from streamfuse.kafka import faust_config


def app_for(broker: str, tmp_path, hook=None) -> faust.App:
    s = Settings(kafka_bootstrap="127.0.0.1:9", broker=broker)
    app = faust.App(f"t-{uuid.uuid4().hex[:8]}", **faust_config(s), web_enabled=False, store="memory://",
                    datadir=str(tmp_path), autodiscover=False)
    install(app, hook)
    return app


def test_either_profile_gets_the_draining_producer_and_only_tansu_the_consumer(tmp_path):
    tansu, kafka = app_for("tansu", tmp_path / "t"), app_for("kafka", tmp_path / "k")
    assert type(tansu.transport) is Transport and type(kafka.transport) is DrainingTransport
    assert kafka.transport.Consumer.__module__ == "faust.transport.drivers.aiokafka"  # fetch wait: Tansu's only
    for app in (tansu, kafka):
        assert type(app.producer.buffer) is Buffer


def test_every_commit_calls_the_hook_first_on_either_profile(tmp_path):
    for broker in ("tansu", "kafka"):
        calls: list[str] = []
        app = app_for(broker, tmp_path / broker, lambda: calls.append("before_commit"))
        assert type(app.transport) is Transport

        async def commit() -> bool:
            return await app.consumer.force_commit()

        assert asyncio.run(commit()) is False  # nothing acknowledged: nothing to commit
        assert calls == ["before_commit"], broker


def test_the_kafka_profile_keeps_faust_fetch_wait_with_the_hook(tmp_path):
    app = app_for("kafka", tmp_path, lambda: None)

    async def fetch_wait() -> int:
        consumer = app.consumer._new_consumer_thread()._create_worker_consumer(app.transport)
        await consumer.stop()
        return consumer._fetch_max_wait_ms

    assert asyncio.run(fetch_wait()) == 1500  # faust's own (a real broker answers when data arrives)


def test_the_producer_flush_waits_for_a_buffer_slower_than_faust_gives_up_on(tmp_path):
    """faust's buffer flush returns after 0.1 s without a send, and a commit then goes out
    with changelog entries still buffered (a SIGKILL right after loses them). Ours drains
    it, the message being sent included."""
    sent: list[int] = []

    class SlowBuffer(Buffer):
        async def _send(self, fut) -> None:  # faust's send, slowed down
            await asyncio.sleep(0.15)  # a busy machine, a large entry
            sent.append(fut)

    app = app_for("kafka", tmp_path)

    async def flush_three() -> tuple[int, int]:
        producer = app.producer
        producer.buffer = SlowBuffer()
        producer.buffer.app = app
        await producer.buffer.start()
        for i in range(3):
            producer.buffer.put(i)
        await ProducerBuffer.flush(producer.buffer)  # faust's own: gives up
        after_faust = len(sent)
        await producer.flush()
        await producer.buffer.stop()
        return after_faust, len(sent)

    after_faust, after_ours = asyncio.run(flush_three())
    assert after_faust < 3 and after_ours == 3
