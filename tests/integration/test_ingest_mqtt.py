"""``streamfuse ingest mqtt`` against the real Mosquitto (127.0.0.1:1883) and the embedded
Kafka broker: bad input, a SIGKILL with QoS 1 messages in flight, and end to end to
predictions through sync and a worker. Each test has its own MQTT topic prefix, client
ids and Kafka topics, and removes its persistent session afterwards."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from ingest_helpers import Outputs, Runner, drop_session, metric, mqtt_client, publish, write_mapping
from prometheus_client import CollectorRegistry

from streamfuse.config import Settings
from streamfuse.demo import Observer
from streamfuse.procs import spawn, stop_children
from streamfuse.ingest.mapping import load_mapping
from streamfuse.ingest.mqtt import MqttGateway
from streamfuse.sim.plant import Plant, PlantConfig
from streamfuse.sync.core import SyncConfig, slot_id
from streamfuse.sync.app import run_sync
from streamfuse.topics import ensure_topics

pytestmark = pytest.mark.integration

START_MS = 1_800_000_000_000
MODALITIES = ("image", "audio", "series")
DEVICE = {"image": "camera", "audio": "microphone", "series": "vibration"}


def json_mapping(prefix: str) -> str:
    """Every modality as JSON with base64 data and the device's own time."""
    return f'mqtt_subscribe = ["{prefix}/#"]\n' + "".join(
        f'[[mqtt]]\ntopic = "{prefix}/{{line}}/{{asset}}/{DEVICE[m]}"\nmodality = "{m}"\nformat = "json"\n'
        f'time = "payload"\n' + ("sample_rate = 8000\n" if m == "audio" else "") for m in MODALITIES)


def binary_mapping(prefix: str) -> str:
    """Plain bytes (JPEG, PCM16, float32) with the time in an MQTT 5 user property."""
    return (f'[[mqtt]]\ntopic = "{prefix}/{{line}}/{{asset}}/camera"\nmodality = "image"\nformat = "image"\n'
            f'time = "property"\n'
            f'[[mqtt]]\ntopic = "{prefix}/{{line}}/{{asset}}/microphone"\nmodality = "audio"\nformat = "pcm16"\n'
            f'sample_rate = 8000\ntime = "property"\n'
            f'[[mqtt]]\ntopic = "{prefix}/{{line}}/{{asset}}/vibration"\nmodality = "series"\nformat = "float32"\n'
            f'shape = [256]\ntime = "property"\n')


def readings(prefix: str, slots: int, period_ms: int, *, as_json: bool, assets: int = 2):
    """(topic, payload, user properties) of ``slots`` simulated samples per asset, slot by slot."""
    plant = Plant(PlantConfig(assets=assets, lines=2, seed=3), start_ms=START_MS)
    out = []
    for k in range(slots):
        ts = START_MS + k * period_ms
        for a in range(assets):
            sample, _ = plant.sample(a, k, ts)
            for m in MODALITIES:
                topic = f"{prefix}/{sample.line_id}/{sample.asset_id}/{DEVICE[m]}"
                payload = sample.readings[m].payload
                if as_json:
                    body = json.dumps({"ts_ms": ts, "data": base64.b64encode(payload).decode()}).encode()
                    out.append((topic, body, None))
                else:
                    out.append((topic, payload, {"ts_ms": str(ts)}))
    return out


@pytest.fixture
def mqtt_settings(broker, tmp_path: Path):
    """Own Kafka topics and MQTT prefix / client id; the session is removed afterwards."""
    from conftest import delete_topics

    tag = uuid.uuid4().hex[:8]
    s = Settings(kafka_bootstrap=broker.bootstrap, broker="tansu", topic_prefix=f"i{tag}.",
                 ingest={"mqtt": {"client_id": f"it-ingest-{tag}", "inflight": 20}})
    ensure_topics(s)
    yield s
    drop_session(s.ingest.mqtt.client_id)
    delete_topics(s)


