"""The monitor's faust transport: the hook before every commit, on either broker profile."""

from __future__ import annotations

import asyncio
import uuid

import faust

from streamfuse.config import Settings
from streamfuse.faust_transport import Transport, install
from streamfuse.kafka import faust_config


def app_for(broker: str, tmp_path) -> faust.App:
    s = Settings(kafka_bootstrap="127.0.0.1:9", broker=broker)
    return faust.App(f"t-{uuid.uuid4().hex[:8]}", **faust_config(s), web_enabled=False, store="memory://",
                     datadir=str(tmp_path), autodiscover=False)


def test_every_commit_calls_the_hook_first_on_either_profile(tmp_path):
    for broker in ("tansu", "kafka"):
        calls: list[str] = []
        app = app_for(broker, tmp_path / broker)
        install(app, lambda: calls.append("before_commit"))
        assert type(app.transport) is Transport

        async def commit() -> bool:
            return await app.consumer.force_commit()

        assert asyncio.run(commit()) is False  # nothing acknowledged: nothing to commit
        assert calls == ["before_commit"], broker


def test_without_a_hook_faust_own_schemes_keep_faust_transport(tmp_path):
    app = app_for("kafka", tmp_path)
    install(app)
    assert type(app.transport) is not Transport and type(app.producer_transport) is not Transport


def test_the_kafka_profile_keeps_faust_fetch_wait_with_the_hook(tmp_path):
    app = app_for("kafka", tmp_path)
    install(app, lambda: None)

    async def fetch_wait() -> int:
        consumer = app.consumer._new_consumer_thread()._create_worker_consumer(app.transport)
        await consumer.stop()
        return consumer._fetch_max_wait_ms

    assert asyncio.run(fetch_wait()) == 1500  # faust's own (a real broker answers when data arrives)
