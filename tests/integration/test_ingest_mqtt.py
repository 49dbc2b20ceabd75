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
from streamfuse.demo import spawn, stop_children
from streamfuse.ingest.mapping import load_mapping
from streamfuse.ingest.mqtt import MqttGateway
from streamfuse.sim.plant import Plant, PlantConfig
from streamfuse.sync import SyncConfig, slot_id
from streamfuse.sync_app import run_sync
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
        assert gw.connected.wait(10), "the gateway did not connect to Mosquitto"
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
    mapping = write_mapping(tmp_path / "m.toml", json_mapping(prefix))
    messages = readings(prefix, 60, 200, as_json=True)  # 360 readings, 2 assets x 3 modalities x 60 slots
    args = ("mqtt", "--mapping", str(mapping), "--protocol", "3.1.1")
    logs = tmp_path / "logs"
    out, pub = Outputs(mqtt_settings), mqtt_client()
    gateway = spawn("ingest", mqtt_settings, logs, *args)
    procs = [gateway]
    try:
        wait_subscribed(pub, out, prefix, gateway)
        publisher = threading.Thread(target=publish, args=(pub, messages))
        publisher.start()
        out.wait(lambda: len(out.events) >= 40, "40 events before the kill", alive=lambda: _exited(gateway))
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.wait(10)
        publisher.join(30)
        assert not publisher.is_alive()
        out.poll()
        at_kill = len({e.event_id for e in out.events})
        assert at_kill < len(messages), "every message was through before the kill: nothing was in flight"

        procs.append(spawn("ingest", mqtt_settings, logs, *args))  # same client id: the broker redelivers
        out.wait(lambda: len({e.event_id for e in out.events}) >= len(messages), "every message as an event",
                 alive=lambda: _exited(procs[-1]))
    finally:
        stop_children(procs)
        pub.loop_stop()
        pub.disconnect()
    out.poll()

    # Each message became an event; a redelivered one has the same id (counted here).
    ids = Counter(e.event_id for e in out.events)
    assert len(ids) == len(messages)
    keys = Counter((e.asset_id, e.modality, e.ts_ms) for e in out.events)
    assert set(keys) == {(t.split("/")[-2], m, json.loads(p)["ts_ms"]) for t, p, _ in messages
                         for m in MODALITIES if t.endswith(DEVICE[m])}
    duplicates = sum(n - 1 for n in ids.values())
    probes = len(out.dead)
    assert all(d.reason == "unmapped" and d.source_topic == f"{prefix}/probe" for d in out.dead)

    # The synchronizer absorbs the duplicates: each slot once, every reading in it once.
    config = SyncConfig(period_ms=200, tolerance_ms=50, grace_ms=3000, idle_ms=300)
    registry = CollectorRegistry()
    sync = Runner(lambda stop: run_sync(mqtt_settings, config=config, stop=stop, registry=registry))
    try:
        out.wait(lambda: len(out.samples) >= 120, "120 samples", alive=sync.problem)
    finally:
        sync.join()
    out.poll()
    out.close()
    assert sorted(s.sample_id for s in out.samples) == sorted(
        slot_id(f"asset-{a}", START_MS + k * 200) for a in range(2) for k in range(60))
    assert all(s.missing == () and len(s.readings) == 3 for s in out.samples)
    dup_metric = sum(metric(registry, "streamfuse_sync_duplicate_readings_total", modality=m) for m in MODALITIES)
    assert dup_metric == duplicates
    assert len(out.dead) == probes  # no duplicate was late, extra or rejected


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
