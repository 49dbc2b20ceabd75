"""Helpers of the gateway tests: MQTT publishing on the real Mosquitto, reading the
gateway's outputs back from Kafka, running a gateway or the synchronizer in a thread."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from streamfuse.config import Settings
from streamfuse.events import DeadLetter, Sample, SensorEvent, decode
from streamfuse.kafka import make_consumer
from streamfuse.topics import Topics

MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883


def mqtt_client(client_id: str | None = None, v5: bool = True):
    """A connected paho client (network loop running) on the shared Mosquitto."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"it-pub-{uuid.uuid4().hex[:8]}",
                    protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.connect(MQTT_HOST, MQTT_PORT, 30)
    c.loop_start()
    return c


def publish(client, messages: list[tuple[str, bytes, dict[str, str] | None]], timeout_s: float = 30.0) -> None:
    """Publish at QoS 1 and wait until the broker acknowledged every message."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    infos = []
    for topic, payload, user in messages:
        props = None
        if user:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = list(user.items())
        infos.append(client.publish(topic, payload, qos=1, properties=props))
    deadline = time.monotonic() + timeout_s
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert info.is_published(), f"the broker did not acknowledge message {info.mid} in {timeout_s} s"


def drop_session(client_id: str) -> None:
    """Remove a test's persistent session from the shared broker (clean start, no expiry)."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect(MQTT_HOST, MQTT_PORT, 30, clean_start=True)
    c.loop_start()
    c.disconnect()
    c.loop_stop()


class Outputs:
    """Reads the sensor topics, samples and dead letters of a prefix from the start."""

    def __init__(self, settings: Settings) -> None:
        from kafka import TopicPartition

        t = Topics(settings.topic_prefix)
        names = [t.sensor(m) for m in ("image", "audio", "series")] + [t.samples, t.deadletter]
        self.consumer = make_consumer(settings, None, "it-ingest-outputs")
        self.tps = [TopicPartition(n, p) for n in names for p in range(settings.partitions)]
        self.consumer.assign(self.tps)
        self.consumer.seek_to_beginning(*self.tps)
        self.events: list[SensorEvent] = []
        self.samples: list[Sample] = []
        self.dead: list[DeadLetter] = []

    def poll(self) -> None:
        for msgs in self.consumer.poll(timeout_ms=100).values():
            for msg in msgs:
                ev = decode(msg.value, check_payloads=False)
                {SensorEvent: self.events, Sample: self.samples, DeadLetter: self.dead}[type(ev)].append(ev)

    def wait(self, predicate: Callable[[], bool], what: str, timeout_s: float = 30.0,
             alive: Callable[[], str | None] = lambda: None) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            problem = alive()
            if problem:
                raise AssertionError(f"{problem} while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} "
                                     f"({len(self.events)} events, {len(self.dead)} dead letters, "
                                     f"{len(self.samples)} samples)")
            self.poll()

    def close(self) -> None:
        self.consumer.close()


class Runner:
    """Runs ``target(stop)`` in a thread; a crash fails the waiting test at once."""

    def __init__(self, target: Callable[[threading.Event], object]) -> None:
        self.stop, self.error = threading.Event(), None
        self.thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self.thread.start()

    def _run(self, target) -> None:
        try:
            target(self.stop)
        except BaseException as exc:  # reported by the waiting test
            self.error = exc

    def problem(self) -> str | None:
        if self.error is not None or not self.thread.is_alive():
            return f"the thread stopped ({self.error!r})"
        return None

    def join(self, timeout_s: float = 30.0) -> None:
        self.stop.set()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive() and self.error is None, self.error


def metric(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def write_mapping(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
