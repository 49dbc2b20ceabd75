"""The gateways' pure logic: the mapping file, payload decoding, gaps, ack ordering."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamfuse.errors import ConfigError, InvalidEvent
from streamfuse.events import decode, encode
from streamfuse.ingest.decode import to_event
from streamfuse.ingest.gaps import GapTracker
from streamfuse.ingest.mapping import load_mapping, parse_mapping
from streamfuse.ingest.mqtt import AckQueue

MAPPING = """
mqtt_subscribe = ["plant/#"]

[[mqtt]]
topic = "plant/{line}/{asset}/camera"
modality = "image"
format = "image"

[[mqtt]]
topic = "plant/{line}/{asset}/microphone"
modality = "audio"
format = "pcm16"
sample_rate = 16000

[[mqtt]]
topic = "plant/{line}/{asset}/vibration"
modality = "series"
format = "json"
time = "payload"

[[mqtt]]
topic = "raw/{asset}/vibration"
modality = "series"
format = "float32"
shape = [2, 2]

[[opcua]]
node = "ns=2;s=Press1.Vibration"
asset = "press-1"
line = "line-0"
modality = "series"
format = "float32"
time = "source"
sampling_interval_ms = 50
queue_size = 4
"""


@pytest.fixture
def mapping(tmp_path: Path):
    path = tmp_path / "mapping.toml"
    path.write_text(MAPPING)
    return load_mapping(path)


def png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_mapping_filters_and_captures(mapping):
    # plant/# covers the rules' own filters: subscribing to both would deliver a message twice
    assert mapping.mqtt_filters == ("plant/#", "raw/+/vibration")
    rule, caps = mapping.match_topic("plant/line-1/press-2/camera")
    assert (rule.modality, rule.fill(rule.asset, caps), rule.fill(rule.line, caps)) == ("image", "press-2", "line-1")
    assert mapping.match_topic("plant/line-1/press-2/thermometer") is None
    assert mapping.match_topic("plant/line-1/camera") is None
    node = mapping.node_rules()["ns=2;s=Press1.Vibration"]
    assert (node.asset, node.time, node.sampling_interval_ms, node.queue_size) == ("press-1", "source", 50.0, 4)


@pytest.mark.parametrize("text, message", [
    ('[[mqtt]]\ntopic = "a/{asset}"\nmodality = "image"', "needs 'format'"),
    ('[[mqtt]]\ntopic = "a/{asset}"\nmodality = "audio"\nformat = "pcm16"', "needs sample_rate"),
    ('[[mqtt]]\ntopic = "a/{asset}"\nmodality = "image"\nformat = "image"\ntime = "payload"', "needs format = 'json'"),
    ('[[mqtt]]\ntopic = "a/b"\nmodality = "image"\nformat = "image"', "needs 'asset'"),
    ('[[mqtt]]\ntopic = "a/#/b"\nasset = "x"\nmodality = "image"\nformat = "image"', "'#' must be the last level"),
    ('[[mqtt]]\ntopic = "a/{asset}"\nline = "{site}"\nmodality = "image"\nformat = "image"', "['site']"),
    ('[[mqtt]]\ntopic = "a/{asset}"\nmodality = "image"\nformat = "image"\ncolour = 1', "unknown key(s) ['colour']"),
    ('[[opcua]]\nnode = "n"\nasset = "a"\nmodality = "series"\nformat = "float32"\ntime = "payload"',
     "time 'payload'; expected one of source, server, arrival"),
    ('title = "x"', "unknown key(s) ['title']"),
    ("", "has no rules"),
    ("[[mqtt]\n", "is not valid TOML"),
])
def test_bad_mapping_files_say_what_to_fix(tmp_path: Path, text: str, message: str):
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_mapping(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_missing_mapping_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist; set STREAMFUSE_INGEST__MAPPING"):
        load_mapping(tmp_path / "nope.toml")


def test_binary_formats_become_valid_events(mapping):
    rule, caps = mapping.match_topic("plant/line-0/a1/camera")
    ev = to_event(rule, caps, "plant/line-0/a1/camera", png(), arrival_ms=1_000)
    assert (ev.asset_id, ev.line_id, ev.modality, ev.encoding, ev.ts_ms, ev.time_source) == \
        ("a1", "line-0", "image", "png", 1_000, "arrival")
    assert decode(encode(ev)) == ev  # the wire format carries the time source

    rule, caps = mapping.match_topic("plant/line-0/a1/microphone")
    pcm = np.arange(320, dtype="<i2").tobytes()
    ev = to_event(rule, caps, "plant/line-0/a1/microphone", pcm, arrival_ms=2_000)
    assert (ev.sample_rate, ev.channels, ev.encoding, ev.payload) == (16000, 1, "pcm16le", pcm)

    rule, caps = mapping.match_topic("raw/a1/vibration")
    ev = to_event(rule, caps, "raw/a1/vibration", np.ones(4, "<f4").tobytes(), arrival_ms=3_000)
    assert ev.shape == (2, 2)


def test_json_payloads(mapping):
    rule, caps = mapping.match_topic("plant/line-0/a1/vibration")
    values = np.linspace(-1, 1, 6).astype("<f4")
    b64 = json.dumps({"ts_ms": 1_800_000_000_100, "data": base64.b64encode(values.tobytes()).decode(),
                      "shape": [2, 3]}).encode()
    ev = to_event(rule, caps, "t", b64, arrival_ms=5)
    assert (ev.ts_ms, ev.time_source, ev.shape) == (1_800_000_000_100, "device", (2, 3))
    assert np.array_equal(np.frombuffer(ev.payload, "<f4"), values)
    listed = to_event(rule, caps, "t", json.dumps({"ts_ms": 7, "data": values.tolist()}).encode(), arrival_ms=5)
    assert listed.payload == ev.payload and listed.shape == (6,)


@pytest.mark.parametrize("topic, payload, reason", [
    ("plant/l/a1/camera", b"GIF89a....", "bad_image"),
    ("plant/l/a1/camera", b"", "bad_image"),
    ("plant/l/a1/microphone", b"\x01\x02\x03", "bad_audio"),
    ("plant/l/a1/vibration", b"{not json", "undecodable"),
    ("plant/l/a1/vibration", b"[1, 2]", "undecodable"),
    ("plant/l/a1/vibration", b'{"ts_ms": 5}', "missing_field"),
    ("plant/l/a1/vibration", b'{"data": [1.0]}', "missing_field"),
    ("plant/l/a1/vibration", b'{"ts_ms": "soon", "data": [1.0]}', "bad_field"),
    ("plant/l/a1/vibration", b'{"ts_ms": 5, "data": "%%%"}', "bad_field"),
    ("plant/l/a1/vibration", b'{"ts_ms": 5, "data": [1.0, NaN]}', "non_finite"),
    ("plant/l/a1/vibration", b'{"ts_ms": 5, "data": [1.0, 2.0], "shape": [3]}', "bad_series"),
    ("raw/a1/vibration", b"\x00\x00\x80", "bad_series"),
    ("plant/l//camera", png(), "bad_field"),
])
def test_undecodable_payloads_raise_with_a_reason(mapping, topic, payload, reason):
    rule, caps = mapping.match_topic(topic)
    with pytest.raises(InvalidEvent) as err:
        to_event(rule, caps, topic, payload, arrival_ms=1)
    assert err.value.reason == reason, err.value
    assert err.value.modality == rule.modality


def test_oversize_payload(mapping):
    rule, caps = mapping.match_topic("plant/l/a1/camera")
    with pytest.raises(InvalidEvent, match="oversize"):
        to_event(rule, caps, "plant/l/a1/camera", png((64, 64)), arrival_ms=1, max_bytes=50)


def test_opcua_values(mapping):
    rule = mapping.node_rules()["ns=2;s=Press1.Vibration"]
    ev = to_event(rule, {}, rule.source, [0.5, 1.5, 2.5], arrival_ms=9, device_ms=7, server_ms=8)
    assert (ev.ts_ms, ev.time_source, ev.shape, ev.line_id) == (7, "device", (3,), "line-0")
    assert to_event(rule, {}, rule.source, 3.25, arrival_ms=9, device_ms=7).shape == (1,)
    with pytest.raises(InvalidEvent, match="no source timestamp"):
        to_event(rule, {}, rule.source, 3.25, arrival_ms=9)
    with pytest.raises(InvalidEvent, match="a str value"):
        to_event(rule, {}, rule.source, "hello", arrival_ms=9, device_ms=7)


def test_redelivered_message_keeps_its_event_id(mapping):
    rule, caps = mapping.match_topic("plant/l/a1/vibration")
    body = b'{"ts_ms": 1000, "data": [1.0]}'
    a = to_event(rule, caps, "plant/l/a1/vibration", body, arrival_ms=1)
    b = to_event(rule, caps, "plant/l/a1/vibration", body, arrival_ms=99)  # later, after a crash
    assert a.event_id == b.event_id
    other = to_event(rule, caps, "plant/l/a2/vibration", body, arrival_ms=1)
    assert other.event_id != a.event_id


def test_gap_tracker_never_invents():
    t = GapTracker()
    assert [t.observe("n", ts, 100)[0] for ts in (100, 200, 200, 150)] == ["new", "new", "stale", "stale"]
    t.disconnected()
    assert t.observe("n", 200, 100) == ("stale", None)
    outcome, gap = t.observe("n", 900, 100)
    assert outcome == "new" and (gap.after_ms, gap.before_ms, gap.missed) == (200, 900, 6)
    t.disconnected()
    assert t.observe("n", 1000, 100) == ("new", None)  # back before any reading was due
    assert t.observe("m", 50, 100) == ("new", None)  # a node first seen after the loss


def test_ack_queue_orders_and_forgets_old_connections():
    q = AckQueue()
    handles = [q.add(mid) for mid in range(1, 6)]
    assert q.done(handles[4]) == [] and q.done(handles[2]) == []
    assert q.done(handles[0]) == [1]
    assert q.done(handles[1]) == [2, 3]
    assert q.done(handles[3]) == [4, 5] and len(q) == 0
    old = q.add(6)
    q.reset()
    new = q.add(6)  # the broker redelivers message 6 on the new connection
    assert q.done(old) == [] and q.done(new) == [6]


def test_time_from_an_mqtt5_user_property():
    m = parse_mapping({"mqtt": [{"topic": "p/{asset}/cam", "modality": "image", "format": "image",
                                 "time": "property"}]})
    rule, caps = m.match_topic("p/a1/cam")
    ev = to_event(rule, caps, "p/a1/cam", png(), arrival_ms=1, properties={"ts_ms": "1800000000250"})
    assert (ev.ts_ms, ev.time_source) == (1_800_000_000_250, "device")
    with pytest.raises(InvalidEvent, match="missing_field: p/a1/cam: no MQTT 5 user property 'ts_ms'"):
        to_event(rule, caps, "p/a1/cam", png(), arrival_ms=1)
    with pytest.raises(InvalidEvent, match="bad_field"):
        to_event(rule, caps, "p/a1/cam", png(), arrival_ms=1, properties={"ts_ms": "noon"})
