"""The worker under faults of its neighbours, on the embedded broker: poison records on
the samples topic (each one dead-lettered with a reason, every valid sample predicted, the
worker alive), and its own Redis stopped and restarted while it serves (0 samples without
a prediction, commands applied and acked during the outage, the registry caught up after)."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import add_image_version
from kafka import TopicPartition
from poison import malformed_records

from streamfuse.events import (
    Ack,
    Command,
    DeadLetter,
    Prediction,
    decode,
    encode,
    headers,
)
from streamfuse.inference.worker import InferenceWorker
from streamfuse.kafka import make_consumer, make_producer
from streamfuse.models.registry import Registry
from streamfuse.sim.plant import Plant, PlantConfig
from streamfuse.topics import Topics, ensure_topics

pytestmark = pytest.mark.integration


class Running:
    """An InferenceWorker on a thread; ``error`` is what stopped it, if anything did."""

    def __init__(self, settings, registry: Registry) -> None:
        self.worker = InferenceWorker(settings, registry.load_active("cpu"), worker_id=f"w-{uuid.uuid4().hex[:6]}",
                                      model_registry=registry)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.error = exc

    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(timeout=30)


class Outputs:
    """Reads predictions, dead letters and acks from the start."""

    def __init__(self, settings) -> None:
        t = Topics(settings.topic_prefix)
        self.consumer = make_consumer(settings, None, "test-outputs")
        tps = [TopicPartition(name, p) for name in (t.predictions, t.deadletter, t.acks)
               for p in sorted(self.consumer.partitions_for_topic(name) or {0})]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.predicted: dict[str, Prediction] = {}
        self.dead: list[DeadLetter] = []
        self.acks: list[Ack] = []

    def poll(self) -> None:
        for msgs in self.consumer.poll(timeout_ms=200).values():
            for m in msgs:
                ev = decode(m.value, check_payloads=False)
                if isinstance(ev, Prediction):
                    self.predicted[ev.sample_id] = ev
                elif isinstance(ev, DeadLetter):
                    self.dead.append(ev)
                else:
                    self.acks.append(ev)

    def wait(self, predicate, what: str, running: Running, timeout_s: float = 40) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            assert running.alive(), f"the worker stopped while waiting for {what}: {running.error!r}"
            if predicate():
                return
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def produce(settings, records: list[tuple[bytes, bytes]]) -> list[tuple[int, int]]:
    """Send ``(key, value)`` records to ``samples``; returns each one's (partition, offset)."""
    producer = make_producer(settings, "test-poison")
    topic = Topics(settings.topic_prefix).samples
    futures = [producer.send(topic, key=k, value=v, headers=headers()) for k, v in records]
    producer.flush()
    where = [(f.get(timeout=30).partition, f.get(timeout=30).offset) for f in futures]
    producer.close()
    return where


