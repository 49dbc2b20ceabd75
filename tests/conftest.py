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
    from streamfuse.models.bootstrap import ensure_demo_bundle

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
    from streamfuse.models.bootstrap import ensure_models

    ensure_models(s)  # imports the trained bundle into this test's registry namespace
    yield s
    StatusStore(connect(s), s.redis_prefix).clear()
    delete_topics(s)


def delete_topics(s: Settings) -> None:
    """Delete a test's topics (its prefix, and the monitor's own faust topics)."""
    from streamfuse.topics import delete_topics as delete

    delete(s, monitor_topics=True)


def add_image_version(settings: Settings, tmp_path: Path, *, corrupt: bool = False, seed: int = 123) -> str:
    """Store a new image model version in the registry (not activated): random weights
    (a bad model), or with ``corrupt`` a weights file truncated after it was stored."""
    import torch

    from streamfuse.models.bundle_io import write_weights
    from streamfuse.models.encoders import create_model
    from streamfuse.models.units import UNIT_WEIGHTS, read_unit_manifest, write_unit
    from streamfuse.models.registry import Registry

    registry = Registry(settings)
    good = registry.active()["image"]
    man = read_unit_manifest(registry.root / "image" / good)
    torch.manual_seed(seed)
    model = create_model(registry.load_unit("image", good).module.sf_config)
    # unique per call: the units directory is shared by the whole test session
    version = f"image-bad{seed}{'c' if corrupt else ''}-{uuid.uuid4().hex[:6]}"
    model.set_version(version)
    work = tmp_path / version
    work.mkdir()
    entry = write_weights(work / UNIT_WEIGHTS, model, {"unit": "image", "version": version})
    manifest = {**man, "version": version, "config": {**man["config"], "version": version},
                "weights": {**man["weights"], **entry, "file": UNIT_WEIGHTS}}
    stored = write_unit(registry.root, manifest, work / UNIT_WEIGHTS)
    if corrupt:
        data = (stored / UNIT_WEIGHTS).read_bytes()
        (stored / UNIT_WEIGHTS).write_bytes(data[: len(data) // 2])
    return version