def test_malformed_mqtt_messages_are_dead_lettered_and_every_valid_one_arrives(mqtt_settings, tmp_path: Path):
    prefix = f"it/{uuid.uuid4().hex[:8]}"
    mapping = load_mapping(write_mapping(tmp_path / "m.toml", json_mapping(prefix)))
    valid = readings(prefix, 10, 200, as_json=True)  # 60 readings
    bad_kinds = [  # (topic suffix, payload, expected reason)
        ("line-0/asset-0/camera", json.dumps({"ts_ms": START_MS, "data": base64.b64encode(b"GIF89a").decode()}),
         "bad_image"),
        ("line-0/asset-0/microphone", json.dumps({"ts_ms": START_MS, "data": "AAE=AA"}), "bad_field"),
        ("line-1/asset-1/vibration", "{not json", "undecodable"),
        ("line-1/asset-1/vibration", json.dumps({"data": [1.0, 2.0]}), "missing_field"),
        ("line-1/asset-1/vibration", '{"ts_ms": 1800000000000, "data": [1.0, NaN]}', "non_finite"),
        ("line-1/asset-1/thermometer", json.dumps({"ts_ms": START_MS, "data": [20.5]}), "unmapped"),
        ("line-1//vibration", json.dumps({"ts_ms": START_MS, "data": [1.0]}), "bad_field"),
        ("line-0/asset-0/microphone", json.dumps({"ts_ms": START_MS, "data": "AAEC"}), "bad_audio"),
    ]
    bad = [(f"{prefix}/{bad_kinds[i % 8][0]}", f"{bad_kinds[i % 8][1]}".encode(), None) for i in range(1000)]
    mixed = []  # a bad message between every few good ones
    for i, msg in enumerate(bad):
        mixed.append(msg)
        if i % 16 == 0 and valid:
            mixed.append(valid.pop(0))
    mixed += valid
    registry = CollectorRegistry()
    gw = MqttGateway(mqtt_settings, mapping, registry)
    runner, out, pub = Runner(gw.run), Outputs(mqtt_settings), mqtt_client()
    try:
        assert gw.subscribed.wait(10), "the gateway did not subscribe on Mosquitto"
        publish(pub, mixed)
        out.wait(lambda: len(out.events) >= 60 and len(out.dead) >= 1000, "60 events and 1000 dead letters",
                 alive=runner.problem)
        runner.join()
    finally:
        pub.loop_stop()
        pub.disconnect()
        runner.stop.set()
    out.poll()
    out.close()

    # Every valid reading arrived once, with the device's time; nothing else became an event.
    expected = Counter((t.split("/")[-2], t.split("/")[-1], json.loads(p)["ts_ms"])
                       for t, p, _ in mixed if not any(t.endswith(k[0]) and p == k[1].encode() for k in bad_kinds))
    got = Counter((e.asset_id, DEVICE[e.modality], e.ts_ms) for e in out.events)
    assert got == expected and len(got) == 60
    assert all(e.time_source == "device" for e in out.events)

    # Every malformed message is a dead letter with its reason, its topic and its bytes.
    assert len(out.dead) == 1000
    assert Counter(d.reason for d in out.dead) == Counter({k[2]: 125 for k in bad_kinds[:6]} | {
        "bad_field": 250, "bad_audio": 125})
    sent = Counter((t, p) for t, p, _ in bad)
    assert Counter((d.source_topic, d.original) for d in out.dead) == sent
    assert all(d.component == "ingest-mqtt" and d.detail for d in out.dead)

    # The gateway's metrics tell the same story; everything was acknowledged.
    assert metric(registry, "streamfuse_ingest_messages_total", gateway="mqtt") == 1060
    assert sum(metric(registry, "streamfuse_ingest_events_total", gateway="mqtt", modality=m) for m in MODALITIES) == 60
    assert metric(registry, "streamfuse_ingest_dead_letters_total", gateway="mqtt", reason="unmapped") == 125
    assert metric(registry, "streamfuse_ingest_delivery_failures_total", gateway="mqtt") == 0
    assert gw.sink.pending == 0 and len(gw.acks) == 0


def test_gateway_killed_with_messages_in_flight_loses_none(mqtt_settings, tmp_path: Path):
    """MQTT 3.1.1, persistent session: SIGKILL mid-stream, restart with the same client id."""
    prefix = f"it/{uuid.uuid4().hex[:8]}"
    path = write_mapping(tmp_path / "m.toml", json_mapping(prefix))
    messages = readings(prefix, 30, 200, as_json=True)  # 180 readings, 2 assets x 3 modalities x 30 slots
    settings = mqtt_settings.model_copy(update={"ingest": mqtt_settings.ingest.model_copy(update={
        "mqtt": mqtt_settings.ingest.mqtt.model_copy(update={"protocol": "3.1.1"})})})
    out, pub = Outputs(settings), mqtt_client()
    gateway = spawn("ingest", settings, tmp_path / "logs", "mqtt", "--mapping", str(path), "--protocol", "3.1.1",
                    "--client-id", settings.ingest.mqtt.client_id)
    sync_registry, restarted, sync = CollectorRegistry(), None, None
    config = SyncConfig(period_ms=200, tolerance_ms=50, grace_ms=3000, idle_ms=300)
    try:
        wait_subscribed(pub, out, prefix, gateway)
        publisher = threading.Thread(target=publish_paced, args=(pub, messages))
        publisher.start()
        out.wait(lambda: len(out.events) >= 24, "24 events before the kill", alive=lambda: _exited(gateway))
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.wait(10)
        publisher.join(30)
        assert not publisher.is_alive()
        out.poll()
        assert len({e.event_id for e in out.events}) < len(messages), "nothing was in flight at the kill"

        sync = Runner(lambda stop: run_sync(settings, config=config, stop=stop, registry=sync_registry))
        restarted = Runner(MqttGateway(settings, load_mapping(path)).run)  # same client id: the broker redelivers
        out.wait(lambda: len({e.event_id for e in out.events}) >= len(messages) and len(out.samples) >= 60,
                 "every message as an event, and 60 samples", alive=lambda: restarted.problem() or sync.problem())
    finally:
        stop_children([gateway])
        for runner in (restarted, sync):
            if runner is not None:
                runner.join()
        pub.loop_stop()
        pub.disconnect()
    out.poll()
    out.close()

    # Each message became an event; a redelivered one has the same id (counted here).
    ids = Counter(e.event_id for e in out.events)
    assert len(ids) == len(messages)
    assert {(e.asset_id, e.modality, e.ts_ms) for e in out.events} == {
        (t.split("/")[-2], m, json.loads(p)["ts_ms"]) for t, p, _ in messages for m in MODALITIES
        if t.endswith(DEVICE[m])}
    duplicates = sum(n - 1 for n in ids.values())

    # The synchronizer absorbed the duplicates: each slot once, every reading in it once.
    assert sorted(s.sample_id for s in out.samples) == sorted(
        slot_id(f"asset-{a}", START_MS + k * 200) for a in range(2) for k in range(30))
    assert all(s.missing == () and len(s.readings) == 3 for s in out.samples)
    assert sum(metric(sync_registry, "streamfuse_sync_duplicate_readings_total", modality=m)
               for m in MODALITIES) == duplicates
    # Dead letters: only the probes; no duplicate was late, extra or rejected.
    assert out.dead and all(d.reason == "unmapped" and d.source_topic == f"{prefix}/probe" for d in out.dead)