def test_poison_records_are_dead_lettered_and_every_valid_sample_is_predicted(settings):
    settings = settings.model_copy(update={"max_payload_bytes": 100_000})
    ensure_topics(settings)
    valid = [s for s, _ in Plant(PlantConfig(), run_id=f"p{uuid.uuid4().hex[:4]}").dataset(200, seed=4)]
    raw = [encode(s) for s in valid]
    bad = malformed_records(raw, 2500, seed=9, oversize_to=settings.max_payload_bytes)
    bad += [(b"\x00" * 5_000_000, True, "oversize"), (b"\x00" * 8_000_000, True, "oversize")]
    records, kinds = [], {}
    for i, (value, _, kind) in enumerate(bad):  # valid samples spread among the bad records
        records.append((b"asset-x", value))
        kinds[len(records) - 1] = kind
        if i % 5 == 0 and i // 5 < len(raw):
            records.append((valid[i // 5].asset_id.encode(), raw[i // 5]))
    where = produce(settings, records)
    running = Running(settings, Registry(settings))
    out = Outputs(settings)
    sure = {where[i] for i, k in kinds.items() if k != "bit_flips"}
    try:
        out.wait(lambda: {s.sample_id for s in valid} <= set(out.predicted)
                 and sure <= {(d.partition, d.offset) for d in out.dead}, "predictions and dead letters", running)
    finally:
        running.stop()
        out.consumer.close()
    assert running.error is None
    dead_at = {(d.partition, d.offset): d for d in out.dead}
    assert all(d.reason and d.detail for d in out.dead)
    by_kind: dict[str, set[str]] = {}
    for i, kind in kinds.items():
        if where[i] in dead_at:
            by_kind.setdefault(kind, set()).add(dead_at[where[i]].reason)
    assert by_kind["oversize"] == {"oversize"} and by_kind["unknown_schema"] == {"unknown_schema"}
    assert by_kind["non_jpeg_image"] == {"bad_image"} and by_kind["nan_series"] == {"non_finite"}
    huge = [d for d in out.dead if "record of 8000000 bytes" in d.detail]
    assert len(huge) == 1 and len(huge[0].original) <= 64 * 1024


# ---------------------------------------------------------------------------- Redis outage


class OwnRedis:
    """A redis-server of this test on a free port, saving to ``workdir`` on shutdown so that
    a restart finds its data (never the shared Redis)."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        import redis

        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            redis.Redis(port=self.port).shutdown(save=True)
        except redis.ConnectionError:
            pass  # it closes the connection as it exits
        self.proc.wait(timeout=10)


def test_the_worker_serves_through_a_redis_outage_and_catches_up(settings, tmp_path: Path, caplog):
    from streamfuse.models.bootstrap import ensure_models

    redis_server = OwnRedis(tmp_path)
    redis_server.start()
    settings = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{redis_server.port}/0"})
    ensure_topics(settings)
    registry = ensure_models(settings)
    good = registry.active()["image"]
    new = add_image_version(settings, tmp_path, seed=21)
    samples = [s for s, _ in Plant(PlantConfig(), run_id=f"r{uuid.uuid4().hex[:4]}").dataset(300, seed=6)]
    running = Running(settings, Registry(settings))
    out = Outputs(settings)
    producer = make_producer(settings, "test-outage")
    topic, control = Topics(settings.topic_prefix).samples, Topics(settings.topic_prefix).control
    mask = Command(f"mask-{uuid.uuid4().hex[:6]}", "mask_modality", 0, modality="audio")
    activate = Command(f"act-{uuid.uuid4().hex[:6]}", "activate_model", 0, modality="image", version=new)
    rollback = Command(f"rb-{uuid.uuid4().hex[:6]}", "rollback_model", 0, modality="image")

    def send(batch, *commands: Command) -> None:
        for s in batch:
            producer.send(topic, key=s.asset_id.encode(), value=encode(s), headers=headers())
        for c in commands:
            producer.send(control, key=b"image", value=encode(c), headers=headers())
        producer.flush()

    def acked(c: Command) -> list[Ack]:
        return [a for a in out.acks if a.command_id == c.command_id]

    def up() -> float:
        return running.worker.metrics_registry.get_sample_value("streamfuse_redis_up", {"process": "worker"})

    try:
        send(samples[:100])
        out.wait(lambda: len(out.predicted) >= 100, "serving before the outage", running)
        with caplog.at_level(logging.WARNING, logger="streamfuse.redislink"):
            redis_server.stop()
            send(samples[100:200], mask, activate, rollback)
            out.wait(lambda: acked(mask) and acked(activate) and up() == 0.0, "acks during the outage", running)
            out.wait(lambda: len(out.predicted) >= 200, "serving during the outage", running)
            assert acked(activate)[0].status == "applied" and acked(activate)[0].versions["image"] == new
            assert acked(mask)[0].status == "applied" and acked(mask)[0].masked == ("audio",)
            assert not acked(rollback)  # its target is in Redis: it waits for Redis
            down_for = time.monotonic()
            out.wait(lambda: time.monotonic() - down_for > 4, "the outage to last", running)
            redis_server.start()
            send(samples[200:])
            out.wait(lambda: len(out.predicted) >= 300 and acked(rollback) and up() == 1.0,
                     "serving, the waiting rollback and the gauge after the outage", running, timeout_s=60)
        assert acked(rollback)[0].status == "applied" and acked(rollback)[0].versions["image"] == good
        history = [(h["action"], h["version"]) for h in Registry(settings).history("image")]
        assert history[-2:] == [("activate", new), ("activate", good)]  # caught up, in order
        assert Registry(settings).active()["image"] == good
    finally:
        running.stop()
        producer.close()
        out.consumer.close()
        redis_server.stop()
    assert running.error is None
    assert {s.sample_id for s in samples} <= set(out.predicted)
    warnings = [r.getMessage() for r in caplog.records if r.name == "streamfuse.redislink"]
    assert len(warnings) == 2 and "unreachable" in warnings[0] and "reachable again" in warnings[1], warnings
