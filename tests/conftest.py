"""Shared fixtures: one embedded broker per test run, unique topic and Redis prefixes
per test, and one small model bundle trained once per run on simulator data."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from streamfuse.config import Settings

collect_ignore = ["../streamfuse/__main__.py"]


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def broker():
    from streamfuse.embedded import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> Path:
    """A small but meaningful bundle: the demo recipe on fewer samples and epochs."""
    from streamfuse.demo import ensure_demo_bundle

    root = tmp_path_factory.mktemp("models")
    settings = Settings(model_dir=root, bundle="test")
    return ensure_demo_bundle(settings, epochs=4, sizes=(400, 160, 160))


@pytest.fixture
def settings(broker, trained_bundle) -> Settings:
    """Settings for one test: its own topic prefix, Redis prefix and consumer groups."""
    from streamfuse.store import StatusStore, connect

    tag = uuid.uuid4().hex[:8]
    s = Settings(
        kafka_bootstrap=broker.bootstrap,
        broker="tansu",
        topic_prefix=f"t{tag}.",
        redis_prefix=f"streamfuse-test:{tag}:",
        model_dir=trained_bundle.parent,
        bundle=trained_bundle.name,
        worker={"group": f"workers-{tag}", "max_batch": 16, "max_delay_ms": 20, "device": "cpu"},
        monitor={"app_id": f"monitor-{tag}", "kpi_window_ms": 5000, "label_grace_ms": 15000},
    )
    yield s
    StatusStore(connect(s), s.redis_prefix).clear()
    _delete_topics(s)


def _delete_topics(s: Settings) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    try:
        names = [n for n in admin.list_topics() if n.startswith(s.topic_prefix) or s.monitor.app_id in n]
        if names:
            admin.delete_topics(names)
    finally:
        admin.close()