def publish_paced(pub, messages, per_slot: int = 6, pause_s: float = 0.02) -> None:
    """A plant's pace (one slot of readings, then a pause), so that the kill lands mid-stream."""
    for i in range(0, len(messages), per_slot):
        publish(pub, messages[i:i + per_slot])
        time.sleep(pause_s)  # a publishing rate, not a synchronization


def wait_subscribed(pub, out: Outputs, prefix: str, gateway) -> None:
    """Probe (unmapped topic: a dead letter) until the gateway answers: it is subscribed."""
    deadline = time.monotonic() + 30
    while not out.dead:
        assert time.monotonic() < deadline and gateway.poll() is None, "the gateway did not subscribe"
        publish(pub, [(f"{prefix}/probe", b"probe", None)])
        end = time.monotonic() + 0.5
        while not out.dead and time.monotonic() < end:
            out.poll()


def _exited(proc) -> str | None:
    return None if proc.poll() is None else f"the gateway exited with {proc.returncode}"


def test_mqtt_readings_become_predictions_end_to_end(settings, tmp_path: Path):
    """Two assets x three modalities as plain bytes over MQTT 5 → gateway → sync → worker."""
    ensure_topics(settings)
    prefix = f"it/{uuid.uuid4().hex[:8]}"
    client_id = f"it-e2e-{uuid.uuid4().hex[:8]}"
    s = settings.model_copy(update={"ingest": settings.ingest.model_copy(update={
        "mqtt": settings.ingest.mqtt.model_copy(update={"client_id": client_id})})})
    mapping = load_mapping(write_mapping(tmp_path / "m.toml", binary_mapping(prefix)))
    period = 1000 // int(s.sim.rate_hz)  # the sync's slots: settings.sim.rate_hz
    messages = readings(prefix, 6, period, as_json=False)  # 6 samples per asset
    expected = {slot_id(f"asset-{a}", START_MS + k * period) for a in range(2) for k in range(6)}
    worker = spawn("worker", s, tmp_path / "logs")
    sync = Runner(lambda stop: run_sync(s, config=SyncConfig.for_rate(s.sim.rate_hz, idle_ms=300), stop=stop))
    gw = MqttGateway(s, mapping)
    gateway, observer, pub = Runner(gw.run), Observer(s, START_MS), mqtt_client()
    try:
        assert gw.subscribed.wait(10), "the gateway did not subscribe on Mosquitto"
        publish(pub, messages)
        deadline = time.monotonic() + 60
        while set(observer.predictions) < expected:
            problem = gateway.problem() or sync.problem() or _exited(worker)
            assert problem is None and time.monotonic() < deadline, \
                f"{problem or 'timed out'}: {len(observer.predictions)} of {len(expected)} predictions"
            observer.poll(200)
    finally:
        stop_children([worker])
        gateway.join()
        sync.join()
        pub.loop_stop()
        pub.disconnect()
        observer.consumer.close()
        drop_session(client_id)

    assert set(observer.predictions) == expected
    for p in observer.predictions.values():
        assert p.missing == () and set(p.modality_probs) == set(MODALITIES), p.sample_id
        assert p.line_id == f"line-{int(p.asset_id[-1]) % 2}"
    assert observer.counts["deadletter"] == 0
    assert gw.sink.pending == 0 and gw.sink.acked == len(messages)
